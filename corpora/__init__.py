"""Text sources -> token windows for calibration and perplexity (with provenance).

Sources:
- ``bundled``: the public-domain Austen corpus shipped in ``corpora/austen/{train,validation,test}.txt``
  (regenerate with ``python -m corpora.build_corpus``);
- ``text``: any local UTF-8 text file;
- ``wikitext2``, ``ptb``, ``c4``: the hub datasets, loaded through ``datasets`` exactly as the
  SparseGPT / Wanda reference code does (docs/evaluation.md §1.1, docs/methods.md §1.5). ``dataset_root`` (optional) points at an
  offline mirror: hub id ``org/name`` is then read from ``<dataset_root>/org/name``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

BUNDLED_DIR = Path(__file__).resolve().parent / "austen"

# Hub datasets as the reference implementations load them (docs/evaluation.md §1.1, docs/methods.md §1.5).
HUB = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "field": "text"},
    "ptb": {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "field": "sentence"},
    "c4": {
        "path": "allenai/c4",
        "field": "text",
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    },
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokens_digest(tokens: torch.Tensor) -> str:
    """Short digest of token ids, recorded so that two runs can prove they saw the same windows."""
    return _sha256(tokens.to(torch.int64).contiguous().numpy().tobytes())[:16]


def bundled_path(split: str) -> Path:
    path = BUNDLED_DIR / f"{split}.txt"
    if not path.exists():
        raise FileNotFoundError(f"bundled corpus split '{split}' not found at {path}")
    return path


def check_text_path(path: str | None) -> Path:
    if not path:
        raise FileNotFoundError("a local text source needs a path (e.g. calib.path=train.txt)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return p


def hub_documents(source: str, split: str, dataset_root: str | None = None) -> tuple[list[str], dict]:
    """Documents of a hub dataset split, plus provenance. Needs the hub (or ``dataset_root``)."""
    import datasets

    spec = HUB[source]
    path = spec["path"] if not dataset_root else str(Path(dataset_root).expanduser() / spec["path"])
    kwargs = {}
    if "data_files" in spec:
        kwargs["data_files"] = {split: spec["data_files"][split]}
    ds = datasets.load_dataset(path, spec.get("name"), split=split, **kwargs)
    docs = list(ds[spec["field"]])
    provenance = {"dataset": path, "config": spec.get("name"), "split": split, **kwargs,
                  "fingerprint": getattr(ds, "_fingerprint", None)}
    return docs, provenance


def read_text(source: str, split: str = "train", path: str | None = None) -> tuple[str, dict]:
    """Whole text of a local source (bundled split or a text file), plus provenance."""
    p = bundled_path(split) if source == "bundled" else check_text_path(path)
    data = p.read_bytes()
    prov = {"source": source, "path": str(p), "sha256": _sha256(data)}
    if source == "bundled":
        prov["split"] = split
    return data.decode("utf-8"), prov


_TOKEN_CACHE: dict = {}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once into a 1-D tensor (the tokenizer's own BOS handling applies, as in SparseGPT).

    Cached per (tokenizer, text) within the process, so a multirun tokenizes each corpus once.
    """
    key = (getattr(tokenizer, "name_or_path", None), len(tokenizer), _sha256(text.encode("utf-8")))
    if key not in _TOKEN_CACHE:
        if len(_TOKEN_CACHE) > 8:
            _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return _TOKEN_CACHE[key]


@dataclass
class Windows:
    """Fixed-length token windows ``[n, seqlen]`` and where they came from."""

    ids: torch.Tensor
    provenance: dict


def sample_windows_from_stream(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """SparseGPT's ``get_wikitext2`` sampler: ``random.seed(seed)``; start ``~ randint(0, T - seqlen - 1)``."""
    if tokens.numel() <= seqlen + 1:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one calibration window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts]), starts


def sample_windows_from_documents(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int):
    """SparseGPT's ``get_c4`` sampler: pick random documents longer than ``seqlen`` tokens, then a random window."""
    rng = random.Random(seed)
    windows, picks = [], []
    for _ in range(nsamples):
        for _attempt in range(100_000):
            i = rng.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i])["input_ids"]
            if len(enc) > seqlen:
                break
        else:
            raise ValueError(f"no document longer than {seqlen} tokens")
        j = rng.randint(0, len(enc) - seqlen - 1)
        windows.append(torch.tensor(enc[j : j + seqlen], dtype=torch.long))
        picks.append((i, j))
    return torch.stack(windows), picks


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int,
                        path: str | None = None, dataset_root: str | None = None) -> Windows:
    """Calibration data as each reference samples it (docs/methods.md §1.5), with provenance."""
    if source == "c4":
        docs, prov = hub_documents("c4", "train", dataset_root)
        ids, picks = sample_windows_from_documents(tokenizer, docs, nsamples, seqlen, seed)
        positions = picks
    else:
        if source == "wikitext2":
            docs, prov = hub_documents("wikitext2", "train", dataset_root)
            text = " ".join(docs)  # SparseGPT joins the train split with a space
        elif source in ("bundled", "text"):
            text, prov = read_text(source, "train", path)
        else:
            raise ValueError(f"unknown calibration source '{source}'")
        ids, positions = sample_windows_from_stream(tokenize_text(tokenizer, text), nsamples, seqlen, seed)
    provenance = {
        "source": source, **prov, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
        "positions_sha256": _sha256(repr(positions).encode())[:16], "tokens_sha256": tokens_digest(ids),
    }
    return Windows(ids, provenance)
