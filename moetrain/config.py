"""Typed configuration: the schema for the model, its MoE layers and load balancing.

YAML files in configs/ hold values only; every cross-field rule lives in a `validate()` here and
runs once at start-up, before any weight is allocated or any collective is issued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROUTERS = ("softmax_topk", "sigmoid", "top1", "expert_choice")
AUX_LOSSES = ("none", "switch", "sequence")
AUX_LOSS_STATS = ("micro_batch", "global_batch")
SEQ_AUX_COUNTS = ("routed", "raw_topk")
BIAS_UPDATES = ("sign", "proportional")
LORA_TARGETS = ("experts", "shared_experts", "dense_ffn", "attention")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_seed(name: str, seed: int) -> None:
    _check(-(2**63) <= seed < 2**63, f"{name}={seed} must fit in 64 bits (|seed| < 2**63)")


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}")


@dataclass
class BalanceConfig:
    """Load balancing: an auxiliary loss, a router z-loss and/or the aux-loss-free expert bias."""

    aux_loss: str = "none"  # none | switch | sequence
    aux_loss_coef: float = 0.01  # Switch's alpha; DeepSeek-V3 uses ~1e-4 for the sequence loss
    # micro_batch: f_i from this micro-batch's tokens on this rank; global_batch: f_i from the
    # optimizer step's micro-batches so far, summed over all ranks (Megatron's global aux
    # loss: a running count under gradient accumulation, which balance.pop_step_loads resets
    # each step; the reduce is installed by moetrain.parallel). A capacity_factor's capacity
    # stays per rank's micro-batch either way, as Megatron's.
    aux_loss_stats: str = "micro_batch"
    # Which selections f_i counts in the sequence-wise loss: `routed`, the experts each token
    # is actually sent to (selected with the aux-free bias and within the kept groups);
    # `raw_topk`, the top-k of the raw affinities, bias and groups ignored (the paper's eq. 18).
    seq_aux_counts: str = "routed"
    z_loss_coef: float = 0.0
    aux_free: bool = False  # DeepSeek-V3 bias balancing, updated after each optimizer step
    # How the bias moves after each optimizer step, from the step's loads summed over ranks
    # (moetrain.model.balance.expert_bias_delta):
    #   proportional: gamma * (mean_load - load_i) / mean_load, the dual (sub)gradient step of
    #     the balanced assignment that the bias solves (Han & Zhong 2025, arXiv:2512.03915,
    #     cast aux-loss-free balancing as this primal-dual method). It moves fast while an
    #     expert is far off its share and little near balance, so it catches a router that
    #     concentrates in the first steps without jittering once balanced.
    #   sign: gamma * sign(mean_load - load_i), DeepSeek-V3's rule (Wang et al. 2024,
    #     arXiv:2408.15664), with gamma 1e-3 there. At most gamma per step whatever the
    #     imbalance: on real text at 1e-3 it has not undone the collapse of the first ten
    #     steps by step 300 (scripts/bench_balance_start.py).
    bias_update: str = "proportional"
    bias_update_rate: float = 0.02  # gamma; 1e-3 is the paper's value for `sign`
    # Subtract the mean after each update so the bias cannot drift (the proportional step
    # sums to zero over experts already).
    bias_center: bool = False

    def validate(self) -> None:
        _check_choice("model.balance.aux_loss", self.aux_loss, AUX_LOSSES)
        _check_choice("model.balance.aux_loss_stats", self.aux_loss_stats, AUX_LOSS_STATS)
        _check_choice("model.balance.seq_aux_counts", self.seq_aux_counts, SEQ_AUX_COUNTS)
        _check(self.aux_loss_coef >= 0,
               f"model.balance.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        _check(self.z_loss_coef >= 0, f"model.balance.z_loss_coef={self.z_loss_coef} must be >= 0")
        _check_choice("model.balance.bias_update", self.bias_update, BIAS_UPDATES)
        _check(self.bias_update_rate > 0,
               f"model.balance.bias_update_rate={self.bias_update_rate} must be > 0")
        _check(not (self.aux_loss == "sequence" and self.aux_loss_stats == "global_batch"),
               "model.balance.aux_loss_stats=global_batch applies to the switch loss; the sequence "
               "loss is per sequence by definition (use micro_batch)")


@dataclass
class MoEConfig:
    """One MoE FFN: router, routed experts, optional shared experts and capacity."""

    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    router: str = "softmax_topk"  # softmax_topk | sigmoid | top1 | expert_choice
    # Renormalise the k gate weights to sum to 1 (as transformers' Mixtral and GLM-4 MoE do
    # at any k). At top_k=1 every gate is then 1 and the router learns only from the balance
    # losses: use router top1 (Switch's raw probability) or norm_topk_prob=false there.
    norm_topk_prob: bool = True
    # Every router's gate weights are multiplied by this (after any normalisation), as
    # DeepSeek-V3 (sigmoid) and DeepSeek-V2 (softmax) do.
    route_scale: float = 1.0
    n_groups: int = 1  # group-limited routing (sigmoid router): experts split into groups
    topk_groups: int = 1  # groups kept per token
    n_shared_experts: int = 0
    shared_hidden: int | None = None  # hidden size of one shared expert; None = expert_hidden
    capacity_factor: float | None = None  # None = dropless
    router_jitter: float = 0.0  # multiplicative input noise in [1-eps, 1+eps] while training
    # Fine-tuning: the router's weight gets no gradient. Its aux-free bias still moves, and
    # balance losses still reach earlier layers through its probabilities: for routing that
    # changes only with its inputs, also set model.balance.aux_free=false and aux_loss=none.
    freeze_router: bool = False

    def validate(self) -> None:
        E, k = self.num_experts, self.top_k
        _check_choice("model.moe.router", self.router, ROUTERS)
        _check(E >= 1, f"model.moe.num_experts={E} must be >= 1")
        _check(self.expert_hidden >= 1,
               f"model.moe.expert_hidden={self.expert_hidden} must be >= 1")
        _check(1 <= k <= E, f"model.moe.top_k={k} must be between 1 and model.moe.num_experts={E}")
        if self.router == "top1":
            _check(k == 1, f"model.moe.top_k={k} but router 'top1' routes each token to exactly 1 "
                           "expert; set model.moe.top_k=1 or use router 'softmax_topk'")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               f"model.moe.capacity_factor={self.capacity_factor} must be > 0, or null for "
               "dropless")
        _check(self.n_groups >= 1, f"model.moe.n_groups={self.n_groups} must be >= 1")
        _check(E % self.n_groups == 0,
               f"model.moe.num_experts={E} is not divisible into model.moe.n_groups="
               f"{self.n_groups} groups")
        _check(1 <= self.topk_groups <= self.n_groups,
               f"model.moe.topk_groups={self.topk_groups} must be between 1 and "
               f"model.moe.n_groups={self.n_groups}")
        if self.n_groups > 1:
            _check(self.router == "sigmoid",
                   f"model.moe.n_groups={self.n_groups} (group-limited routing) needs router "
                   f"'sigmoid', not {self.router!r}")
            per_group = E // self.n_groups
            _check(per_group >= 2, f"model.moe.n_groups={self.n_groups} leaves {per_group} "
                                   "expert per group; a group's score is the sum of its top-2 "
                                   "experts, so each group needs >= 2")
            reachable = self.topk_groups * per_group
            _check(k <= reachable,
                   f"model.moe.top_k={k} exceeds the {reachable} experts in model.moe.topk_groups="
                   f"{self.topk_groups} groups of {per_group}")
        _check(0 < self.route_scale < math.inf,
               f"model.moe.route_scale={self.route_scale} must be > 0 and finite")
        _check(self.n_shared_experts >= 0,
               f"model.moe.n_shared_experts={self.n_shared_experts} must be >= 0")
        _check(self.shared_hidden is None or self.shared_hidden >= 1,
               f"model.moe.shared_hidden={self.shared_hidden} must be >= 1 or null")
        _check(0 <= self.router_jitter < 1,
               f"model.moe.router_jitter={self.router_jitter} must be in [0, 1)")

    @property
    def shared_hidden_size(self) -> int:
        """Hidden size of the fused shared-expert FFN (all shared experts in one SwiGLU)."""
        per_expert = self.shared_hidden if self.shared_hidden is not None else self.expert_hidden
        return self.n_shared_experts * per_expert


@dataclass
class ModelConfig:
    """A decoder-only Transformer; FFNs are dense for the first `first_k_dense` layers, then MoE."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    ffn_hidden: int = 512  # dense SwiGLU layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02  # every weight matrix but the token embeddings
    # The token embeddings' std; None: 1.0, or init_std when tie_embeddings (the matrix is then
    # the output layer too). 1.0 (torchtitan's choice) keeps each token's identity large
    # against what the blocks add to the residual stream: at 0.02, Adam's first ~5 same-signed
    # steps make the blocks add nearly one vector to every position (the unigram direction),
    # router inputs of all tokens align (mean cosine 0.5 -> 0.99) and every token picks the
    # same experts, which no balancing can undo while it lasts.
    embed_init_std: float | None = None
    first_k_dense: int = 0
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None = a dense model
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}={value} must be >= 1")
        _check(self.dim % self.n_heads == 0,
               f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        _check((self.dim // self.n_heads) % 2 == 0,
               f"head dim model.dim/model.n_heads={self.dim // self.n_heads} must be even for "
               "rotary embeddings")
        kv = self.kv_heads
        _check(1 <= kv <= self.n_heads and self.n_heads % kv == 0,
               f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads}")
        _check(0 <= self.first_k_dense <= self.n_layers,
               f"model.first_k_dense={self.first_k_dense} must be between 0 and "
               f"model.n_layers={self.n_layers}")
        _check(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
        _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        _check(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        _check(self.embed_init_std is None or self.embed_init_std > 0,
               f"model.embed_init_std={self.embed_init_std} must be > 0 (or null for the "
               "default)")
        if self.moe is not None:
            self.moe.validate()
            if self.balance.aux_free:
                _check(self.moe.router == "sigmoid",
                       "model.balance.aux_free=true needs model.moe.router='sigmoid' (the bias "
                       f"shifts selection scores), not {self.moe.router!r}")
            if self.moe.router == "expert_choice":
                _check(self.balance.aux_loss == "none" and not self.balance.aux_free,
                       "model.moe.router='expert_choice' is balanced by construction; set "
                       "model.balance.aux_loss=none and model.balance.aux_free=false")
        self.balance.validate()

    @property
    def embedding_std(self) -> float:
        if self.embed_init_std is not None:
            return self.embed_init_std
        return self.init_std if self.tie_embeddings else 1.0

    @property
    def moe_layers(self) -> list[int]:
        if self.moe is None:
            return []
        return list(range(self.first_k_dense, self.n_layers))


DATA_PARALLEL = ("fsdp", "ddp")


@dataclass
class ParallelConfig:
    """world = dp_replicate * dp_shard; experts sharded over ep ranks inside each dp_shard group.

    Dense parameters are data-parallel over all ranks; expert parameters over the
    edp = world / ep replicas of each expert shard. With FSDP both are also *sharded* over those
    ranks (HSDP when dp_replicate > 1: sharded within a group, replicated across groups)."""

    ep: int = 1
    data_parallel: str = "fsdp"  # fsdp (FSDP2 fully_shard) | ddp; applies when world > 1
    dp_replicate: int = 1  # HSDP: replicate across this many groups, shard within each (fsdp)
    # Gradient accumulation under FSDP: keep parameters and gradients unsharded until the last
    # micro-batch (less communication, the memory of the unsharded model); off: reduce-scatter
    # every micro-batch, memory stays sharded.
    fsdp_defer_sync: bool = False
    dedup: bool = True  # send a token once per destination rank, not once per expert
    timeout_s: float = 120.0  # every process group: a failed rank never hangs the others long

    def validate(self, world_size: int, num_experts: int | None) -> None:
        _check_choice("parallel.data_parallel", self.data_parallel, DATA_PARALLEL)
        _check(self.ep >= 1, f"parallel.ep={self.ep} must be >= 1")
        _check(self.dp_replicate >= 1, f"parallel.dp_replicate={self.dp_replicate} must be >= 1")
        _check(world_size % self.dp_replicate == 0,
               f"parallel.dp_replicate={self.dp_replicate} does not divide the world size "
               f"{world_size}; valid: {_divisors(world_size)}")
        _check(self.dp_replicate == 1 or self.data_parallel == "fsdp",
               f"parallel.dp_replicate={self.dp_replicate} (HSDP) needs "
               f"parallel.data_parallel=fsdp, not {self.data_parallel!r}")
        dp_shard = world_size // self.dp_replicate
        _check(self.dp_replicate == 1 or dp_shard > 1,
               f"parallel.dp_replicate={self.dp_replicate} leaves one rank per shard group "
               f"(world size {world_size}): that is plain replication, use "
               f"parallel.dp_replicate=1 parallel.data_parallel=ddp; valid: "
               f"{[d for d in _divisors(world_size) if d < world_size]}")
        # ep must divide both the ranks it shards over and the experts
        valid = [d for d in _divisors(dp_shard) if num_experts is None or num_experts % d == 0]
        if self.dp_replicate == 1:
            _check(world_size % self.ep == 0,
                   f"parallel.ep={self.ep} does not divide the world size {world_size}; "
                   f"valid: {valid}")
        else:
            _check(dp_shard % self.ep == 0,
                   f"parallel.ep={self.ep} does not divide the {dp_shard} ranks of a shard "
                   f"group (world {world_size} / parallel.dp_replicate={self.dp_replicate}); "
                   f"valid: {valid}")
        if num_experts is not None:
            _check(num_experts % self.ep == 0,
                   f"model.moe.num_experts={num_experts} is not divisible by parallel.ep="
                   f"{self.ep}; valid: {valid}")
        elif self.ep > 1:
            raise ValueError(f"parallel.ep={self.ep} needs an MoE model (model.moe is null)")
        _check(self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s} must be > 0")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


DATA_SOURCES = ("synthetic", "python_stdlib", "text", "json", "parquet", "hub")
SAMPLE_BY = ("line", "paragraph", "document")


@dataclass
class DataConfig:
    """Where tokens come from. Default: the generated multi-domain corpus (no network)."""

    source: str = "synthetic"  # synthetic | text | json | parquet | hub
    path: str | None = None  # local file, glob or directory; for `hub`, the dataset name
    hub_config: str | None = None
    split: str = "train"  # hub split for training
    val_path: str | None = None  # local validation file(s); hub: `val_split`
    val_split: str | None = None
    # no validation source: this share of blocks (python_stdlib: of files)
    val_fraction: float = 0.02
    column: str = "text"
    # text files: a document per line (datasets' default), per paragraph (blank-line
    # separated) or per file; each document ends with an end-of-document token
    sample_by: str = "line"
    streaming: bool = False  # stream and pack on the fly (large corpora)
    # byte | a built-in name (moetrain/data/tokenizers/: stdlib-bpe-2048) | a tokenizers JSON
    # file or a directory holding tokenizer.json (scripts/train_tokenizer.py makes them). Bytes
    # suit the generated corpus; the real-text configs (configs/data/) pick stdlib-bpe-2048.
    tokenizer: str = "byte"
    seq_len: int = 128
    synthetic_docs: int = 20000
    synthetic_val_docs: int = 500
    seed: int = 0

    def validate(self) -> None:
        _check_choice("data.source", self.source, DATA_SOURCES)
        if self.source not in ("synthetic", "python_stdlib"):
            _check(bool(self.path), f"data.source={self.source!r} needs data.path")
        _check_choice("data.sample_by", self.sample_by, SAMPLE_BY)
        _check(self.seq_len >= 1, f"data.seq_len={self.seq_len} must be >= 1")
        _check(0 <= self.val_fraction < 1,
               f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _check(self.synthetic_docs >= 1, f"data.synthetic_docs={self.synthetic_docs} must be >= 1")
        _check(self.synthetic_val_docs >= 1,
               f"data.synthetic_val_docs={self.synthetic_val_docs} must be >= 1 (to skip "
               "validation: train.val_every=0)")
        _check_seed("data.seed", self.seed)
        if self.source in ("synthetic", "python_stdlib"):  # they read no files: say so
            for name in ("path", "val_path"):
                value = getattr(self, name)
                _check(value is None, f"data.{name}={value!r} is set, but data.source="
                       f"{self.source!r} reads no files; for local files use data=local_text "
                       "or data=local_json (or data.source=text|json|parquet)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # 10, not 20: around the LR peak attention writes nearly one vector into every position,
    # the router inputs of all tokens align (mean cosine 0.8-0.97, scripts/probe_residual.py)
    # and every token picks the same experts for ~10 steps. After a 20-step warm-up that
    # moment's tail left an expert empty at step 30-31 in 1 of 8 seeds (deepseek_tiny, real
    # text); after 10 steps it is over by step 30 in all 8, at an equal or lower loss
    # (README "Balancing from the first steps").
    warmup_steps: int = 10
    grad_clip: float = 1.0  # by the true global norm; 0 disables

    def validate(self) -> None:
        _check(0 < self.lr < math.inf, f"optim.lr={self.lr} must be > 0 and finite")
        _check(0 <= self.eps < math.inf, f"optim.eps={self.eps} must be >= 0 and finite")
        _check(0 <= self.min_lr_ratio <= 1,
               f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               f"optim.beta1={self.beta1}, optim.beta2={self.beta2} must be in [0, 1)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")


NONFINITE_POLICIES = ("stop", "skip")
ACTIVATION_CHECKPOINTING = ("none", "full")


@dataclass
class LoopConfig:
    steps: int = 300  # optimizer steps
    micro_batch_size: int = 16  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    val_every: int = 100  # 0 disables validation
    val_batches: int = 4  # micro-batches per rank per validation
    compile: bool = False  # torch.compile each block
    # none | full: recompute every block in backward (activation memory for compute)
    activation_checkpointing: str = "none"
    on_nonfinite: str = "stop"  # stop | skip the step
    seed: int = 0
    peak_tflops: float | None = None  # for MFU on GPUs; None = guess from the device name
    # Leave after this (absolute) step with a checkpoint, e.g. to end a job before its time
    # limit; the next job continues with resume=auto and a later exit_at_step (or none).
    exit_at_step: int | None = None
    # Log milliseconds per step of each phase (data, forward, backward, grad sync, optimizer,
    # balance, log) as `phase_ms`; on CUDA every phase boundary is then a device sync.
    time_phases: bool = False

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}={value} must be >= 1")
        _check(self.val_every >= 0, f"train.val_every={self.val_every} must be >= 0")
        _check(self.val_batches >= 1, f"train.val_batches={self.val_batches} must be >= 1")
        _check(self.exit_at_step is None or self.exit_at_step >= 1,
               f"train.exit_at_step={self.exit_at_step} must be >= 1 or null")
        _check_choice("train.activation_checkpointing", self.activation_checkpointing,
                      ACTIVATION_CHECKPOINTING)
        _check_choice("train.on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        _check_seed("train.seed", self.seed)
        _check(self.peak_tflops is None or 0 < self.peak_tflops < math.inf,
               f"train.peak_tflops={self.peak_tflops} must be > 0 (or null: from the device)")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) on frozen base weights, with peft's conventions:
    W x + (alpha / rank) * B A dropout(x), A (rank, in) random, B (out, rank) zero, so the
    adapted model starts as the base model. Stacked experts get stacked adapters, A (E, rank,
    in) and B (E, out, rank), run in the experts' own grouped pass and sharded with them."""

    rank: int = 0  # 0: no LoRA (full fine-tuning of whatever requires grad)
    alpha: float = 16.0
    # experts: the routed experts' three projections; shared_experts and dense_ffn: the
    # shared experts' and the dense layers' SwiGLU; attention: wq, wk, wv, wo
    targets: list[str] = field(default_factory=lambda: ["experts"])
    dropout: float = 0.0  # on an adapter's input, as peft's lora_dropout
    # The router is frozen while adapters train ("naive fine-tuning can break the router");
    # true trains its weight too, saved with the adapters.
    train_router: bool = False

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, model: ModelConfig) -> None:
        _check(self.rank >= 0, f"finetune.lora.rank={self.rank} must be >= 0 (0 disables LoRA)")
        if not self.enabled:
            return
        _check(self.alpha > 0, f"finetune.lora.alpha={self.alpha} must be > 0")
        _check(0 <= self.dropout < 1, f"finetune.lora.dropout={self.dropout} must be in [0, 1)")
        _check(len(self.targets) > 0, "finetune.lora.targets is empty; choose from "
                                      f"{', '.join(LORA_TARGETS)}")
        for target in self.targets:
            _check(target in LORA_TARGETS, f"finetune.lora.targets has {target!r}; valid: "
                                           f"{', '.join(LORA_TARGETS)}")
        has_moe = model.moe is not None and model.first_k_dense < model.n_layers
        present = {"attention": True, "experts": has_moe,
                   "shared_experts": has_moe and model.moe.n_shared_experts > 0,
                   "dense_ffn": not has_moe or model.first_k_dense > 0}
        for target in self.targets:
            _check(present[target], f"finetune.lora.targets has {target!r} but this model has "
                                    f"no {target.replace('_', ' ')}")


@dataclass
class FinetuneConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)


COLLAPSE_POLICIES = ("warn", "stop")


@dataclass
class MonitorConfig:
    """Expert-collapse detection on the global-batch load, checked every log step."""

    starve_fraction: float = 0.1  # an expert below this share of its fair load (1/E) ...
    patience: int = 5  # ... for this many consecutive log steps is collapsing
    entropy_floor: float = 0.5  # or a layer's normalised load entropy stays below this
    on_collapse: str = "warn"  # warn | stop

    def validate(self) -> None:
        _check(0 <= self.starve_fraction < 1,
               f"monitor.starve_fraction={self.starve_fraction} must be in [0, 1)")
        _check(self.patience >= 1, f"monitor.patience={self.patience} must be >= 1")
        _check(0 <= self.entropy_floor <= 1,
               f"monitor.entropy_floor={self.entropy_floor} must be in [0, 1]")
        _check_choice("monitor.on_collapse", self.on_collapse, COLLAPSE_POLICIES)


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline
    project: str = "moetrain"
    entity: str | None = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    plots: bool = True  # write RUN_DIR/plots/*.png at the end of every run (rank 0)

    def validate(self) -> None:
        _check_choice("logger.wandb.mode", self.wandb.mode, WANDB_MODES)


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N optimizer steps; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    at_end: bool = True
    # SIGTERM/SIGINT/SIGUSR1 stop the run at the next step boundary; this writes a checkpoint
    # there
    on_preempt: bool = True

    def validate(self) -> None:
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0")
        _check(self.keep_last >= 0, f"checkpoint.keep_last={self.keep_last} must be >= 0")


@dataclass
class RunConfig:
    """The whole run: what `python -m moetrain.train` takes (Hydra schema `train_schema`)."""

    name: str = "moetrain"
    run_dir: str | None = None  # None: runs/<name>-<timestamp>, chosen on rank 0
    dry_run: bool = False  # build on the meta device, print sizes and layout, exit
    resume: str | None = None  # auto: newest complete checkpoint of run_dir; or a path
    # Model weights to start from (fine-tuning): a moetrain checkpoint, or hf:DIR, a local
    # transformers checkpoint whose config.json also sets the model's architecture.
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self, world_size: int) -> None:
        """Every check that needs no data and no collective, run first on every rank."""
        self.model.validate()
        num_experts = self.model.moe.num_experts if self.model.moe is not None else None
        self.parallel.validate(world_size, num_experts)
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.monitor.validate()
        self.logger.validate()
        self.checkpoint.validate()
        self.finetune.lora.validate(self.model)
        _check(self.resume != "auto" or bool(self.run_dir),
               "resume=auto needs run_dir=<the run's directory> (a new run dir has no "
               "checkpoints)")
        _check(self.init_from != "auto", "init_from takes a checkpoint path, not 'auto'")
        lora = self.finetune.lora
        _check(not (lora.enabled and lora.train_router and self.model.moe is not None
                    and self.model.moe.freeze_router),
               "finetune.lora.train_router=true contradicts model.moe.freeze_router=true; "
               "set one of them")
        _check(not lora.enabled or bool(self.init_from),
               f"finetune.lora.rank={lora.rank} needs init_from=<the base checkpoint, or "
               "hf:DIR>: adapters train on frozen pretrained weights")
        _check(self.data.seq_len <= self.model.max_seq_len,
               f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
               f"{self.model.max_seq_len}")
