"""What a run id covers besides the config: every ``auto`` resolved, the checkpoint's and the data's identity,
and the library versions that change numbers (docs/architecture.md §5.1).

:func:`run_identity` is computed before any weights are read (from the checkpoint's config, file sizes and
hashes) and stored in the record as ``identity``; :func:`runners.record.run_id`, :func:`~runners.record.prune_id`
and the report's cell key (:func:`runners.record.cell_key`) hash it in place of the config's unresolved keys
(``device``, ``model.dtype``, ``model.attn_implementation``):

- ``resolved``: the device *type* (``cpu``, ``cuda``: ``cuda:0`` and ``cuda:1`` run the same experiment), the
  torch dtype (``auto`` = float16 on CUDA, float32 on CPU) and the attention implementation transformers
  actually uses (``null`` = its own choice, read off an empty model built on the meta device);
- ``checkpoint``: a local checkpoint's content (sha256 of its files: weights, config, tokenizer; for a GGUF
  model the ``.gguf`` file), a hub checkpoint's resolved commit (``revision`` as asked otherwise);
- ``data``: the content (sha256) of every local text the run reads (bundled corpus splits, ``calib.path``, local
  eval files, an offline dataset mirror under ``dataset_root``, zero-shot ``include_path`` folders); a hub
  dataset without a mirror is named by id, config and files (its revision is not pinned by ``datasets``; the
  record's token digests still tell two runs' windows apart, and the report's cells use them);
- ``versions``: torch, transformers, tokenizers and datasets; lm_eval when the run evaluates zero-shot. They
  enter the id: upgrading one recomputes the runs it can change (and the report treats records of other
  versions as stale, like records of other code).

File hashes are cached per (path, size, mtime) in ``$PRUNELAB_CACHE`` (default ``~/.cache/prunelab``)
``/file-sha256.json``, so a 70B checkpoint is read once, not once per job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from .record import package_versions

# the result-config keys the identity replaces by their resolved value (dotted)
UNRESOLVED_KEYS = ("device", "model.dtype", "model.attn_implementation")
CHUNK = 1 << 24
SKIP_SUFFIXES = (".md",)
SKIP_NAMES = ("prunelab_pruned.json",)  # run metadata beside kept pruned weights (timestamps, paths)


def _cache_file() -> Path:
    return Path(os.environ.get("PRUNELAB_CACHE") or Path.home() / ".cache" / "prunelab") / "file-sha256.json"


@functools.lru_cache(maxsize=1)
def _disk_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk_cache(cache: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as handle:
            json.dump(cache, handle)
        os.replace(tmp, path)
    except OSError:  # a read-only home: hashes are recomputed next time, nothing else changes
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex), cached by (resolved path, size, mtime_ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _disk_cache()
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        cache[key] = digest.hexdigest()
        _save_disk_cache(cache)
    return cache[key]


def tree_sha256(path: str | Path, recursive: bool = False) -> str:
    """sha256 (16 hex) over the files of a folder (top level, or every level), names included; hidden files,
    ``*.md`` and run metadata left out. A file: its own hash."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)[:16]
    files = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and p.suffix not in SKIP_SUFFIXES and p.name not in SKIP_NAMES and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()[:16]


# --- resolved autos ------------------------------------------------------------------------------------------


def device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``: the device index does not change a number."""
    return str(device).split(":", 1)[0]


def resolved_dtype(model_cfg, device: str) -> str:
    from models.loading import torch_dtype

    return str(torch_dtype(model_cfg.get("dtype", "auto"), device)).replace("torch.", "")


def resolved_attn_implementation(model_cfg) -> str | None:
    """The attention implementation transformers uses for this checkpoint and ``model.attn_implementation``
    (null: its own default), read off an empty model on the meta device. ValueError when it refuses it."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from models.loading import inspect_model

    _, hf_config, _ = inspect_model(model_cfg)
    requested = model_cfg.get("attn_implementation") or None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation=requested,
                                                     trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    except (ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model.attn_implementation={requested}: {first}") from None
    return getattr(model.config, "_attn_implementation", None)


# --- checkpoint and data -------------------------------------------------------------------------------------


def checkpoint_identity(model_cfg) -> dict:
    """A local checkpoint's content hash (the GGUF file for a GGUF model), or a hub checkpoint's resolved commit;
    the tokenizer's likewise when ``model.tokenizer`` names another one."""
    from models.loading import inspect_model, resolve_path

    path, hf_config, _ = inspect_model(model_cfg)
    out = {"model_type": hf_config.model_type}
    local = Path(path)
    if local.is_dir():
        gguf = model_cfg.get("gguf_file")
        out["sha256"] = tree_sha256(local / gguf) if gguf else tree_sha256(local)
    else:
        out["hub"] = path
        out["revision"] = getattr(hf_config, "_commit_hash", None) or model_cfg.get("revision") or "unresolved"
    if model_cfg.get("tokenizer"):
        tok = resolve_path(model_cfg.tokenizer, "model.tokenizer")
        out["tokenizer"] = tree_sha256(tok) if Path(tok).is_dir() else tok
    return out


def _hub_identity(source: str, split: str, dataset_root: str | None) -> dict:
    import corpora

    spec = corpora.HUB[source]
    if dataset_root:
        mirror = Path(dataset_root).expanduser() / spec["path"]
        if mirror.exists():
            return {"mirror": spec["path"], "sha256": tree_sha256(mirror, recursive=True)}
    out = {"hub": spec["path"], "config": spec.get("name"), "split": split}
    if "data_files" in spec:
        out["data_files"] = spec["data_files"][split]
    return out


def text_identity(source: str, split: str, path: str | None = None, dataset_root: str | None = None) -> dict:
    """The identity of one text a run reads: a local file's sha256, a hub dataset's name (or mirror's hash)."""
    import corpora

    if source == "bundled":
        return {"bundled": split, "sha256": file_sha256(corpora.bundled_path(split))[:16]}
    if source == "text":
        return {"text": Path(path).name, "sha256": file_sha256(corpora.check_text_path(path))[:16]}
    return _hub_identity(source, split, dataset_root)


def data_identity(cfg, plan) -> dict:
    """Per text the run reads: ``calib`` (when it calibrates), ``eval/<protocol>``, ``zeroshot/include_path``."""
    out = {}
    if plan.calibrates:
        source = str(cfg.calib.source)
        split = "train"
        out["calib"] = ({"generated": "by the checkpoint (calib.generate, calib.seed)"} if source == "generated" else
                        text_identity(source, split, cfg.calib.get("path"), cfg.calib.get("dataset_root")))
    for protocol in plan.protocols:
        out[f"eval/{protocol.name}"] = text_identity(protocol.source, protocol.split, protocol.path,
                                                     cfg.eval.ppl.get("dataset_root"))
    if plan.zeroshot_tasks:
        include = cfg.eval.zeroshot.get("include_path")
        for i, folder in enumerate([include] if isinstance(include, str) else list(include or [])):
            out[f"zeroshot/include_path[{i}]"] = tree_sha256(Path(folder).expanduser(), recursive=True)
    return out


def versions(cfg, plan) -> dict:
    """The library versions that can change this run's numbers."""
    names = ["torch", "transformers", "tokenizers", "datasets"]
    if plan.zeroshot_tasks:
        names.append("lm_eval")
    return package_versions(names)


def run_identity(cfg, plan) -> dict:
    """The ``identity`` section of a record (see the module docstring). ValueError for an attention
    implementation transformers refuses for this checkpoint."""
    return {
        "resolved": {"device": device_type(plan.device), "dtype": resolved_dtype(cfg.model, plan.device),
                     "attn_implementation": resolved_attn_implementation(cfg.model)},
        "checkpoint": checkpoint_identity(cfg.model),
        "data": data_identity(cfg, plan),
        "versions": versions(cfg, plan),
    }


def scoped(identity: dict | None, part: str) -> dict | None:
    """The identity a run id (``part="run"``), a dense baseline's id (``"dense"``: no calibration data), or a prune
    id (``"prune"``: no evaluation data, no lm_eval) covers."""
    if identity is None:
        return None
    data = dict(identity["data"])
    versions_ = dict(identity["versions"])
    if part in ("dense", "prune"):
        data = {k: v for k, v in data.items() if (k == "calib") == (part == "prune")}
    if part == "prune":
        versions_.pop("lm_eval", None)
    return {**identity, "data": data, "versions": versions_}


def strip_unresolved(config: dict) -> dict:
    """``config`` without the keys the identity holds resolved (:data:`UNRESOLVED_KEYS`)."""
    out = dict(config)
    out.pop("device", None)
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k not in ("dtype", "attn_implementation")}
    return out
