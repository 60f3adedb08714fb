"""Offline real text for the benchmarks: the running interpreter's standard library.

The corpus is the ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``,
read as bytes (a byte-level vocabulary of 256, no tokenizer, no download).

The split is by *file* and fixed: a file's split depends only on the SHA-1 of
its path relative to the stdlib root, so it never changes between runs, seeds
or machines with the same Python version:

* ``val``  (10% of files): the split every reported validation loss uses;
* ``tune`` (5%): the only split thresholds may be tuned on;
* ``train`` (85%).

Within a split, files are concatenated in SHA-1 order (a deterministic
shuffle, so a byte cap samples many packages rather than the alphabetically
first ones) until the split's byte cap is reached.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SPLITS = ("train", "tune", "val")
_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def split_of(relpath: str) -> str:
    """The fixed split of a stdlib file, from its relative path.

    >>> split_of("json/decoder.py") in SPLITS
    True
    >>> split_of("json/decoder.py") == split_of("json/decoder.py")
    True
    """
    bucket = int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % 20
    if bucket < 2:
        return "val"
    if bucket == 2:
        return "tune"
    return "train"


def stdlib_files(root: Optional[Path] = None) -> list[str]:
    """Relative paths of the stdlib ``.py`` files (no site-packages), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"stdlib directory {root} not found; pass root= explicitly")
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts) or not p.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


@dataclass
class Corpus:
    """Byte tensors (uint8) per split plus where they came from."""

    train: torch.Tensor
    tune: torch.Tensor
    val: torch.Tensor
    root: str
    files: dict  # split -> number of files read
    sha256: dict  # split -> digest of the bytes (identifies the corpus in results)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {name!r})")
        return getattr(self, name)

    def describe(self) -> dict:
        return {
            "source": f"CPython stdlib .py files under {self.root}",
            "bytes": {s: int(self.split(s).numel()) for s in SPLITS},
            "files": dict(self.files),
            "sha256": dict(self.sha256),
            "split_rule": "sha1(relative path) % 20: 0-1 val, 2 tune, 3-19 train",
        }


def load_corpus(
    max_bytes: dict, root: Optional[Path] = None
) -> Corpus:
    """Read the stdlib sources into per-split byte tensors, each capped at
    ``max_bytes[split]`` bytes (files are cut at the cap).

    >>> c = load_corpus({"train": 20000, "tune": 5000, "val": 5000})
    >>> c.train.dtype, c.train.numel()
    (torch.uint8, 20000)
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in stdlib_files(root):
        by_split[split_of(rel)].append(rel)
    tensors, files, digests = {}, {}, {}
    for s in SPLITS:
        cap = int(max_bytes[s])
        order = sorted(by_split[s], key=lambda r: hashlib.sha1(r.encode("utf-8")).hexdigest())
        chunks, total, n = [], 0, 0
        for rel in order:
            if total >= cap:
                break
            data = (root / rel).read_bytes()[: cap - total]
            chunks.append(data)
            total += len(data)
            n += 1
        blob = b"".join(chunks)
        if len(blob) < 2:
            raise ValueError(f"split {s!r} is empty under {root}; is this a full CPython install?")
        tensors[s] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        files[s] = n
        digests[s] = hashlib.sha256(blob).hexdigest()
    return Corpus(tensors["train"], tensors["tune"], tensors["val"], str(root), files, digests)


def random_batch(
    data: torch.Tensor, batch: int, block: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``block`` bytes and their next-byte targets.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = random_batch(torch.arange(100, dtype=torch.uint8), 2, 8, g)
    >>> bool((y[:, :-1] == x[:, 1:]).all())
    True
    """
    hi = data.numel() - block - 1
    if hi <= 0:
        raise ValueError(f"split of {data.numel()} bytes is too small for block {block}")
    start = torch.randint(0, hi, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(block + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def fixed_windows(data: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced windows: the same evaluation set for every run."""
    hi = data.numel() - block - 1
    if hi <= 0:
        raise ValueError(f"split of {data.numel()} bytes is too small for block {block}")
    start = torch.linspace(0, hi, n).long()
    idx = start[:, None] + torch.arange(block + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]
