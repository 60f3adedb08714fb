"""Real text that is available offline: the CPython standard library's sources.

The running interpreter's own ``Lib/`` directory is the corpus, read as bytes
(byte-level tokens, vocabulary 256). Files are split into train / validation
/ tuning sets by a hash of their relative path, so the split is fixed across
machines and runs, and no file contributes to two sets.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

SPLITS = ("train", "val", "tune")


def stdlib_files() -> list[str]:
    """Sorted relative paths of the stdlib's .py files (tests and site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = rel_dir.split(os.sep)
        if parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            dirnames[:] = []
            continue
        dirnames.sort()
        out += [os.path.normpath(os.path.join(rel_dir, f)) for f in sorted(filenames) if f.endswith(".py")]
    if not out:
        raise RuntimeError(f"no .py files under the stdlib directory {root!r}")
    return out


def split_of(rel_path: str) -> str:
    """80% train, 10% validation, 10% tuning, by a stable hash of the path."""
    h = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) % 10
    return "val" if h == 0 else "tune" if h == 1 else "train"


def load_corpus(split: str, max_bytes: Optional[int] = None) -> torch.Tensor:
    """The bytes of one split as a uint8 tensor (first ``max_bytes`` if given).

    >>> val = load_corpus("val", max_bytes=10_000)
    >>> val.dtype, val.numel()
    (torch.uint8, 10000)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for rel in stdlib_files():
        if split_of(rel) != split:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    if max_bytes is not None:
        blob = blob[:max_bytes]
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


@dataclass
class Batches:
    """Random windows of a byte corpus; deterministic for a given seed."""

    data: torch.Tensor
    block_size: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data.numel() <= self.block_size + 1:
            raise ValueError("corpus is shorter than one block")
        self._gen = torch.Generator().manual_seed(self.seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        hi = self.data.numel() - self.block_size - 1
        starts = torch.randint(0, hi, (self.batch_size,), generator=self._gen)
        offs = torch.arange(self.block_size + 1)
        win = self.data[starts[:, None] + offs].long()
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def fixed(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` batches from a separate generator (same every call)."""
        g = torch.Generator().manual_seed(self.seed + 10_007)
        hi = self.data.numel() - self.block_size - 1
        offs = torch.arange(self.block_size + 1)
        out = []
        for _ in range(n_batches):
            starts = torch.randint(0, hi, (self.batch_size,), generator=g)
            win = self.data[starts[:, None] + offs].long()
            out.append((win[:, :-1].contiguous(), win[:, 1:].contiguous()))
        return out
