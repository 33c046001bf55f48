"""Evaluate a checkpoint: `python -m moetrain.evaluate CKPT_OR_RUN_DIR [--data PATH]`.

Reports, over every complete block of the data (blocks of seq_len + 1 packed tokens, as the
trainer packs them):

  loss            nats per predicted token: the sum of every block's next-token cross-entropy
                  over the number of predicted tokens (seq_len per block), in fp64
  perplexity      exp(loss)
  bits per byte   total nats / (ln 2 * the UTF-8 bytes the predicted tokens stand for), which
                  compares across tokenizers. Bytes per token id (`token_byte_lengths`):
                  - byte tokenizer: 1 for every id, 0 for the end-of-document id 0;
                  - tokenizers file: 0 for special tokens and the end-of-document token; for a
                    byte-level vocabulary (a ByteLevel pre-tokenizer or decoder, GPT-2 style)
                    the token's number of byte-alphabet characters, exact (but with
                    add_prefix_space the space put before each document counts as a byte);
                    otherwise the UTF-8 length of the token decoded on its own, approximate
                    (decoders may strip a lone token's leading space, and a byte-fallback piece
                    of a multi-byte character decodes to U+FFFD, 3 bytes).
  expert load     per MoE layer: tokens per expert (router assignments before any capacity
                  drop, top_k per token), load fraction, MaxVio = max load / mean load - 1 (as
                  the trainer logs it, moetrain.model.balance.load_metrics), normalised load
                  entropy, dead experts (zero tokens).

The trainer's logged val_loss is the mean of per-batch means over its first `val_batches`
micro-batches of each rank's shard; on the blocks it covered (whole batches of equal size) the
two agree. Routing that depends on the batch (capacity_factor, expert_choice) makes the numbers
depend on --batch-size, as in training, never on the number of ranks.

Data (default: the checkpoint's own validation blocks, exactly as the trainer built them): with
`--data PATH` a local file, glob or directory read by `datasets` as `--source` (default: json
for .json/.jsonl, parquet for .parquet, else text, from the name or from the files a directory
or glob holds; `hub` takes a dataset name and `--split`).
Column, tokenizer and seq_len default to the checkpoint's; at another --seq-len, blocks the run
held out of its training data are the same tokens re-cut, never text it trained on.

Batches are cut from the blocks in order (the last one may be shorter) and handed to ranks in
contiguous runs, so every sum is over the same batches whatever the number of ranks; under
expert parallelism each MoE layer holds all-to-alls, so a rank with fewer batches runs padding
forwards whose loss and loads are discarded. One all-reduce at the end sums the token losses,
counts, bytes and loads.

One process: the model is loaded whole (`moetrain.checkpoint.load_model`). Under torchrun: the
process group and mesh are built as the trainer builds them (the checkpoint's `parallel`,
`--ep` overriding its ep), the model on the meta device, parallelized, then the checkpoint's
`model.*` tensors DCP-loaded strictly into its shards. Evaluation is in fp32 (no autocast).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.config import DataConfig, RunConfig
from moetrain.data.tokenizer import build_tokenizer, token_byte_lengths
from moetrain.model.balance import load_metrics


@dataclass
class EvalResult:
    """What `evaluate` measured; sums are over every rank. Per-layer lists are indexed like
    `layers` (the ids of the MoE layers)."""

    loss: float  # nats per predicted token
    perplexity: float
    bits_per_byte: float | None  # None without a byte table, or when no byte was predicted
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes those tokens stand for
    blocks: int
    batches: int
    layers: list[int]
    tokens_per_expert: list[list[int]]  # (L, E)
    load_fraction: list[list[float]]  # (L, E)
    max_violation: list[float]
    load_entropy: list[float]
    dead_experts: list[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    """The model to evaluate: `model` is the Transformer (its MoE layers hold the load stats),
    `module` what to call for forward (a DDP wrapper, or the model itself)."""

    model: torch.nn.Module
    module: torch.nn.Module
    cfg: RunConfig
    checkpoint: str
    rank: int = 0
    world: int = 1


# ---------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, *,
             token_bytes: torch.Tensor | None = None, max_batches: int | None = None,
             module=None) -> EvalResult:
    """Loss, perplexity, bits per byte and expert loads of `model` over `blocks`
    (n_blocks, seq_len + 1), in batches of `batch_size` blocks (the first `max_batches` only
    when given). token_bytes (vocab,): UTF-8 bytes per token id (`token_byte_lengths`).

    Call it on every rank when torch.distributed is initialised, with the same blocks: each
    rank runs its share of the batches and the result (identical on every rank) does not depend
    on the number of ranks. `module` is what to call (default: `model`)."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    if len(blocks) == 0:
        raise ValueError("no block to evaluate")
    module = model if module is None else module
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = model.rope_cos.device  # a plain buffer: parameters may be sharded DTensors
    num_batches = math.ceil(len(blocks) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    used = min(len(blocks), num_batches * batch_size)
    per_rank = math.ceil(num_batches / world)
    moe_layers = model.moe_layers()
    num_experts = model.cfg.moe.num_experts if moe_layers else 0
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)

    # [nats, predicted tokens, bytes] then the (L, E) loads, summed over ranks in one
    # all-reduce. fp64: token counts stay exact far beyond what fp32 holds (2^24).
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    num_bytes = torch.zeros((), dtype=torch.float64, device=device)
    loads = torch.zeros(len(moe_layers), num_experts, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(per_rank):
            index = rank * per_rank + i
            real = index < num_batches
            # A rank out of batches still runs a forward (one block) for the collectives.
            batch = (blocks[index * batch_size:min((index + 1) * batch_size, used)] if real
                     else blocks[:1]).to(device)  # (B, T + 1)
            logits, _ = module(batch[:, :-1])  # (B, T, V)
            if not real:
                continue
            targets = batch[:, 1:]  # (B, T)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                    reduction="sum").double()
            tokens += targets.numel()
            if token_bytes is not None:
                num_bytes += token_bytes[targets].sum().double()
            if moe_layers:
                loads += torch.stack([layer.last_stats["tokens_per_expert"]
                                      for layer in moe_layers]).double()  # (L, E)
    finally:
        model.train(was_training)
    totals = torch.cat([torch.stack([nats, tokens, num_bytes]), loads.flatten()])
    if world > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    totals = totals.cpu()  # NOTE: the one device-to-host sync
    nats_sum, token_count, byte_count = totals[:3].tolist()
    loads = totals[3:].view(len(moe_layers), num_experts)
    loss = nats_sum / token_count
    metrics = load_metrics(loads) if moe_layers else None
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        bits_per_byte=(nats_sum / (math.log(2) * byte_count)
                       if token_bytes is not None and byte_count > 0 else None),
        tokens=int(token_count), bytes=int(byte_count), blocks=used, batches=num_batches,
        layers=[i for i, layer in enumerate(model.layers) if layer.is_moe],
        tokens_per_expert=loads.long().tolist(),
        load_fraction=metrics["load_fraction"].tolist() if metrics else [],
        max_violation=metrics["max_violation"].tolist() if metrics else [],
        load_entropy=metrics["entropy"].tolist() if metrics else [],
        dead_experts=metrics["dead_experts"].tolist() if metrics else [])


# ---------------------------------------------------------------------------- data
def _source_of(name: str) -> str:
    name = name.lower().removesuffix(".gz")
    if name.endswith((".json", ".jsonl")):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _infer_source(path: str) -> str:
    """--data's reader from its extension; a directory's or a glob's from its files'."""
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if not f.startswith(".")]
    else:
        files = glob.glob(path) or [path]
    sources = sorted({_source_of(f) for f in files})
    if len(sources) > 1:
        raise ValueError(f"--data {path!r} holds {' and '.join(sources)} files: name one kind "
                         "(e.g. a glob like dir/*.jsonl) or pass --source")
    return sources[0] if sources else "text"


def eval_data_config(base: DataConfig, data: str | None = None, source: str | None = None,
                     split: str | None = None, column: str | None = None,
                     tokenizer: str | None = None, seq_len: int | None = None) -> DataConfig:
    """The checkpoint's DataConfig with the given options overriding it; the evaluation data
    is its validation split. Packed in memory (never streamed) so every block is seen."""
    cfg = dataclasses.replace(base)
    if data is not None:
        cfg.source = source or _infer_source(data)
        if cfg.source == "synthetic":
            raise ValueError("--source synthetic generates its data: leave out --data")
        if cfg.source != "hub":
            if not glob.glob(data) and not os.path.exists(data):
                raise ValueError(f"--data {data!r}: no such file (nor any file matching it)")
            cfg.val_path = data
        else:
            cfg.hub_config = base.hub_config if data == base.path else None
            cfg.val_split = split or "validation"
        cfg.path = data
        cfg.streaming = False
    elif source is not None and source != base.source:
        if source != "synthetic":
            raise ValueError(f"--source {source} needs --data PATH")
        cfg.source, cfg.path, cfg.val_path = source, None, None  # it generates its text
        cfg.streaming = False
    elif split is not None:
        cfg.val_split = split
    cfg.column = column or cfg.column
    cfg.tokenizer = tokenizer or cfg.tokenizer
    cfg.seq_len = seq_len if seq_len is not None else cfg.seq_len
    cfg.validate()
    return cfg


def eval_blocks(cfg: DataConfig, vocab_size: int, max_seq_len: int, own_validation: bool,
                trained_seq_len: int | None = None):
    """(blocks (n, seq_len + 1), tokenizer). own_validation: the checkpoint's validation data
    as `build_data` makes it for the trainer (its validation source, or else the blocks it held
    out of the training data). Held-out blocks are cut at `trained_seq_len` (default: seq_len),
    the run's, and their tokens re-cut at seq_len: cutting the corpus afresh at another length
    would move the hold-out's start into text the run trained on."""
    from moetrain.data.loader import build_data, load_texts, tokenize_and_pack
    if cfg.seq_len > max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {max_seq_len}")
    tokenizer = build_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the model's vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens (tokenizer {cfg.tokenizer!r})")
    texts = None if cfg.streaming else load_texts(cfg, "validation")
    if texts is not None:
        blocks = tokenize_and_pack(texts, cfg, tokenizer)
    elif own_validation:  # held out of the training blocks (or streamed): as the trainer does
        trained = dataclasses.replace(cfg, seq_len=trained_seq_len or cfg.seq_len)
        _, blocks = build_data(trained, 1, 0, 1, vocab_size)
        if blocks is None:
            raise ValueError("the checkpoint's data has no validation split (data.val_path, "
                             "data.val_split and data.val_fraction=0): pass --data PATH")
        if trained.seq_len != cfg.seq_len:  # blocks are disjoint: their tokens in order
            tokens, width = blocks.reshape(-1), cfg.seq_len + 1
            blocks = tokens[:len(tokens) // width * width].view(-1, width)
    else:
        raise ValueError(f"no validation data in {cfg.path!r} (hub split {cfg.val_split!r})")
    if len(blocks) == 0:
        raise ValueError(f"the data holds fewer than {cfg.seq_len + 1} tokens: no complete "
                         f"block of seq_len {cfg.seq_len} + 1")
    return blocks, tokenizer


# ---------------------------------------------------------------------------- model
def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_ADDR" in os.environ


def load_for_evaluation(source: str | Path, ep: int | None = None,
                        device: torch.device | str | None = None) -> LoadedModel:
    """The checkpoint's model ready for `evaluate`: whole in one process, or under torchrun
    (WORLD_SIZE/MASTER_ADDR set) parallelized over the job's ranks with the checkpoint's
    layout, `ep` overriding its expert-parallel degree."""
    from moetrain.checkpoint import (find_checkpoint, load_lora_base, load_model,
                                     load_model_weights, load_run_config)
    from moetrain.model.lora import apply_lora, trainable_state_names
    from moetrain.model import Transformer
    from moetrain.parallel import build_mesh, init_distributed, parallelize
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _distributed():
        if ep not in (None, 1):
            raise ValueError(f"--ep {ep} needs {ep} or more ranks: run under torchrun")
        checkpoint = str(source) if str(source).startswith("hf:") else str(find_checkpoint(source))
        model, cfg = load_model(checkpoint, device)
        return LoadedModel(model, model, cfg, checkpoint)
    if str(source).startswith("hf:"):
        raise ValueError("an hf: checkpoint is evaluated in one process; run without torchrun")
    checkpoint = find_checkpoint(source)
    cfg = load_run_config(checkpoint)
    # The replica layout does not change what is computed: one shard group.
    cfg.parallel = dataclasses.replace(cfg.parallel, dp_replicate=1,
                                       ep=ep if ep is not None else cfg.parallel.ep)
    num_experts = cfg.model.moe.num_experts if cfg.model.moe else None
    cfg.parallel.validate(int(os.environ.get("WORLD_SIZE", "1")), num_experts)
    rank, world = init_distributed(cfg.parallel.timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = build_mesh(cfg.parallel, num_experts)
    lora = cfg.finetune.lora
    with torch.device("meta"):
        model = Transformer(cfg.model)
        if lora.enabled:  # adapters run unmerged on their (sharded) base
            apply_lora(model, lora)
    module = parallelize(model, mesh, cfg.parallel, device=device, seed=cfg.train.seed)
    if lora.enabled:
        load_lora_base(model, cfg.init_from, field=f"{checkpoint}'s init_from")
        load_model_weights(model, checkpoint, keys=trainable_state_names(model))
    else:
        load_model_weights(model, checkpoint)
    model.eval()
    return LoadedModel(model, module, cfg, str(checkpoint), rank, world)


# ---------------------------------------------------------------------------- report
def format_report(result: EvalResult, header: dict) -> str:
    lines = [f"{key:<11} {value}" for key, value in header.items()]
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    lines.append(f"{'loss':<11} {result.loss:.4f} nats/token   perplexity "
                 f"{result.perplexity:.4f}   bits/byte {bpb}")
    lines.append(f"{'tokens':<11} {result.tokens:,} predicted in {result.blocks:,} blocks "
                 f"({result.batches} batches), {result.bytes:,} bytes")
    if not result.layers:
        lines.append("expert load: dense model, no MoE layer")
        return "\n".join(lines)
    num_experts = len(result.tokens_per_expert[0])
    per_expert = num_experts <= 16  # wider layers get their smallest and largest share only
    lines.append("expert load per MoE layer (share of the layer's assignments, %):")
    head = f"{'layer':>5} {'maxvio':>7} {'dead':>4} {'entropy':>7}  "
    head += (" ".join(f"{'e' + str(e):>5}" for e in range(num_experts)) if per_expert
             else f"{'min':>5} {'max':>5}")
    lines.append(head)
    for i, layer in enumerate(result.layers):
        shares = [100 * f for f in result.load_fraction[i]]
        row = (f"{layer:>5} {result.max_violation[i]:>7.3f} {result.dead_experts[i]:>4} "
               f"{result.load_entropy[i]:>7.3f}  ")
        row += (" ".join(f"{s:>5.1f}" for s in shares) if per_expert
                else f"{min(shares):>5.1f} {max(shares):>5.1f}")
        lines.append(row)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moetrain.evaluate",
        description="Loss, perplexity, bits per byte and expert loads of a checkpoint over a "
                    "data set (default: the checkpoint's validation data). One process or "
                    "torchrun.")
    parser.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR",
                        help="a checkpoints/step_XXXXXXXX directory, or a run directory (its "
                             "newest complete checkpoint)")
    parser.add_argument("--data", metavar="PATH",
                        help="file, glob or directory (hub: a dataset name); default: the "
                             "checkpoint's validation data")
    parser.add_argument("--source", choices=("text", "json", "parquet", "synthetic", "hub"),
                        help="how to read --data (default: from its extension, or its files' "
                             "in a directory or glob: .json/.jsonl json, .parquet parquet, else "
                             "text)")
    parser.add_argument("--split", help="hub split (default: validation)")
    parser.add_argument("--column", help="text column (default: the checkpoint's)")
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the "
                                            "checkpoint's)")
    parser.add_argument("--seq-len", type=int, help="tokens per block (default: the "
                                                    "checkpoint's)")
    parser.add_argument("--batch-size", type=int,
                        help="blocks per forward (default: the checkpoint's micro_batch_size)")
    parser.add_argument("--max-batches", type=int, help="evaluate the first N batches only "
                                                        "(default: all)")
    parser.add_argument("--ep", type=int, help="expert-parallel degree under torchrun "
                                               "(default: the checkpoint's)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Everything that can fail on bad input is checked before the process group starts."""
    from moetrain.checkpoint import find_checkpoint, load_run_config
    for name in ("batch_size", "max_batches", "ep"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise ValueError(f"--json {args.json!r}: its directory does not exist")
    if str(args.checkpoint).startswith("hf:"):
        loaded = load_for_evaluation(args.checkpoint, args.ep)
        run_cfg = loaded.cfg
    else:
        run_cfg = load_run_config(find_checkpoint(args.checkpoint))
        loaded = None
    data_cfg = eval_data_config(run_cfg.data, args.data, args.source, args.split, args.column,
                                args.tokenizer, args.seq_len)
    blocks, tokenizer = eval_blocks(data_cfg, run_cfg.model.vocab_size,
                                    run_cfg.model.max_seq_len, own_validation=args.data is None,
                                    trained_seq_len=run_cfg.data.seq_len)
    if loaded is None:
        loaded = load_for_evaluation(args.checkpoint, args.ep)
    batch_size = args.batch_size or run_cfg.train.micro_batch_size
    result = evaluate(loaded.model, blocks, batch_size, module=loaded.module,
                      token_bytes=token_byte_lengths(tokenizer), max_batches=args.max_batches)
    described = (f"{data_cfg.source} {args.data}" if args.data is not None
                 else f"the checkpoint's validation data ({data_cfg.source})")
    header = {"checkpoint": loaded.checkpoint, "data": described,
              "blocks": f"{len(blocks):,} of {data_cfg.seq_len} + 1 tokens, batch size "
                        f"{batch_size}, tokenizer {data_cfg.tokenizer}",
              "ranks": f"{loaded.world} (ep {loaded.cfg.parallel.ep})" if loaded.world > 1
              else "1"}
    report = {"checkpoint": loaded.checkpoint, "data": described, "source": data_cfg.source,
              "tokenizer": data_cfg.tokenizer, "seq_len": data_cfg.seq_len,
              "batch_size": batch_size, "world_size": loaded.world, **result.to_dict()}
    if loaded.rank == 0:
        print(format_report(result, header), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


# The data errors name the trainer's settings; here the user typed these flags
FLAGS = {"data.val_path=": "--data ", "data.column=": "--column ", "data.tokenizer=":
         "--tokenizer ", "data.seq_len=": "--seq-len ", "data.source=": "--source "}


def as_flags(message: str) -> str:
    for setting, flag in FLAGS.items():
        message = message.replace(setting, flag)
    return message


def main(argv=None) -> int:
    """The command line: 0, or 2 with one line on stderr for bad input (on every rank)."""
    args = parse_args(argv)
    joined_here = not dist.is_initialized()
    try:
        run(args)
    except ValueError as error:
        print(f"moetrain.evaluate: error: {as_flags(str(error))}", file=sys.stderr, flush=True)
        return 2
    finally:
        # While the interpreter is whole: gloo's threads can abort its teardown
        # (pytorch/pytorch#179291, as in moetrain.train).
        if joined_here and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
