"""What a sweep's runs can share, cached by content hash (docs/usage.md §1, "Reuse across a sweep").

``<output_root>/.reuse/<kind>/<key>.pt``, where the key hashes everything the value depends on:

- ``calibration_windows``: the tokenised calibration windows and their provenance (tokenizer content, the data's
  provenance, nsamples, seqlen, seed, library versions, the sampling code): every sweep point of a model and a
  calibration set tokenises and samples them once;
- ``owl_outliers``: OWL's per-block outlier ratios (a dense pass over the whole model: the model's identity, the
  windows' tokens, OWL's M, the targeted linears, the engine's statistics dtype and batch size, the code that
  computes them including the family's adapter): every sparsity ratio and lambda of a sweep reuses them;
- ``structured_statistics``: a structured method's scoring pass (its reader statistics on the dense model, per block
  and unit kind: Numerical Pruning's Grams, FLAP's channel moments; the same keys as OWL's plus the units observed
  and the blocks; pruners/structured.py): every ratio and allocation of a sweep scores from one pass. Not kept for an
  onloaded model, nor when the statistics alone exceed the bound (``too large``: 7B Grams).

Block-0 inputs are not cached: they are an embedding lookup of the windows (milliseconds), cheaper than reading them.

Bounded (``reuse_cache_max_mb``: least recently used entries go first), off with ``reuse_cache=false``, cleared by
``python -m runners.reuse clear <output_root>`` (or deleting the folder). A run's record lists what it reused
(``reuse: {kind: hit | miss | too large}``). Values are written to a temporary name and renamed: a killed run leaves no
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

    def _path(self, kind: str, parts: dict) -> Path:
        return self.folder / kind / f"{content_key({'kind': kind, **parts})}.pt"

    def get(self, kind: str, parts: dict):
        """The cached value of ``kind`` for ``parts`` (a hit), or None."""
        if not self.enabled:
            return None
        path = self._path(kind, parts)
        if path.is_file():
            try:
                value = torch.load(path, weights_only=True)["value"]
                os.utime(path)  # (least recently used goes first)
            except Exception:  # (unreadable, or trimmed by another run meanwhile: computed again and stored)
                return None
            self.events[kind] = "hit"
            return value
        return None

    def put(self, kind: str, parts: dict, value) -> None:
        """Store ``value`` (a miss). A value larger than the whole bound is not stored (``too large``)."""
        if not self.enabled:
            return
        if tensor_bytes(value) > self.max_bytes:
            self.events[kind] = "too large"
            return
        path = self._path(kind, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"value": value, "parts": json.loads(json.dumps(parts, default=str))}, tmp)
        if tmp.stat().st_size > self.max_bytes:  # (the file's own overhead: the bound counts files, as trim does)
            tmp.unlink()
            self.events[kind] = "too large"
            return
        os.replace(tmp, path)
        self.events[kind] = "miss"
        self.trim()

    def get_or_compute(self, kind: str, parts: dict, compute: Callable[[], object]):
        """The cached value of ``kind`` for ``parts``, or ``compute()`` stored under them."""
        if not self.enabled:
            return compute()
        found = self.get(kind, parts)
        if found is not None:
            return found
        value = compute()
        self.put(kind, parts, value)
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


class Scoped:
    """The cache as one run sees it (``pruners.settings.SweepCache``): every key also holds ``base`` (the model's
    identity, the windows' tokens, the engine, the shared code); a ``code_files`` part is replaced by the files'
    content digest (a method's own code)."""

    def __init__(self, reuse: Reuse, base: dict):
        self.reuse, self.base = reuse, base

    @property
    def max_bytes(self) -> float:
        return self.reuse.max_bytes

    @property
    def events(self) -> dict[str, str]:
        return self.reuse.events

    def _parts(self, parts: dict) -> dict:
        out = {**self.base, **{k: v for k, v in parts.items() if k != "code_files"}}
        if parts.get("code_files"):
            out["code_files"] = code_digest(tuple(parts["code_files"]))
        return out

    def get(self, kind: str, parts: dict):
        return self.reuse.get(kind, self._parts(parts))

    def put(self, kind: str, parts: dict, value) -> None:
        self.reuse.put(kind, self._parts(parts), value)

    def get_or_compute(self, kind: str, parts: dict, compute: Callable[[], object]):
        return self.reuse.get_or_compute(kind, self._parts(parts), compute)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


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
