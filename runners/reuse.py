"""What a sweep's runs can share, cached by content hash (docs/usage.md §1, "Reuse across a sweep").

``<output_root>/.reuse/<kind>/<key>.pt``, where the key hashes everything the value depends on:

- ``calibration_windows``: the tokenised calibration windows and their provenance (tokenizer content, the data's
  provenance, nsamples, seqlen, seed, library versions, the sampling code): every sweep point of a model and a
  calibration set tokenises and samples them once;
- ``owl_outliers``: OWL's per-block outlier ratios (a dense pass over the whole model: the model's identity, the
  windows' tokens, OWL's M, the targeted linears, the engine's statistics dtype and batch size, the code that
  computes them including the family's adapter): every sparsity ratio and lambda of a sweep reuses them.

Bounded (``reuse_cache_max_mb``: least recently used entries go first), off with ``reuse_cache=false``, cleared by
``python -m runners.reuse clear <output_root>`` (or deleting the folder). A run's record lists what it reused
(``reuse: {kind: hit | miss}``). Values are written to a temporary name and renamed: a killed run leaves no
half-written entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

FOLDER = ".reuse"


def content_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Reuse:
    """The cache of one output root; ``events`` records this run's hits and misses by kind."""

    def __init__(self, root: str | Path, max_mb: float, enabled: bool = True):
        self.folder, self.max_bytes, self.enabled = Path(root) / FOLDER, max_mb * 2**20, enabled
        self.events: dict[str, str] = {}

    def get_or_compute(self, kind: str, parts: dict, compute: Callable[[], object]):
        """The cached value of ``kind`` for ``parts``, or ``compute()`` stored under them."""
        if not self.enabled:
            return compute()
        path = self.folder / kind / f"{content_key({'kind': kind, **parts})}.pt"
        if path.is_file():
            try:
                value = torch.load(path, weights_only=True)["value"]
                os.utime(path)  # (least recently used goes first)
            except Exception:  # (unreadable, or trimmed by another run meanwhile: computed again and stored)
                pass
            else:
                self.events[kind] = "hit"
                return value
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"value": value, "parts": json.loads(json.dumps(parts, default=str))}, tmp)
        os.replace(tmp, path)
        self.events[kind] = "miss"
        self.trim()
        return value

    def trim(self) -> None:
        """Least recently used entries out until the cache fits ``max_mb``."""
        sizes = {}
        for entry in self.folder.glob("*/*.pt"):
            try:  # (another run of the sweep may trim at the same time)
                stat = entry.stat()
            except FileNotFoundError:
                continue
            sizes[entry] = (stat.st_mtime, stat.st_size)
        total = sum(size for _, size in sizes.values())
        for entry in sorted(sizes, key=lambda e: sizes[e][0]):
            if total <= self.max_bytes:
                break
            total -= sizes[entry][1]
            entry.unlink(missing_ok=True)


def code_digest(files: tuple[str, ...]) -> str:
    """The content of the repository files a cached value is computed by (a change there: a new key)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for rel in files:  # (repository-relative, or absolute: an adapter's own file)
        digest.update(Path(rel).name.encode() + b"\0" + (root / rel).read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's content (a fast tokenizer's serialised model and settings), not its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps({"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())[:50000]},
                          default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.reuse", description="the sweep-reuse cache")
    parser.add_argument("action", choices=["clear", "show"])
    parser.add_argument("output_root", nargs="?", default="outputs")
    args = parser.parse_args(argv)
    folder = Path(args.output_root) / FOLDER
    entries = sorted(folder.glob("*/*.pt"))
    if args.action == "show":
        for entry in entries:
            print(f"{entry.parent.name}/{entry.name}  {entry.stat().st_size / 2**20:.1f} MB")
        print(f"{len(entries)} entries, {sum(e.stat().st_size for e in entries) / 2**20:.1f} MB in {folder}")
    else:
        for entry in entries:
            entry.unlink()
        print(f"removed {len(entries)} entries from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
