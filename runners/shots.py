"""The records a run writes besides its own (docs/architecture.md §5): the dense baseline (``dense_baseline``),
and the intermediate shots of a multi-shot method (``eval.shots_every``)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from evaluators import suite
from pruners.accounting import sparsity_section
from pruners.masks import Pattern

from . import tracking
from .identity import scoped
from .record import DENSE_PATTERN, assemble, find_record, prune_id, run_id, run_lock, write_atomic
from .validate import Plan

log = logging.getLogger("prunelab")


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
                                 task_dict, shot_timings, tag=f"shot {shot}/{shots} ", progress=bool(cfg.progress))
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
                                 task_dict, timings, tag="dense ", progress=bool(cfg.progress))
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
