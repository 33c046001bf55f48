"""Hugging Face `datasets` input: load, tokenize, pack into blocks of seq_len + 1, shard by rank.

Every rank loads and tokenizes the same data (datasets caches it) and keeps its own shard of
block indices; nothing here talks to other ranks. The read position is part of the state, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import array
import codecs
import contextlib
import glob
import itertools
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
        raise ValueError(f"{field}={path!r} is an empty directory" if os.path.isdir(path) else
                         f"{field}={path!r} does not exist (no file matches)")
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        raise ValueError(f"{field}={path!r}: {folders[0]} is a directory, not a text file "
                         "(name the files, e.g. a glob like dir/*.txt)")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"{field}={path!r}: {empty[0]} is empty")
    return files


# datasets reads these as UTF-8 text; parquet is binary, and says itself what is wrong
TEXT_SOURCES = ("text", "json")


def _unreadable(files: list[str], field: str, path: str, source: str, error: Exception) -> str:
    """One line naming the file datasets could not read, and why."""
    decoder = codecs.getincrementaldecoder("utf-8")
    for name in files if source in TEXT_SOURCES else []:
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


def source_name(cfg: DataConfig, split: str) -> tuple[str, object]:
    """(the setting that names this split's data, its value), for error messages."""
    if cfg.source == "synthetic":
        return ("data.synthetic_docs", cfg.synthetic_docs) if split == "train" else (
            "data.synthetic_val_docs", cfg.synthetic_val_docs)
    if cfg.source == "hub":
        return "data.path", f"{cfg.path} split {cfg.split if split == 'train' else cfg.val_split}"
    if cfg.source == "python_stdlib":
        return "data.source", cfg.source
    return ("data.path", cfg.path) if split == "train" else ("data.val_path", cfg.val_path)


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
        try:
            ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=name,
                                       streaming=cfg.streaming)
        except Exception as error:  # no network, no such dataset, config or split
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"data.path={cfg.path!r} (data.source='hub', split {name!r}) "
                             f"could not be loaded: {type(error).__name__}: {reason}") from None
    else:
        field, path = source_name(cfg, split)
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
    field, path = source_name(cfg, split)
    with _read_errors(cfg, split):
        columns = ds.column_names or list(_first_row(ds, field, path).keys())
        if cfg.column not in columns:
            raise ValueError(f"data.column={cfg.column!r} is not a column of {field}={path!r}; "
                             f"columns: {columns}")
        kind = _column_kind(ds, cfg.column, field, path)
    if kind not in ("string", "large_string"):
        raise ValueError(f"data.column={cfg.column!r} of {field}={path!r} holds {kind}, not "
                         f"text; columns: {columns}")
    return ds


def _first_row(ds, field: str, path) -> dict:
    for row in ds:
        return row
    raise ValueError(f"{field}={path!r} holds no rows")


@contextlib.contextmanager
def _read_errors(cfg: DataConfig, split: str):
    """A streamed dataset reads its files while it is iterated, so a bad byte or row shows up
    there (possibly hours in): one line naming the data and the cause, not datasets' traceback."""
    try:
        yield
    except Exception as error:
        if type(error) is ValueError:
            raise  # ours, already one line
        raise ValueError(_read_error(cfg, split, error)) from None


def _read_error(cfg: DataConfig, split: str, error: Exception) -> str:
    field, path = source_name(cfg, split)
    if cfg.source in ("synthetic", "python_stdlib", "hub"):
        cause = error.__cause__ or error
        return f"{field}={path!r}: reading it failed ({type(cause).__name__}: {cause})"[:400]
    return _unreadable(_local_files(path, field), field, path, cfg.source, error)


def _column_kind(ds, column: str, field: str, path) -> str:
    """The column's datasets dtype ('string' for text); a streamed dataset that does not
    declare its features is judged by its first row."""
    feature = ds.features.get(column) if ds.features else None
    if feature is not None:
        return getattr(feature, "dtype", type(feature).__name__)
    value = _first_row(ds, field, path)[column]
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
        self._order, self._order_epoch = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of blocks, drawn once per epoch (a million blocks take ~0.1 s)."""
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._order, self._order_epoch = torch.randperm(len(self.blocks), generator=g), epoch
        return self._order

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
        of global batches of this many blocks; and what the position is a position in."""
        return {"epoch": self.epoch, "steps_in_epoch": self.micro_in_epoch // self.grad_accum,
                "global_batch": self.global_batch, **self._corpus()}

    def _corpus(self) -> dict:
        return {"blocks": len(self.blocks), "block_len": self.blocks.shape[1], "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_same_corpus(state, self._corpus())
        saved = state.get("global_batch", self.global_batch)
        if saved != self.global_batch:  # the same step would start at another block
            raise ValueError(
                f"the checkpoint read its data in global batches of {saved} blocks, this run's "
                f"are {self.global_batch} (ranks x train.grad_accum {self.grad_accum} x "
                f"train.micro_batch_size {self.micro_batch_size}); resume with a global batch "
                f"of {saved}, e.g. another train.micro_batch_size")
        self.epoch = state["epoch"]
        self.micro_in_epoch = state["steps_in_epoch"] * self.grad_accum


class Packer:
    """Cuts a stream of documents, each followed by the end-of-document token, into blocks of
    `block` tokens (as `pack` does in memory). `pending()`: the tokens read but not yet handed
    out, which a resumed packer starts from."""

    def __init__(self, tokenizer, column: str, block: int, pending: list[int] = ()):
        self.tokenizer, self.column, self.block = tokenizer, column, block
        self._buffer, self._start = list(pending), 0  # tokens before _start are handed out

    def pending(self) -> list[int]:
        return self._buffer[self._start:]

    def blocks(self, ds):
        """One pass over `ds`: its blocks, in order."""
        block = self.block
        for example in ds:
            self._buffer.extend(self.tokenizer.encode(example[self.column] or ""))
            self._buffer.append(self.tokenizer.eos_id)
            while len(self._buffer) - self._start >= block:
                row = self._buffer[self._start:self._start + block]
                self._start += block
                yield torch.tensor(row, dtype=torch.long)
            del self._buffer[:self._start]  # once per document: linear in its length
            self._start = 0


def packed_stream(ds, column: str, tokenizer, block: int):
    """One pass over a stream of documents: blocks of `block` tokens, in order."""
    return Packer(tokenizer, column, block).blocks(ds)


def check_same_corpus(saved: dict, now: dict) -> None:
    """A read position means nothing in other blocks: refuse to resume into them. (Older
    checkpoints lack these keys and are taken as they are.)"""
    what = {"block_len": "data.seq_len + 1", "seed": "data.seed",
            "blocks": "training blocks"}
    for key, value in now.items():
        if key in saved and saved[key] != value:
            hint = ("to train these weights on other data, start a run with init_from=<the "
                    "checkpoint>" if key == "blocks" else
                    f"resume with {what[key]} = {saved[key]}")
            raise ValueError(f"this run's data differs from the checkpoint's ({what[key]}: "
                             f"{saved[key]} there, {value} here), so its read position would "
                             f"point into other data; {hint}")


class StreamingBlocks:
    """Stream documents (datasets' split_dataset_by_node gives each rank its own share), pack
    on the fly, each pass over the share an epoch.

    The state is where the stream stands: datasets' own position (`IterableDataset.state_dict`,
    just after the document being packed), that document's tokens not yet handed out, the epoch
    and the blocks consumed. Resuming seeks there, as torchtitan's loaders do, instead of
    reading and tokenizing everything before it again (hours per billion tokens). The first
    block is read when this is built, so data that yields none on this rank, or cannot be read
    at all, fails before the run starts."""

    def __init__(self, ds, cfg: DataConfig, tokenizer, batch_size: int, rank: int, world: int):
        self.source, self.cfg, self.tokenizer, self.batch_size = ds, cfg, tokenizer, batch_size
        self.rank, self.world = rank, world
        self.consumed, self.epoch = 0, 0
        self.ds = None  # this pass's share of the stream, once reading starts
        self._packer = None  # and its packer
        self._resume = None  # (stream position, pending tokens) the next pass starts from
        self._iter = self._blocks()
        with _read_errors(cfg, "train"):
            if next(packed_stream(self._share(), cfg.column, tokenizer, cfg.seq_len + 1),
                    None) is None:
                raise self._no_block()

    def _share(self):
        from datasets.distributed import split_dataset_by_node
        return split_dataset_by_node(self.source, rank=self.rank, world_size=self.world)

    def _no_block(self) -> ValueError:
        field, path = source_name(self.cfg, "train")
        return ValueError(f"{field}={path!r} yields no block of {self.cfg.seq_len + 1} tokens "
                          f"(data.seq_len {self.cfg.seq_len} + 1) on rank {self.rank} of "
                          f"{self.world}")

    def _blocks(self):
        while True:
            self.ds, produced = self._share(), 0
            resumed, self._resume = self._resume, None
            self._packer = Packer(self.tokenizer, self.cfg.column, self.cfg.seq_len + 1,
                                  () if resumed is None else resumed[1])
            if resumed is not None:
                self.ds.load_state_dict(resumed[0])
            for produced, row in enumerate(self._packer.blocks(self.ds), 1):
                yield row
            if produced == 0 and resumed is None:
                raise self._no_block()
            self.epoch += 1

    def next_batch(self) -> torch.Tensor:
        with _read_errors(self.cfg, "train"):
            rows = [next(self._iter) for _ in range(self.batch_size)]
        self.consumed += self.batch_size
        return torch.stack(rows)

    def state_dict(self) -> dict:
        stream = None if self.ds is None else self.ds.state_dict()
        pending = [] if self._packer is None else self._packer.pending()
        return {"consumed": self.consumed, "world": self.world,
                "block_len": self.cfg.seq_len + 1, "epoch": self.epoch, "stream": stream,
                "tokens": torch.tensor(pending, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        check_same_corpus(state, {"block_len": self.cfg.seq_len + 1})
        saved = state.get("world", self.world)
        if saved != self.world:  # each rank's share of the stream depends on the world size
            raise ValueError(f"the checkpoint streamed its data on {saved} ranks, this run "
                             f"has {self.world}; streaming data resumes on {saved} ranks only")
        self.epoch = state.get("epoch", 0)
        self._resume = (None if state.get("stream") is None
                        else (state["stream"], state["tokens"].tolist()))
        self._iter, self.consumed = self._blocks(), 0
        if "stream" not in state:  # a checkpoint from before stream positions: read up to it
            with _read_errors(self.cfg, "train"):
                for _ in range(state["consumed"]):
                    next(self._iter)
        self.consumed = state["consumed"]


# A streamed validation source is read up to this many blocks (it may never end)
STREAMED_VAL_BLOCKS = 256


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
    val_blocks = None
    if val_ds is not None:
        if cfg.streaming:  # its first blocks, each once
            with _read_errors(cfg, "validation"):
                rows = list(itertools.islice(packed_stream(val_ds, cfg.column, tokenizer,
                                                           cfg.seq_len + 1), STREAMED_VAL_BLOCKS))
            val_blocks = torch.stack(rows) if rows else torch.empty(0, cfg.seq_len + 1)
        else:
            val_blocks = tokenize_and_pack(val_ds, cfg, tokenizer)
        if len(val_blocks) == 0:
            field, path = source_name(cfg, "validation")
            raise ValueError(f"{field}={path!r} holds fewer than {cfg.seq_len + 1} tokens "
                             f"(data.seq_len {cfg.seq_len} + 1): no validation block")
    if cfg.streaming:
        if val_ds is None and rank == 0:
            print("NOTE: a streamed run holds out no validation data (data.val_fraction cuts "
                  "in-memory data only); name some with data.val_path (data.val_split on the "
                  "hub) to log val_loss", flush=True)
        return StreamingBlocks(train_ds, cfg, tokenizer, batch_size, rank, world), val_blocks
    blocks = tokenize_and_pack(train_ds, cfg, tokenizer)
    field, path = source_name(cfg, "train")
    if len(blocks) == 0:
        raise ValueError(f"{field}={path!r} holds fewer than {cfg.seq_len + 1} tokens "
                         f"(data.seq_len {cfg.seq_len} + 1)")
    if not (blocks != tokenizer.eos_id).any():
        raise ValueError(f"{field}={path!r} holds no text: every document in "
                         f"data.column={cfg.column!r} is empty")
    if val_blocks is None and cfg.val_fraction > 0:
        n_val = max(1, int(len(blocks) * cfg.val_fraction))
        blocks, val_blocks = blocks[:-n_val], blocks[-n_val:]
    return ShardedBlocks(blocks, batch_size, grad_accum, rank, world, cfg.seed), val_blocks
