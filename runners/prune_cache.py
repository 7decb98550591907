"""Kept pruned models: prune once, evaluate as often as the eval config changes (docs/usage.md §1).

A run that prunes keeps its pruned model where a later run with the same prune id
(:func:`runners.record.prune_id`: model, calibration, pruner, sparsity, engine, seed, device and the pruning
code, not the evaluation) finds it:

- with ``save_model=true``, the saved model ``<output_root>/<sweep>/<run id>/model``;
- otherwise, if ``cache_pruned`` allows it (``auto``: models of at most ``cache_pruned_max_params``
  parameters; ``always``; ``never``), a cache ``<output_root>/.pruned/<prune id>/``.

Both are :func:`models.save_pruned` folders (weights, tokenizer and the structure file, so structurally
pruned models reload with their shapes) plus :data:`META_FILE`: the prune id and the pruning-side facts of
the run that pruned them (sparsity section, structure, method losses, calibration provenance, prune timings,
model source, the record it wrote). A folder is written to a temporary folder and renamed, so one that has
:data:`META_FILE` is complete. A run that finds one loads it instead of calibrating and pruning
(``force=true`` prunes again and replaces the cache).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

import models
from models.checkpoint import is_pruned_checkpoint
from models.onload import store_of

from .record import read_record, write_atomic

FORMAT = "prunelab-pruned/1"
META_FILE = "prunelab_pruned.json"
CACHE_DIR = ".pruned"  # under output_root, beside the sweeps
MODES = ("auto", "always", "never")
# pruning-side phase times copied into a reusing run's record (``pruned_from.timings_s``)
PRUNE_TIMINGS = ("calibration_data", "allocation", "prune")


@dataclass
class Kept:
    """A kept pruned model: its folder, ``cache`` or ``saved_model``, and its :data:`META_FILE`."""

    path: Path
    kind: str
    meta: dict


def cache_dir(output_root: Path | str, prune_id: str) -> Path:
    return Path(output_root) / CACHE_DIR / prune_id


def wants_cache(mode: str, max_params: int, parameters: int) -> bool:
    """Whether ``cache_pruned=mode`` keeps a pruned model of ``parameters`` parameters."""
    if mode not in MODES:
        raise ValueError(f"cache_pruned={mode} is not one of: {', '.join(MODES)}")
    return mode == "always" or (mode == "auto" and parameters <= max_params)


def meta(prune_id: str, *, run_id: str, sweep: str, record: Path, source: dict, device: str, prune_config: dict,
         prune_fingerprint: str, sparsity: dict, structure: dict | None, method_losses: dict,
         calibration: dict | None, timings: dict) -> dict:
    """The :data:`META_FILE` of a freshly pruned model."""
    return {"format": FORMAT, "prune_id": prune_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id, "sweep": sweep, "record": str(record), "model": source, "device": device,
            "prune_config": prune_config, "prune_fingerprint": prune_fingerprint, "sparsity": sparsity,
            "structure": structure, "method_losses": method_losses, "calibration": calibration,
            "timings_s": {k: timings[k] for k in PRUNE_TIMINGS if k in timings}}


def keep(cfg, loaded, info: dict | None, kept: Kept | None, run_dir: Path, prune_id: str | None, timings: dict
         ) -> tuple[str | None, str | None]:
    """Keep a run's pruned model before it is evaluated (a failed evaluation loses no pruning): ``save_model`` into
    ``<run folder>/model``, or else the ``cache_pruned`` cache when the run pruned it now (``kept`` None) and it is
    small enough. Returns (saved model folder, where the pruned weights are kept), each None where there is none."""
    t = time.perf_counter()
    kept_at = str(kept.path) if kept is not None else None
    if store_of(loaded.model).onloaded:  # pruned block by block into <run folder>/model already (models/onload.py)
        if kept is None and info is not None and (run_dir / "model").is_dir():
            write_atomic(run_dir / "model" / META_FILE, info)
            return str(run_dir / "model"), str(run_dir / "model")
        return None, kept_at
    if cfg.save_model and kept_at == str(run_dir / "model"):  # this run's own, its record lost
        return kept_at, kept_at
    if cfg.save_model:
        write(loaded, run_dir / "model", info, replace=True)
        timings["save_model"] = round(time.perf_counter() - t, 3)
        return str(run_dir / "model"), str(run_dir / "model")
    if kept is None and prune_id is not None and wants_cache(str(cfg.cache_pruned), int(cfg.cache_pruned_max_params),
                                                             loaded.source["parameters"]):
        kept_at = str(cache_dir(cfg.output_root, prune_id))
        write(loaded, kept_at, info, replace=True)
        timings["cache_pruned"] = round(time.perf_counter() - t, 3)
    return None, kept_at


def write(loaded, directory: Path | str, info: dict | None, replace: bool = True) -> bool:
    """Save ``loaded``'s model (and ``info`` as :data:`META_FILE`, unless None) into ``directory`` through a
    temporary folder renamed into place: never a half-written folder. An existing folder is replaced
    (``replace``) or kept; returns whether this call's folder is the one in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        models.save_pruned(loaded.model, loaded.tokenizer, tmp, loaded.adapter)
        if info is not None:
            write_atomic(tmp / META_FILE, info)
        if directory.exists() and replace:
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".old-{directory.name}-"))
            os.replace(directory, old)  # onto an empty folder: atomic on POSIX
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(directory)
        except OSError:  # another process put one there first (same prune id, same weights): keep that one
            if not directory.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _valid(path: Path, prune_id: str, dtype: str, device: str) -> dict | None:
    info = read_record(path / META_FILE)
    if not info or info.get("format") != FORMAT or info.get("prune_id") != prune_id or not is_pruned_checkpoint(path):
        return None
    # device=auto / dtype=auto resolve per machine: weights pruned in fp16 on a GPU do not stand for a CPU run
    if info.get("model", {}).get("dtype") != dtype or str(info.get("device", "")).split(":")[0] != device.split(":")[0]:
        return None
    return info


def find(output_root: Path | str, prune_id: str, dtype: str, device: str) -> Kept | None:
    """The kept pruned model of ``prune_id`` under ``output_root``, pruned in ``dtype`` on a ``device`` of this
    type: the cache first, then the saved models of every sweep; None if there is none."""
    root = Path(output_root)
    candidates = [(cache_dir(root, prune_id), "cache")]
    prefix = glob.escape(prune_id.rsplit("_", 1)[0])  # run ids share the <model>_<pruner>_<pattern> label
    candidates += [(p.parent, "saved_model") for p in sorted(root.glob(f"*/{prefix}_*/model/{META_FILE}"))]
    for path, kind in candidates:
        info = _valid(path, prune_id, dtype, device)
        if info is not None:
            return Kept(path, kind, info)
    return None


def load(model_cfg, kept: Kept, device: str):
    """Load a kept pruned model as :func:`models.load` loads ``model_cfg`` (dtype, attention implementation),
    from the kept folder (its own tokenizer, structure file and config)."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    cfg.update(path=str(kept.path.resolve()), revision=None, tokenizer=None, gguf_file=None)
    return models.load(OmegaConf.create(cfg), device)


def pruned_from(kept: Kept) -> dict:
    """The record's ``pruned_from`` section: where the weights came from and what pruning them cost."""
    m = kept.meta
    return {"prune_id": m["prune_id"], "kind": kept.kind, "path": str(kept.path), "record": m.get("record"),
            "run_id": m.get("run_id"), "sweep": m.get("sweep"), "created": m.get("created"),
            "timings_s": m.get("timings_s", {})}
