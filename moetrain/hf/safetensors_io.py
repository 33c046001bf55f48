"""Sharded safetensors, written one tensor at a time and read one slice at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. The format is a
JSON header (names, dtypes, shapes, byte offsets) followed by the raw bytes, so knowing every
shape up front is enough to write the header first and then stream each tensor in: the
exporting process holds one tensor (the one being written), whatever the model's size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Entry:
    """One tensor to write; `fetch()` returns it (called once, in write order)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fetch: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive runs of entries, each at most max_shard_bytes (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    return shards


def write_file(path: Path, entries: list[Entry]) -> None:
    header, offset = {}, 0
    for entry in entries:
        header[entry.name] = {"dtype": DTYPE_CODES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in entries:
            tensor = entry.fetch()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise AssertionError(f"{entry.name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"planned {entry.shape} {entry.dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(data.numpy().data)


def write_sharded(out_dir: Path, entries: list[Entry], max_shard_bytes: int) -> list[Path]:
    """model-0000N-of-0000M.safetensors files plus model.safetensors.index.json."""
    shards = plan_shards(entries, max_shard_bytes)
    paths, weight_map = [], {}
    for k, shard in enumerate(shards):
        path = Path(out_dir) / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(path, shard)
        paths.append(path)
        weight_map.update({entry.name: path.name for entry in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": dict(sorted(weight_map.items()))}
    (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


class ShardedReader:
    """Read tensors (or slices of them) by name from a transformers checkpoint directory."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, "pt") as f:
                weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise ValueError(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.directory, self.weight_map = directory, weight_map
        self._files = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, name: str, region: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor `name`, or only `region` of it (no more is read from disk)."""
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = safe_open(self.directory / file, "pt")
        tensor_slice = self._files[file].get_slice(name)
        return tensor_slice[region] if region else tensor_slice[:]
