"""Hugging Face `datasets` input: load, tokenize, pack into blocks of seq_len + 1, shard by rank.

Every rank loads and tokenizes the same data (datasets caches it) and keeps its own shard of
block indices; nothing here talks to other ranks. The read position is part of the state, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import array
import codecs
import glob
import os

import torch

from moetrain.config import DataConfig
from moetrain.data.synthetic import generate
from moetrain.data.tokenizer import ByteTokenizer, build_tokenizer


def _local_files(path: str, field: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if not f.startswith("."))
    else:
        files = sorted(glob.glob(path))
    if not files:
        raise ValueError(f"{field}={path!r} does not exist (no file matches)")
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        raise ValueError(f"{field}={path!r}: {folders[0]} is a directory, not a text file "
                         "(name the files, e.g. a glob like dir/*.txt)")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"{field}={path!r}: {empty[0]} is empty")
    return files


def _unreadable(files: list[str], field: str, path: str, source: str, error: Exception) -> str:
    """One line naming the file datasets could not read, and why."""
    decoder = codecs.getincrementaldecoder("utf-8")
    for name in files:
        offset, dec = 0, decoder()
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as bad:
                    return (f"{field}={path!r}: {name} is not UTF-8 text (invalid byte at "
                            f"offset {offset + bad.start}); data.source={source!r} reads "
                            "UTF-8 only")
                offset += len(chunk)
    cause = error.__cause__ or error
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return (f"{field}={path!r}: datasets could not read it as data.source={source!r} "
            f"({type(cause).__name__}: {reason[:200]})")


def load_texts(cfg: DataConfig, split: str):
    """A datasets.Dataset (IterableDataset when streaming) with column `cfg.column`, or None
    when the source has no such split."""
    import datasets
    datasets.disable_progress_bars()
    if cfg.source == "synthetic":
        count = cfg.synthetic_docs if split == "train" else cfg.synthetic_val_docs
        texts = generate(count, seed=cfg.seed if split == "train" else cfg.seed + 1_000_003)
        return datasets.Dataset.from_dict({cfg.column: texts})
    if cfg.source == "python_stdlib":
        from moetrain.data.stdlib import load_split
        return datasets.Dataset.from_dict(
            {cfg.column: load_split(split, cfg.val_fraction).texts})
    if cfg.source == "hub":
        name = cfg.split if split == "train" else cfg.val_split
        if name is None:
            return None
        ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=name, streaming=cfg.streaming)
    else:
        path, field = (cfg.path, "data.path") if split == "train" else (cfg.val_path,
                                                                       "data.val_path")
        if path is None:
            return None
        files = _local_files(path, field)
        # datasets' text builder splits files by line (default), paragraph or document
        options = {"sample_by": cfg.sample_by} if cfg.source == "text" else {}
        try:
            ds = datasets.load_dataset(cfg.source, data_files=files, split="train",
                                       streaming=cfg.streaming, **options)
        except Exception as error:  # datasets wraps the cause in a 100-line traceback
            raise ValueError(_unreadable(files, field, path, cfg.source, error)) from None
    columns = ds.column_names or list(next(iter(ds)).keys())
    if cfg.column not in columns:
        raise ValueError(f"data.column={cfg.column!r} is not a column of {cfg.path!r}; "
                         f"columns: {columns}")
    kind = _column_kind(ds, cfg.column)
    if kind not in ("string", "large_string"):
        raise ValueError(f"data.column={cfg.column!r} of {cfg.path!r} holds {kind}, not text; "
                         f"columns: {columns}")
    return ds


def _column_kind(ds, column: str) -> str:
    """The column's datasets dtype ('string' for text); a streamed dataset that does not
    declare its features is judged by its first row."""
    feature = ds.features.get(column) if ds.features else None
    if feature is not None:
        return getattr(feature, "dtype", type(feature).__name__)
    value = next(iter(ds))[column]
    return "string" if value is None or isinstance(value, str) else type(value).__name__


def pack(token_lists, eos_id: int, block: int) -> torch.Tensor:
    """Concatenate documents (each followed by eos) and cut into (n_blocks, block) rows."""
    flat = array.array("q")
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos_id)
    n = len(flat) // block
    if n == 0:
        return torch.empty(0, block, dtype=torch.long)
    return torch.frombuffer(flat, dtype=torch.int64)[:n * block].clone().view(n, block)


def tokenize_and_pack(ds, cfg: DataConfig, tokenizer) -> torch.Tensor:
    column = cfg.column
    if isinstance(tokenizer, ByteTokenizer):
        # The UTF-8 bytes are the tokens: the same blocks as `pack`, without a Python int
        # per byte (30 MB of text: ~1 s instead of ~10 s).
        eos = bytes([tokenizer.eos_id])
        flat = eos.join((text or "").encode("utf-8") for text in ds[column]) + eos
        ids = torch.frombuffer(bytearray(flat), dtype=torch.uint8).long()
        n = len(ids) // (cfg.seq_len + 1)
        return ids[:n * (cfg.seq_len + 1)].view(n, cfg.seq_len + 1)

    def token_lists(chunk=1024):  # tokenizers' threads encode a chunk of documents at once
        for start in range(0, len(ds), chunk):
            yield from tokenizer.encode_batch([t or "" for t in ds[start:start + chunk][column]])

    return pack(token_lists(), tokenizer.eos_id, cfg.seq_len + 1)


class ShardedBlocks:
    """Global batches, each split over ranks.

    Each epoch is a seeded permutation of all blocks, cut into global batches of
    micro_batch_size * grad_accum * world blocks; rank r reads its own contiguous slice of each
    global batch, one micro-batch at a time. The global batch of a step therefore does not
    depend on how it is split: a run resumed on another number of ranks (with the same global
    batch) continues on exactly the same tokens, and no two ranks read the same block in an
    epoch. The state is (epoch, micro-batches read in this epoch)."""

    def __init__(self, blocks: torch.Tensor, micro_batch_size: int, grad_accum: int, rank: int,
                 world: int, seed: int):
        self.per_rank = micro_batch_size * grad_accum
        self.global_batch = self.per_rank * world
        if len(blocks) < self.global_batch:
            raise ValueError(f"{len(blocks)} training blocks are fewer than one global batch "
                             f"({world} ranks x {grad_accum} x {micro_batch_size}): lower "
                             "train.micro_batch_size or data.seq_len, or add data")
        self.blocks, self.micro_batch_size, self.grad_accum = blocks, micro_batch_size, grad_accum
        self.rank, self.seed = rank, seed
        self.micro_batches_per_epoch = (len(blocks) // self.global_batch) * grad_accum
        self.epoch, self.micro_in_epoch = 0, 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks), generator=g)

    def next_batch(self) -> torch.Tensor:
        """(micro_batch_size, seq_len + 1) token ids."""
        if self.micro_in_epoch >= self.micro_batches_per_epoch:
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0
        step, micro = divmod(self.micro_in_epoch, self.grad_accum)
        start = step * self.global_batch + self.rank * self.per_rank + micro * self.micro_batch_size
        idx = self._permutation(self.epoch)[start:start + self.micro_batch_size]
        self.micro_in_epoch += 1
        return self.blocks[idx]

    def state_dict(self) -> dict:
        """Layout-independent: micro-batches are counted per rank, so store optimizer steps,
        of global batches of this many blocks."""
        return {"epoch": self.epoch, "steps_in_epoch": self.micro_in_epoch // self.grad_accum,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("global_batch", self.global_batch)
        if saved != self.global_batch:  # the same step would start at another block
            raise ValueError(
                f"the checkpoint read its data in global batches of {saved} blocks, this run's "
                f"are {self.global_batch} (ranks x train.grad_accum {self.grad_accum} x "
                f"train.micro_batch_size {self.micro_batch_size}); resume with a global batch "
                f"of {saved}, e.g. another train.micro_batch_size")
        self.epoch = state["epoch"]
        self.micro_in_epoch = state["steps_in_epoch"] * self.grad_accum


class StreamingBlocks:
    """Stream documents (datasets' split_dataset_by_node gives each rank its own share),
    pack on the fly. State = blocks consumed; resuming skips that many."""

    def __init__(self, ds, cfg: DataConfig, tokenizer, batch_size: int, rank: int, world: int):
        from datasets.distributed import split_dataset_by_node
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.cfg, self.tokenizer, self.batch_size, self.world = cfg, tokenizer, batch_size, world
        self.consumed, self.epoch = 0, 0
        self._iter = self._blocks()

    def _blocks(self):
        block = self.cfg.seq_len + 1
        while True:
            buffer, produced = [], 0
            for example in self.ds:
                buffer.extend(self.tokenizer.encode(example[self.cfg.column] or ""))
                buffer.append(self.tokenizer.eos_id)
                while len(buffer) >= block:
                    yield torch.tensor(buffer[:block], dtype=torch.long)
                    buffer = buffer[block:]
                    produced += 1
            if produced == 0:
                raise ValueError(f"data.path={self.cfg.path!r} yields no block of "
                                 f"{block} tokens on this rank")
            self.epoch += 1

    def next_batch(self) -> torch.Tensor:
        rows = [next(self._iter) for _ in range(self.batch_size)]
        self.consumed += self.batch_size
        return torch.stack(rows)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("world", self.world)
        if saved != self.world:  # each rank's share of the stream depends on the world size
            raise ValueError(f"the checkpoint streamed its data on {saved} ranks, this run "
                             f"has {self.world}; streaming data resumes on {saved} ranks only")
        self._iter, self.consumed = self._blocks(), 0
        for _ in range(state["consumed"]):
            next(self._iter)
        self.consumed = state["consumed"]


def build_data(cfg: DataConfig, batch_size: int, rank: int, world: int, vocab_size: int,
               grad_accum: int = 1):
    """Returns (train source with next_batch/state_dict, validation blocks or None)."""
    tokenizer = build_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens (data.tokenizer={cfg.tokenizer!r})")
    if cfg.source == "python_stdlib":  # read once: the sizes printed are of these splits
        import datasets

        from moetrain.data import stdlib
        splits = [stdlib.load_split(name, cfg.val_fraction) for name in ("train", "validation")]
        if rank == 0:
            print(stdlib.describe(*splits), flush=True)
        train_ds, val_ds = (datasets.Dataset.from_dict({cfg.column: split.texts})
                            for split in splits)
    else:
        train_ds = load_texts(cfg, "train")
        val_ds = load_texts(cfg, "validation")
    val_blocks = tokenize_and_pack(val_ds, cfg, tokenizer) if val_ds is not None and \
        not cfg.streaming else None
    if cfg.streaming:
        if val_ds is not None:
            val_blocks = torch.stack([b for _, b in zip(range(256), StreamingBlocks(
                val_ds, cfg, tokenizer, 1, 0, 1)._blocks())])
        return StreamingBlocks(train_ds, cfg, tokenizer, batch_size, rank, world), val_blocks
    blocks = tokenize_and_pack(train_ds, cfg, tokenizer)
    if len(blocks) == 0:
        raise ValueError(f"data.path={cfg.path!r} holds fewer than {cfg.seq_len + 1} tokens")
    if not (blocks != tokenizer.eos_id).any():
        raise ValueError(f"data.path={cfg.path!r} holds no text: every document in "
                         f"data.column={cfg.column!r} is empty")
    if val_blocks is None and cfg.val_fraction > 0:
        n_val = max(1, int(len(blocks) * cfg.val_fraction))
        blocks, val_blocks = blocks[:-n_val], blocks[-n_val:]
    return ShardedBlocks(blocks, batch_size, grad_accum, rank, world, cfg.seed), val_blocks
