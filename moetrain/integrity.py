"""Checksums of a checkpoint's files: a manifest written last, verified before anything loads.

A checkpoint directory is only renamed into place after `manifest.json` is written, so a
published checkpoint always has one (checkpoints written before moetrain kept manifests are
loaded unverified, with a warning). The manifest names every file the save wrote, with its
size and SHA-256 (hashlib, ~1.5 GB/s with SHA extensions); verification re-reads them. Both
directions split the files over the ranks, so hashing costs about (checkpoint bytes / ranks)
per rank, once at save and once at load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 8 << 20


class CheckpointInvalid(ValueError):
    """A checkpoint failed verification; the message names the checkpoint and the file."""


def file_digest(path: Path, sync: bool = False) -> dict:
    """{"bytes", "sha256"} of a file; with `sync`, its data is also forced to disk (the writer
    calls this right after writing, so the read comes from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
        if sync:
            os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def share(names: list[str], rank: int, world: int) -> list[str]:
    """This rank's part of a file list (every rank sees the same sorted list)."""
    return sorted(names)[rank::world]


def write_manifest(directory: Path, entries: dict[str, dict], step: int) -> None:
    """Written last, by one rank, once every other file of the checkpoint is complete."""
    body = json.dumps({"format": FORMAT, "step": step, "files": dict(sorted(entries.items()))},
                      indent=1)
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict | None:
    """The manifest's file table, or None for a checkpoint written before manifests.
    Raises CheckpointInvalid when it is present but unreadable."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not all(isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                   for v in files.values()):
            raise KeyError("sha256/bytes")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointInvalid(f"{path} is unreadable or not a moetrain manifest") from None
    return files


def check_files(directory: Path, files: dict[str, dict], names: list[str]) -> str | None:
    """The first problem among `names` (a subset of the manifest's files), or None.
    Sizes are checked before any hashing, so a truncated file is found at the cost of a stat."""
    directory = Path(directory)
    for name in names:
        path, expected = directory / name, files[name]
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return (f"{path} has {path.stat().st_size} bytes, the manifest says "
                    f"{expected['bytes']} (truncated or overwritten)")
    for name in names:
        path = directory / name
        if file_digest(path)["sha256"] != files[name]["sha256"]:
            return f"{path} does not match its SHA-256 in {MANIFEST} (corrupted)"
    return None

