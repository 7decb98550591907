"""The result records a run writes (docs/architecture.md §5), assembled here: its own (:func:`assemble`), the dense
baseline (``dense_baseline``, :func:`record_dense`) and the intermediate shots of a multi-shot method
(``eval.shots_every``, :func:`shot_recorder`). Part of the code fingerprint (runners/record.py: SHARED_CODE): a
change to what a record holds changes the run ids."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from evaluators import suite
from pruners.accounting import sparsity_section
from pruners.masks import Pattern

from . import tracking
from .identity import scoped
from .record import (
    code_version,
    device_info,
    find_record,
    library_versions,
    peak_memory,
    prune_id,
    run_id,
    run_lock,
    write_atomic,
)
from .validate import Plan

log = logging.getLogger("prunelab")


def assemble(cfg, config: dict, rid: str, loaded, pruner: str, pattern: dict, sparsity: dict,
            metrics: dict, timings: dict, device: str, calibration=None, method_losses=None, pid=None,
            identity=None) -> dict:
    """A result record (docs/architecture.md §5): what ran, on what, what it measured, with its provenance."""
    return {
        "schema": 1,
        "run_id": rid,
        # what the id covers besides the config: resolved device type / dtype / attention, checkpoint and data
        # content, library versions (runners/identity.py)
        "identity": identity,
        "prune_id": pid,  # what determines the pruned weights (runners/record.py: prune_id); None: dense
        "sweep": str(cfg.sweep),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.model.name, **loaded.source},
        "pruner": pruner,
        "pattern": pattern,
        "sparsity": sparsity,
        "method_losses": method_losses or {},
        "metrics": metrics,
        "timings_s": timings,
        "memory": peak_memory(device),
        "calibration": calibration,
        "seed": int(cfg.seed),
        "device": device_info(device),
        "versions": library_versions(),
        # source_digest (whole tree) + fingerprint (what the run id covers) + prune_fingerprint (the prune id)
        "code": code_version(pruner),
        "config": config,
    }


def pattern_section(pattern, allocation) -> dict:
    """A pruning run's ``pattern`` (:class:`pruners.masks.Pattern`; the allocation where not uniform)."""
    section = {"kind": pattern.kind, "ratio": pattern.ratio, "n": pattern.n, "m": pattern.m, "label": pattern.describe()}
    if not allocation.is_default:
        section["allocation"] = allocation.describe()
    return section


DENSE_PATTERN = {"kind": "dense", "ratio": 0.0, "n": None, "m": None, "label": "dense"}


def shot_recorder(cfg: DictConfig, plan: Plan, config: dict, loaded, ident: dict, out_path: Path, task_dict,
                  timings: dict):
    """With ``eval.shots_every=k``: a callback that evaluates the model after every k-th shot of a multi-shot method
    and records it as the run it equals, ``sparsity.ratio = t S / T`` with ``pruner.shots = t`` (the linear
    schedule's first t shots), unless that run is already recorded. None without ``shots_every``."""
    every = int(cfg.eval.get("shots_every") or 0)
    if not every:
        return None
    start = time.perf_counter()
    root, sweep = Path(cfg.output_root), str(cfg.sweep)

    def on_shot(shot: int, shots: int, calibration) -> None:
        if shot % every:
            return
        derived = copy.deepcopy(config)
        derived["sparsity"]["ratio"] = round(plan.pattern.ratio * shot / shots, 12)
        derived["pruner"]["shots"] = shot
        rid = run_id(derived, prunes=True, calibrates=plan.calibrates, identity=ident)
        path = root / sweep / rid / "result.json"
        if not cfg.force and find_record(root, sweep, rid) is not None:
            return
        before = sum(timings.get(k, 0.0) for k in ("calibration_data", "allocation"))  # (timed on their own)
        shot_timings = {"prune": round(time.perf_counter() - start - on_shot.eval_s - before, 3)}
        t = time.perf_counter()
        metrics = suite.evaluate(cfg.eval, loaded, plan.protocols, plan.eval_seqlen, plan.device, plan.zeroshot_tasks,
                                 task_dict, shot_timings, tag=f"shot {shot}/{shots} ", progress=bool(cfg.progress),
                                 out_dir=path.parent)
        on_shot.eval_s += time.perf_counter() - t  # (not pruning time, for this record or the run's)
        shot_plan = dataclasses.replace(plan, pattern=Pattern(plan.pattern.kind, derived["sparsity"]["ratio"]))
        pattern = {"kind": shot_plan.pattern.kind, "ratio": shot_plan.pattern.ratio, "n": None, "m": None,
                   "label": shot_plan.pattern.describe()}
        sparsity = sparsity_section(loaded.adapter, shot_plan.pattern, shot_plan.allocation, True)
        record = assemble(cfg, derived, rid, loaded, plan.pruner.name, pattern, sparsity, metrics, shot_timings,
                          plan.device, calibration, None, prune_id(derived, calibrates=plan.calibrates, identity=ident),
                          identity=scoped(ident, "run"))
        record["shot_of"] = {"shot": shot, "shots": shots, "run_id": out_path.parent.name}
        write_atomic(path, record)
        record["path"] = str(path)
        log.info("shot %d/%d recorded: %s", shot, shots, path)
        tracking.log_run(record, cfg)

    on_shot.eval_s = 0.0
    return on_shot


def record_dense(cfg: DictConfig, plan: Plan, loaded, task_dict, dense_cfg: dict, dense_rid: str, ident: dict,
                 load_s: float) -> dict | None:
    """Evaluate the unpruned ``loaded`` model and record it as this run's ``dense`` baseline (before pruning it),
    holding the baseline's run lock: a parallel job of the sweep computing the same baseline is waited for, and
    its record kept (returns None then)."""
    root, sweep = Path(cfg.output_root), str(cfg.sweep)
    path = root / sweep / dense_rid / "result.json"

    def waiting(holder):
        log.warning("dense baseline %s is being computed by %s: waiting for its record", dense_rid, holder)

    with run_lock(path.parent, on_wait=waiting):
        if find_record(root, sweep, dense_rid) is not None:
            return None
        timings = {"load": load_s}
        metrics = suite.evaluate(cfg.eval, loaded, plan.protocols, plan.eval_seqlen, plan.device, plan.zeroshot_tasks,
                                 task_dict, timings, tag="dense ", progress=bool(cfg.progress), out_dir=path.parent)
        timings = {k.removeprefix("dense "): v for k, v in timings.items()}
        timings.update(prune=0.0, total=round(sum(timings.values()), 3))
        sparsity = sparsity_section(loaded.adapter, plan.pattern, plan.allocation, prunes=False)
        record = assemble(cfg, dense_cfg, dense_rid, loaded, "dense", DENSE_PATTERN, sparsity, metrics, timings,
                          plan.device, identity=scoped(ident, "dense"))
        write_atomic(path, record)
    record["path"] = str(path)
    log.info("dense baseline recorded: %s", path)
    tracking.log_run(record, cfg)
    return record
