"""A decoder-only Transformer (RMSNorm, RoPE, causal GQA attention, SwiGLU or MoE FFNs).

Plain PyTorch for one process: nothing here knows about ranks. Build on the meta device for
large shapes, then `to_empty(device=...)` and `init_weights()`. For decoding, a `KVCache` from
`Transformer.new_kv_cache` keeps past keys and values, so each step runs only the new tokens.
Shapes: B batch, T sequence, D model dim, H heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moetrain.config import ModelConfig
from moetrain.model.experts import SwiGLU
from moetrain.model.init import seeded_normal_
from moetrain.model.lora import init_adapter_, is_adapter
from moetrain.model.moe import MoE
from moetrain.model.router import apply_keeping_fp32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least fp32: bf16 squares lose too much; fp64 models stay fp64
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                dtype: torch.dtype = torch.float32):
    """cos, sin tables (max_seq_len, head_dim / 2) for rotary embeddings, computed in `dtype`:
    fp32 as transformers computes them (the same values), fp64 for an fp64 model."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).to(dtype)
                                / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).to(dtype), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh), rotating interleaved-free halves: (x1, x2) -> (x1 cos - x2 sin, ...)."""
    T = x.shape[-2]
    cos, sin = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Past keys and values of every layer, for B sequences decoded together.

    Preallocated to `max_len` positions per layer, (B, Hkv, max_len, Dh) for keys and for values:
    2 * n_layers * B * Hkv * max_len * Dh elements. `pos` counts the filled positions, the same
    for every sequence (no padding). `Transformer.forward(tokens, cache)` writes the keys and
    values of tokens (B, T) at [pos, pos + T) in every layer, then advances pos by T."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int,
                 max_len: int, device=None, dtype=None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, Hkv, T, Dh) of the new tokens -> keys, values (B, Hkv, pos + T, Dh): the
        prefix so far plus these. `pos` moves once all layers have written (Transformer)."""
        end = self.pos + k.shape[2]
        self.keys[layer_id][:, :, self.pos:end] = k
        self.values[layer_id][:, :, self.pos:end] = v
        return self.keys[layer_id][:, :, :end], self.values[layer_id][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def init_weights(self, std: float) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(lin.weight, std=std)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer_id: int = 0):
        """x (B, T, D); cos, sin: the rotary rows of x's positions onwards. With a cache, x
        continues the cached sequences and its keys and values are written to layer_id's slot."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv,..)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            out = self._attend_cached(q, k, v, cache, layer_id)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _attend_cached(self, q, k, v, cache: KVCache, layer_id: int) -> torch.Tensor:
        """q (B, H, T, Dh) at positions [start, start + T) over the cached keys and these."""
        start, T = cache.pos, q.shape[2]
        k, v = cache.update(layer_id, k, v)  # (B, Hkv, start + T, Dh)
        mask, causal = None, False
        if T > 1 and start == 0:
            causal = True  # square: the fused kernels' causal path, as in training
        elif T > 1:
            # query i (position start + i) sees keys 0 .. start + i; SDPA's is_causal would
            # align the triangle top-left instead, hiding most of the prefix.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
        # T == 1, every decode step: the new token sees the whole prefix, no mask.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id in cfg.moe_layers
        self.ffn = (MoE(cfg.dim, cfg.moe, cfg.balance) if self.is_moe
                    else SwiGLU(cfg.dim, cfg.ffn_hidden))
        # Activation checkpointing: keep only the block's input, recompute the rest in backward
        # (Transformer.checkpoint_activations turns it on).
        self.checkpoint_activations = False

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        if cache is not None:  # decoding: no backward, nothing to recompute
            return self._forward(x, cos, sin, cache)
        if self.checkpoint_activations and torch.is_grad_enabled():
            # No early stop: the recomputation runs the whole block, so under expert
            # parallelism every rank re-issues the same all-to-alls in backward.
            with set_checkpoint_early_stop(False):
                return checkpoint(self._forward, x, cos, sin, use_reentrant=False,
                                  context_fn=self._checkpoint_contexts)
        return self._forward(x, cos, sin)

    def _checkpoint_contexts(self):
        """(forward, recomputation): the recomputation must not count the tokens again."""
        recompute = self.ffn.recomputation() if self.is_moe else contextlib.nullcontext()
        return contextlib.nullcontext(), recompute

    def _forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, self.layer_id)
        if self.is_moe:
            ffn_out, aux_loss = self.ffn(self.ffn_norm(x))
        else:
            ffn_out, aux_loss = self.ffn(self.ffn_norm(x)), None
        return x + ffn_out, aux_loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta,
                               dtype=torch.promote_types(torch.get_default_dtype(), torch.float32))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.output.weight.device.type != "meta":  # on meta: init after materialising
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every parameter and buffer in place; call after `to_empty` from meta.

        Each parameter is drawn from generators seeded by (seed, its name, row), so the weights
        are the same whatever sharding the parameters have (moetrain.model.init). seed=None
        draws one from torch's global RNG: `torch.manual_seed(s)` then `Transformer(cfg)` is
        reproducible."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        cfg = self.cfg
        self.init_buffers()
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), RMSNorm):
                param.fill_(1.0)
            elif is_adapter(name):
                init_adapter_(param, name, seed)
            else:
                std = cfg.embedding_std if name == "tok_embeddings.weight" else cfg.init_std
                seeded_normal_(param, std, seed, name)
        for moe in self.moe_layers():
            if hasattr(moe.router, "expert_bias"):
                moe.router.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        # The rotary tables stay at least fp32 (apply_rope casts them to the activations'
        # dtype, as transformers does) and are computed afresh in theirs: an fp64 model's are
        # fp64, not fp32 values widened.
        apply_keeping_fp32(self, fn, recurse, ("rope_cos", "rope_sin"))
        if not self.rope_cos.is_meta:
            self._fill_rope()
        return self

    @torch.no_grad()
    def _fill_rope(self) -> None:
        cfg = self.cfg
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta,
                               device=self.rope_cos.device, dtype=self.rope_cos.dtype)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def to_empty(self, *, device, recurse: bool = True):
        """Materialise from the meta device, keeping tied embeddings one tensor: nn.Module's
        to_empty gives each module its own copy of a shared parameter."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the buffers no checkpoint holds (rotary tables, per-step load counts): after
        `to_empty`, when the weights come from a checkpoint instead of `init_weights`."""
        self._fill_rope()
        for moe in self.moe_layers():
            moe.step_tokens_per_expert.zero_()

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations: activation
        memory falls from every op's outputs per layer to one (B, T, D) input per layer, for
        about one more forward of compute."""
        for layer in self.layers:
            layer.checkpoint_activations = enabled

    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if layer.is_moe]

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None,
                     dtype=None) -> KVCache:
        """An empty cache for `batch_size` sequences of up to max_len (default
        model.max_seq_len) positions, on the device and in the dtype of the weights unless
        given (dtype: that of the keys and values, e.g. bf16 under autocast)."""
        limit = self.cfg.max_seq_len
        max_len = limit if max_len is None else max_len
        if not 1 <= max_len <= limit:
            raise ValueError(f"KV cache max_len={max_len} must be between 1 and "
                             f"model.max_seq_len={limit}")
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size={batch_size} must be >= 1")
        weight = self.output.weight
        return KVCache(len(self.layers), batch_size, self.cfg.kv_heads,
                       self.cfg.dim // self.cfg.n_heads, max_len,
                       device=weight.device if device is None else device,
                       dtype=weight.dtype if dtype is None else dtype)

    def forward(self, tokens: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) -> logits (B, T, vocab), aux loss (scalar, sum over MoE layers).

        With a cache (inference), tokens continue its sequences at positions
        [cache.pos, cache.pos + T): they attend to the cached prefix too, their keys and values
        join the cache and cache.pos advances by T."""
        T = tokens.shape[1]
        cos, sin = self.rope_cos, self.rope_sin
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len="
                                 f"{self.cfg.max_seq_len}")
        else:
            self._check_cache(cache, tokens.shape[0], T)
            cos, sin = cos[cache.pos:cache.pos + T], sin[cache.pos:cache.pos + T]  # (T, Dh/2)
        x = self.tok_embeddings(tokens)
        aux_total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
        for layer in self.layers:
            x, aux_loss = layer(x, cos, sin, cache)
            if aux_loss is not None:
                aux_total = aux_total + aux_loss
        if cache is not None:
            cache.pos += T
        return self.output(self.norm(x)), aux_total

    def _check_cache(self, cache: KVCache, batch_size: int, T: int) -> None:
        """Before anything is written: a failed call leaves the cache as it was."""
        end = cache.pos + T
        if batch_size != cache.batch_size:
            raise ValueError(f"tokens have batch size {batch_size} but the KV cache holds "
                             f"{cache.batch_size} sequences")
        if end > self.cfg.max_seq_len:
            raise ValueError(f"cached {cache.pos} + {T} new tokens = {end} exceeds "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        if end > cache.max_len:
            raise ValueError(f"cached {cache.pos} + {T} new tokens = {end} exceeds "
                             f"the KV cache's max_len={cache.max_len}")


def num_params(model: Transformer) -> dict[str, int]:
    """Total parameters and parameters active per token (shared counted once, routed k/E)."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for moe in model.moe_layers() for p in moe.experts.parameters())
    moe_cfg = model.cfg.moe
    active_routed = 0
    if moe_cfg is not None and routed:
        active_routed = routed * moe_cfg.top_k // moe_cfg.num_experts
    return {"total": total, "active": total - routed + active_routed}
