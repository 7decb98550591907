"""``python -m runners.run [-m] [group=option ...] [key=value ...]``: prune + evaluate -> result record.

Every job of the command line (all combinations of a ``-m`` sweep) is composed and validated before
any model weights are loaded (runners/cli.py); bad input gives one ``prunelab: error: ...`` line and exit code 2.
One run, top to bottom (:func:`execute`): its ids; an existing record reused; the dense baseline; the prune step
(runners/pruning.py) or a kept pruned model (runners/prune_cache.py); the evaluation suite (evaluators/suite.py);
the record (runners/results.py: assembled; runners/record.py: ids, locks, atomic writes).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import models
from evaluators import suite
from evaluators.speed import speedup

from . import prune_cache, pruning, tracking
from .cli import fail, prevalidate, with_model_defaults
from .identity import run_identity, scoped
from .record import (
    dense_config,
    find_record,
    prune_config,
    prune_fingerprint,
    prune_id,
    read_record,
    reuse,
    run_id,
    run_lock,
    write_atomic,
)
from .results import DENSE_PATTERN, assemble, pattern_section, record_dense, shot_recorder
from .reuse import Reuse
from .summary import summary
from .validate import ConfigError, Plan, check_local_data, check_writable, validate

log = logging.getLogger("prunelab")


def _timed(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(now - start, 3)
    return now


def _speed_wanted(cfg: DictConfig, plan: Plan) -> bool:
    mode = str(cfg.speed.mode)
    return mode == "always" or (mode == "auto" and (plan.pattern.removes_units or plan.pattern.kind == "rowcol")
                                and plan.pruner.removes_weights and not cfg.engine.get("onload"))


def _load(cfg: DictConfig, plan: Plan):
    try:
        return models.load(cfg.model, plan.device, onload=bool(cfg.engine.get("onload")))
    except ValueError as err:  # weights that do not fit the config (models.loading.check_loading_info)
        if str(err).startswith(("model.", "engine.onload")):
            raise ConfigError(str(err)) from None
        raise


def execute(cfg: DictConfig, plan: Plan | None = None, write: bool = True, _locked: bool = False) -> dict:
    """Run one experiment in-process and return its record (also written unless ``write=False``).

    A run whose id is already recorded (this sweep, or another sweep under ``output_root``) is not
    recomputed unless ``force=true``. With ``dense_baseline=true`` a pruning run first evaluates the
    unpruned model, once per (model, eval config), and records it as the ``dense`` run.

    Pruning and evaluation are separate steps: a pruning run keeps its pruned model (``save_model`` or the
    ``cache_pruned`` cache, runners/prune_cache.py), and a run with the same prune id (the same weights,
    another evaluation) loads it instead of calibrating and pruning, and records ``pruned_from`` with the
    pruning-side facts of the run that pruned them. ``force=true`` prunes again.

    A run computes holding ``<run folder>/.lock`` (:func:`runners.record.run_lock`): a second process of the same
    run id (two identical sweeps into one folder) waits for the first, then reuses its record.
    """
    plan = plan or validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    prunes = plan.pruner.removes_weights
    try:  # every auto resolved, checkpoint and data hashed, versions: what the ids cover besides the config
        ident = run_identity(cfg, plan)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    rid = run_id(config, prunes=prunes, calibrates=plan.calibrates, identity=ident)
    pid = prune_id(config, calibrates=plan.calibrates, identity=ident) if prunes else None
    root, sweep = Path(cfg.output_root), str(cfg.sweep)
    out_path = root / sweep / rid / "result.json"
    dense_cfg = dense_config(config)
    dense_rid = run_id(dense_cfg, prunes=False, calibrates=False, identity=ident)
    dense_found = find_record(root, sweep, dense_rid) if write and prunes and cfg.dense_baseline else None
    if dense_found is not None and dense_found.parent.parent != root / sweep:  # the baseline of another sweep
        reuse(dense_found, root / sweep / dense_rid / "result.json", cfg, write)
    want_dense = write and prunes and bool(cfg.dense_baseline) and dense_found is None
    if write and not cfg.force:
        found = find_record(root, sweep, rid)
        # an intermediate shot's record (eval.shots_every) has no shrink and no speed: a run that wants them computes
        # (and an onloaded run has no speed: a run that wants it computes, engine.onload being no part of the run id)
        kept = read_record(found) if found is not None else None
        if found is not None and not ((kept.get("shot_of") and (plan.pattern.kind == "rowcol" or _speed_wanted(cfg, plan)))
                                      or (_speed_wanted(cfg, plan) and not kept.get("metrics", {}).get("speed"))):
            return reuse(found, out_path, cfg, write)
    if write and not _locked:  # one process computes a run id; another waits, then finds its record above
        def waiting(holder):
            log.warning("%s is being computed by %s: waiting for its record", rid, holder)

        with run_lock(out_path.parent, on_wait=waiting):
            return execute(cfg, plan, write, _locked=True)

    check_local_data(cfg, plan)  # texts that cannot serve: one line, before any record, dataset or model
    timings: dict = {}
    t_start = t = time.perf_counter()
    try:  # lm-eval's tasks before the model: a task that cannot be loaded fails first
        task_dict = suite.zeroshot_tasks(cfg.eval, plan.zeroshot_tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if task_dict is not None:
        t = _timed(timings, "zeroshot_tasks", t)
    pruning.set_determinism(int(cfg.seed))
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(plan.device))
    kept = None  # a kept pruned model of this prune id: evaluate it instead of pruning
    if write and prunes and not cfg.force and not cfg.engine.get("onload"):  # (onloaded: never the whole model)
        dtype = str(models.loading.torch_dtype(cfg.model.get("dtype", "auto"), plan.device)).replace("torch.", "")
        kept = prune_cache.find(root, pid, dtype, plan.device)
    speed_wanted = _speed_wanted(cfg, plan)
    loaded = None
    if kept is None or want_dense or speed_wanted:  # the unpruned model: to prune, or for the dense numbers
        loaded = _load(cfg, plan)
        t = _timed(timings, "load", t)
    if want_dense:
        record_dense(cfg, plan, loaded, task_dict, dense_cfg, dense_rid, ident, timings["load"])
        t = time.perf_counter()
    dense_speed = None
    if speed_wanted:  # the dense model's speed, in this process, for a like-for-like ratio
        dense_speed = suite.speed(cfg.speed, loaded.model, plan.device, int(cfg.seed))
        t = _timed(timings, "speed/dense", t)

    info, sweep_cache = None, None
    if kept is None:  # calibration, allocation, the method, and what it did to the model
        on_shot = shot_recorder(cfg, plan, config, loaded, ident, out_path, task_dict, timings) if write else None
        sweep_cache = Reuse(root, float(cfg.reuse_cache_max_mb), bool(cfg.reuse_cache)) if write else None
        pruned = pruning.prune(cfg, plan, loaded, timings, on_shot,
                               run_dir=out_path.parent if write and prunes else None, prune_id=pid or "",
                               reuse=sweep_cache, identity=ident)
        if prunes:
            info = prune_cache.meta(pid, run_id=rid, sweep=sweep, record=out_path, source=loaded.source,
                                    device=plan.device, prune_config=prune_config(config, plan.calibrates),
                                    prune_fingerprint=prune_fingerprint(plan.pruner.name), sparsity=pruned.sparsity,
                                    structure=pruned.structure, method_losses=pruned.method_losses,
                                    calibration=pruned.calibration, timings=timings)
    else:  # the pruned weights of an earlier run: no calibration, no pruning
        loaded, t = None, time.perf_counter()  # (drop the dense model, if the baseline or the speed ratio needed it)
        loaded = prune_cache.load(cfg.model, kept, plan.device)
        _timed(timings, "load_pruned", t)
        info = kept.meta
        pruned = pruning.Pruned(info["sparsity"], info.get("structure"), info.get("calibration"),
                                info.get("method_losses") or {})
        log.info("pruned weights from %s (%s): not pruning", kept.path, kept.kind)
    saved, kept_at = prune_cache.keep(cfg, loaded, info, kept, out_path.parent, pid, timings) if write else (None, None)
    pruning.set_determinism(int(cfg.seed))  # the evaluation starts alike whether this run pruned or loaded the weights
    metrics = suite.evaluate(cfg.eval, loaded, plan.protocols, plan.eval_seqlen, plan.device, plan.zeroshot_tasks,
                             task_dict, timings, progress=bool(cfg.progress), out_dir=out_path.parent if write else None)
    t = time.perf_counter()
    if dense_speed is not None:
        pruned_speed = suite.speed(cfg.speed, loaded.model, plan.device, int(cfg.seed))
        metrics["speed"] = {"dense": dense_speed, "pruned": pruned_speed, "speedup": speedup(dense_speed, pruned_speed)}
        t = _timed(timings, "speed/pruned", t)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    pattern = pattern_section(plan.pattern, plan.allocation) if prunes else DENSE_PATTERN
    record = assemble(cfg, config, rid, loaded, plan.pruner.name, pattern, pruned.sparsity, metrics, timings,
                      plan.device, pruned.calibration, pruned.method_losses, pid,
                      identity=scoped(ident, "run" if prunes else "dense"))
    if pruned.structure is not None:
        record["structure"] = pruned.structure
    if sweep_cache is not None and sweep_cache.events:  # what this run took from the sweep cache (runners/reuse.py)
        record["reuse"] = dict(sweep_cache.events)
    if saved is not None:
        record["saved_model"] = saved
    if prunes:
        record["kept_pruned"] = kept_at  # where these pruned weights are kept (None: not kept)
    if kept is not None:
        record["model"] = {"name": cfg.model.name, **kept.meta["model"]}  # the model that was pruned
        record["pruned_from"] = prune_cache.pruned_from(kept)
    if write:
        try:
            write_atomic(out_path, record)
        except OSError as err:  # disk full, permissions changed meanwhile: keep the numbers, say so in one line
            print(json.dumps({"run_id": rid, "metrics": record["metrics"], "sparsity": record["sparsity"]["overall"]},
                             default=str), file=sys.stderr)
            raise ConfigError(f"output_root={cfg.output_root}: the record {out_path} could not be written "
                              f"({err.strerror or err}); its metrics are printed above") from None
        record["path"] = str(out_path)
        tracking.log_run(record, cfg)
    record["status"] = "computed"
    return record


def run_task(cfg: DictConfig) -> None:
    """Hydra's task function: one job. A plain module attribute, so that launchers can pickle it."""
    try:
        plan = validate(cfg)
    except ConfigError as err:
        fail(str(err))
    try:
        check_writable(cfg)
        record = execute(cfg, plan)
    except ConfigError as err:
        fail(str(err))
    print(summary(record), flush=True)


hydra_entry = hydra.main(version_base="1.3", config_path="../conf", config_name="config")(run_task)


def main() -> None:
    try:
        argv, added = with_model_defaults(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    if added:  # (before Hydra reads the command line: the record's overrides show them)
        sys.argv[1:] = argv
        print(f"prunelab: {' '.join(added)} (the model's group_defaults; choose another on the command line)",
              file=sys.stderr)
    error = prevalidate(sys.argv[1:])
    if error:
        fail(error)
    try:
        hydra_entry()
    except KeyboardInterrupt:  # one line, not a traceback: what is kept and how to go on
        print("prunelab: interrupted: every finished run's record is kept (a run is recorded whole or not at all); "
              "run the same command again to compute only the rest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
