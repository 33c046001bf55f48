"""A real corpus with no download: the running Python's standard library sources
(`data=python_stdlib`).

Every `.py` file under `sysconfig.get_paths()["stdlib"]` (site-packages excluded; the test
suite included: real code, docstrings and comments, about 30 MB for CPython 3.11), one document
per file, in sorted order of relative path. A file goes to validation when a hash of its
relative path falls in the first `data.val_fraction` of the hash range: the split depends only
on the path, so it is the same on every machine, every rank and every run, and no file is in
both splits. Files that are not UTF-8 (a few test fixtures) are left out and counted.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


@dataclass
class StdlibSplit:
    names: list[str]  # relative paths, sorted
    texts: list[str]
    skipped: int  # files that are not UTF-8

    @property
    def bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts)


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the sources, sorted; a clear error where there are none (some
    distributions ship only byte-compiled files)."""
    root = root or stdlib_root()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if not EXCLUDED_DIRS & set(p.relative_to(root).parts))
    if not names:
        raise ValueError(f"data=python_stdlib: no .py source files under {root} (this Python "
                         f"{sys.version.split()[0]} ships without its standard library "
                         "sources); use data=synthetic or data=local_text data.path=...")
    return names


def load_split(split: str, val_fraction: float, root: Path | None = None) -> StdlibSplit:
    """The documents of `split` ("train" or "validation")."""
    root = root or stdlib_root()
    want_val = split != "train"
    names, texts, skipped = [], [], 0
    for name in stdlib_files(root):
        if is_validation(name, val_fraction) != want_val:
            continue
        try:
            texts.append((root / name).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped += 1
            continue
        names.append(name)
    if not texts:
        raise ValueError(f"data=python_stdlib: the {split} split is empty (data.val_fraction="
                         f"{val_fraction}); use a fraction in (0, 1)")
    return StdlibSplit(names, texts, skipped)


def describe(train: StdlibSplit, val: StdlibSplit) -> str:
    return (f"data: python_stdlib of Python {sys.version.split()[0]} ({stdlib_root()}): "
            f"{len(train.names):,} files, {train.bytes / 1e6:.1f} MB train / "
            f"{len(val.names):,} files, {val.bytes / 1e6:.1f} MB validation"
            + (f"; {train.skipped + val.skipped} non-UTF-8 files left out"
               if train.skipped + val.skipped else ""))
