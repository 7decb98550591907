"""``python -m runners.run [-m] [group=option ...] [key=value ...]``: prune + evaluate -> result record.

Every job of the command line (all combinations of a ``-m`` sweep) is composed and validated before
any model weights are loaded; bad input gives one ``prunelab: error: ...`` line and exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import models
from evaluators.ppl import perplexity, protocol_windows
from evaluators.speed import measure_speed, speedup
from models.shrink import shrink_silent_units
from pruners.accounting import sparsity_section, structure_section, unit_counts
from pruners.masks import Pattern

from . import prune_cache, pruning, tracking
from .cli import prevalidate
from .identity import run_identity, scoped
from .record import (
    code_version,
    device_info,
    find_record,
    library_versions,
    peak_memory,
    prune_config,
    prune_fingerprint,
    prune_id,
    read_record,
    run_id,
    run_lock,
    write_atomic,
)
from .validate import CONF_DIR, ConfigError, Plan, check_local_data, check_writable, validate

log = logging.getLogger("prunelab")

def fail(message: str) -> None:
    print(f"prunelab: error: {message}", file=sys.stderr)
    sys.exit(2)


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # the SparseGPT reference disables TF32: it perturbs Cholesky / solves (docs/methods.md §12)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _timed(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(now - start, 3)
    return now


def _speed_wanted(cfg: DictConfig, plan: Plan) -> bool:
    mode = str(cfg.speed.mode)
    return mode == "always" or (mode == "auto" and (plan.pattern.removes_units or plan.pattern.kind == "rowcol")
                                and plan.pruner.removes_weights)


def _speed(cfg: DictConfig, model, device: str) -> dict:
    """The speed at ``speed.batch_size``; for a list of batch sizes, at the first, with every size's measurement
    under ``by_batch_size`` (``{"1": ..., "8": ...}``)."""
    sp = cfg.speed
    sizes = [int(b) for b in sp.batch_size] if OmegaConf.is_list(sp.batch_size) else [int(sp.batch_size)]
    runs = {str(b): measure_speed(model, device, b, int(sp.prompt_len), int(sp.new_tokens), int(sp.repeats),
                                  int(sp.warmup), seed=int(cfg.seed), threads=sp.get("threads")) for b in sizes}
    first = dict(runs[str(sizes[0])])
    if len(runs) > 1:
        first["by_batch_size"] = runs
    return first


def _save_model(loaded, directory: Path, info: dict | None = None) -> str:
    """Save the pruned model (structure file included, and ``info``: what later runs need to reuse it,
    runners/prune_cache.py) into ``directory``, via a temporary folder: a killed run never leaves a
    half-written model there."""
    prune_cache.write(loaded, directory, info, replace=True)
    return str(directory)


def _evaluate(cfg: DictConfig, plan: Plan, loaded, task_dict, timings: dict, tag: str = "") -> dict:
    """Every metric the eval config asks for, each with its protocol / provenance."""
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    metrics: dict = {"ppl": {}}
    t = time.perf_counter()
    for protocol in plan.protocols:
        ids, provenance = protocol_windows(tokenizer, protocol, plan.eval_seqlen, cfg.eval.ppl.get("dataset_root"),
                                           cfg.eval.ppl.get("max_windows"))
        key = f"{protocol.name}@{plan.eval_seqlen}"
        value = perplexity(model, adapter, ids, plan.device, int(cfg.eval.ppl.batch_size), cfg.eval.ppl.mode,
                           desc=f"{tag}ppl {key}", progress=bool(cfg.progress))
        metrics["ppl"][key] = {"value": value, "protocol": provenance}
        t = _timed(timings, f"{tag}eval/{key}", t)
    if plan.zeroshot_tasks:
        from evaluators import zeroshot  # lm-eval is imported only when it is used

        zs = cfg.eval.zeroshot
        options = {"batch_size": zs.batch_size, "limit": zs.get("limit"), "num_fewshot": int(zs.num_fewshot),
                   "max_length": plan.eval_seqlen}
        if zs.get("backend", "memory") == "cli":  # lm-eval's own command on the model saved to a temporary folder
            metrics["zeroshot"] = zeroshot.evaluate_zeroshot_cli(model, tokenizer, plan.zeroshot_tasks, plan.device,
                                                                 include_path=zs.get("include_path"),
                                                                 native_state=loaded.adapter.native_state, **options)
        else:
            metrics["zeroshot"] = zeroshot.evaluate_zeroshot(model, tokenizer, task_dict, plan.device, **options)
        _timed(timings, f"{tag}eval/zeroshot", t)
    return metrics


def _record(cfg: DictConfig, config: dict, rid: str, loaded, pruner: str, pattern: dict, sparsity: dict,
            metrics: dict, timings: dict, device: str, calibration=None, method_losses=None, pid=None,
            identity=None) -> dict:
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


DENSE_PATTERN = {"kind": "dense", "ratio": 0.0, "n": None, "m": None, "label": "dense"}


def dense_config(config: dict) -> dict:
    """The dense baseline's resolved config: this run's with the ``dense`` pruner."""
    dense = dict(config)
    dense["pruner"] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "pruner" / "dense.yaml"), resolve=True)
    return dense


def _reuse(found: Path, out_path: Path, cfg: DictConfig, write: bool) -> dict:
    """A run already recorded: skip it (same sweep) or copy its record into this sweep (another sweep)."""
    record = read_record(found)
    if found.resolve() == out_path.resolve():
        record["status"] = "skipped"
    else:
        record.update(sweep=str(cfg.sweep), reused_from=str(found))
        if write:
            write_atomic(out_path, record)
        record["status"] = "reused"
    record["path"] = str(out_path)
    return record


def _shot_recorder(cfg: DictConfig, plan: Plan, config: dict, loaded, ident: dict, out_path: Path, task_dict,
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
        metrics = _evaluate(cfg, plan, loaded, task_dict, shot_timings, tag=f"shot {shot}/{shots} ")
        on_shot.eval_s += time.perf_counter() - t  # (not pruning time, for this record or the run's)
        shot_plan = dataclasses.replace(plan, pattern=Pattern(plan.pattern.kind, derived["sparsity"]["ratio"]))
        pattern = {"kind": shot_plan.pattern.kind, "ratio": shot_plan.pattern.ratio, "n": None, "m": None,
                   "label": shot_plan.pattern.describe()}
        record = _record(cfg, derived, rid, loaded, plan.pruner.name, pattern,
                         sparsity_section(loaded.adapter, shot_plan.pattern, shot_plan.allocation, True), metrics, shot_timings, plan.device,
                         calibration, None, prune_id(derived, calibrates=plan.calibrates, identity=ident),
                         identity=scoped(ident, "run"))
        record["shot_of"] = {"shot": shot, "shots": shots, "run_id": out_path.parent.name}
        write_atomic(path, record)
        record["path"] = str(path)
        log.info("shot %d/%d recorded: %s", shot, shots, path)
        tracking.log_run(record, cfg)

    on_shot.eval_s = 0.0
    return on_shot


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
        _reuse(dense_found, root / sweep / dense_rid / "result.json", cfg, write)
    want_dense = write and prunes and bool(cfg.dense_baseline) and dense_found is None
    if write and not cfg.force:
        found = find_record(root, sweep, rid)
        # an intermediate shot's record (eval.shots_every) has no shrink and no speed: a run that wants them computes
        if found is not None and not (read_record(found).get("shot_of") and (
                plan.pattern.kind == "rowcol" or _speed_wanted(cfg, plan))):
            return _reuse(found, out_path, cfg, write)
    if write and not _locked:  # one process computes a run id; another waits, then finds its record above
        def waiting(holder):
            log.warning("%s is being computed by %s: waiting for its record", rid, holder)

        with run_lock(out_path.parent, on_wait=waiting):
            return execute(cfg, plan, write, _locked=True)

    check_local_data(cfg, plan)  # texts that cannot serve: one line, before any record, dataset or model
    timings: dict = {}
    t_start = t = time.perf_counter()
    task_dict = None
    if plan.zeroshot_tasks:  # datasets first: a task that cannot be loaded fails before the model is
        from evaluators.zeroshot import load_tasks

        zs = cfg.eval.zeroshot
        try:
            task_dict = load_tasks(plan.zeroshot_tasks, zs.get("include_path"), int(zs.num_fewshot))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        t = _timed(timings, "zeroshot_tasks", t)
    set_determinism(int(cfg.seed))
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(plan.device))
    kept = None  # a kept pruned model of this prune id: evaluate it instead of pruning
    if write and prunes and not cfg.force:
        dtype = str(models.loading.torch_dtype(cfg.model.get("dtype", "auto"), plan.device)).replace("torch.", "")
        kept = prune_cache.find(root, pid, dtype, plan.device)
    speed_wanted = _speed_wanted(cfg, plan)
    loaded = None
    if kept is None or want_dense or speed_wanted:  # the unpruned model: to prune, or for the dense numbers
        try:
            loaded = models.load(cfg.model, plan.device)
        except ValueError as err:  # weights that do not fit the config (models.loading.check_loading_info)
            if str(err).startswith("model."):
                raise ConfigError(str(err)) from None
            raise
        t = _timed(timings, "load", t)

    if want_dense:
        dense_timings = {"load": timings["load"]}
        metrics = _evaluate(cfg, plan, loaded, task_dict, dense_timings, tag="dense ")
        dense_timings = {k.removeprefix("dense "): v for k, v in dense_timings.items()}
        dense_timings.update(prune=0.0, total=round(sum(dense_timings.values()), 3))
        dense = _record(cfg, dense_cfg, dense_rid, loaded, "dense", DENSE_PATTERN,
                        sparsity_section(loaded.adapter, plan.pattern, plan.allocation, prunes=False), metrics, dense_timings, plan.device,
                        identity=scoped(ident, "dense"))
        dense_path = root / sweep / dense_rid / "result.json"
        write_atomic(dense_path, dense)
        dense["path"] = str(dense_path)
        log.info("dense baseline recorded: %s", dense_path)
        tracking.log_run(dense, cfg)
        t = time.perf_counter()

    structured = prunes and plan.pattern.removes_units
    dense_speed = None
    if speed_wanted:  # the dense model's speed, in this process, for a like-for-like ratio
        dense_speed = _speed(cfg, loaded.model, plan.device)
        t = _timed(timings, "speed/dense", t)
    structure, saved, info = None, None, None
    if kept is None:
        model, adapter = loaded.model, loaded.adapter
        before = unit_counts(model, adapter, plan.pattern.attention_only) if structured else None
        on_shot = _shot_recorder(cfg, plan, config, loaded, ident, out_path, task_dict, timings) if write else None
        pruned = pruning.prune(cfg, plan, loaded, timings, on_shot)  # calibration, allocation, the method
        if on_shot is not None and on_shot.eval_s:
            timings["prune"] = round(timings["prune"] - on_shot.eval_s, 3)
            timings["shot_evals"] = round(on_shot.eval_s, 3)
        module_results, ratios, calibration = pruned.module_results, pruned.ratios, pruned.calibration
        method_losses = {k: v.loss for k, v in module_results.items() if v.loss is not None}
        if structured:
            structure, sparsity = structure_section(model, adapter, plan.pattern, before, module_results)
        else:
            sparsity = sparsity_section(adapter, plan.pattern, plan.allocation, prunes)
            if sparsity.get("warning"):
                log.warning("%s", sparsity["warning"])
            if prunes:
                sparsity["allocation"] = ratios.to_record(plan.allocation) if ratios is not None else {"kind": "uniform"}
            if prunes and plan.pattern.kind == "rowcol":  # zeroed rows / columns that free whole units: cut out
                t, units_before = time.perf_counter(), adapter.unit_parameters()
                structure = shrink_silent_units(model, adapter)
                structure.update(unit_parameters_before=units_before, unit_parameters_after=adapter.unit_parameters(),
                                 unit_scope=adapter.unit_scope)
                structure["removed_fraction"] = round(1 - structure["unit_parameters_after"] / units_before, 6)
                t = _timed(timings, "shrink", t)
        if prunes:
            info = prune_cache.meta(pid, run_id=rid, sweep=sweep, record=out_path, source=loaded.source,
                                    device=plan.device, prune_config=prune_config(config, plan.calibrates),
                                    prune_fingerprint=prune_fingerprint(plan.pruner.name), sparsity=sparsity,
                                    structure=structure, method_losses=method_losses, calibration=calibration,
                                    timings=timings)
    else:  # the pruned weights of an earlier run: no calibration, no pruning
        loaded = None  # (the dense model, if the baseline or the speed ratio needed it)
        t = time.perf_counter()
        loaded = prune_cache.load(cfg.model, kept, plan.device)
        t = _timed(timings, "load_pruned", t)
        info = kept.meta
        sparsity, structure, calibration = info["sparsity"], info.get("structure"), info.get("calibration")
        method_losses = info.get("method_losses") or {}
        log.info("pruned weights from %s (%s): not pruning", kept.path, kept.kind)
    t = time.perf_counter()
    kept_at = str(kept.path) if kept is not None else None
    if write and cfg.save_model and kept_at == str(out_path.parent / "model"):  # this run's own, record lost
        saved = kept_at
    elif write and cfg.save_model:  # kept before evaluating: a failed evaluation loses no pruning
        saved = kept_at = _save_model(loaded, out_path.parent / "model", info)
        t = _timed(timings, "save_model", t)
    elif write and kept is None and prunes and prune_cache.wants_cache(
            str(cfg.cache_pruned), int(cfg.cache_pruned_max_params), loaded.source["parameters"]):
        directory = prune_cache.cache_dir(root, pid)
        prune_cache.write(loaded, directory, info, replace=True)
        kept_at = str(directory)
        t = _timed(timings, "cache_pruned", t)

    set_determinism(int(cfg.seed))  # the evaluation starts alike whether this run pruned or loaded the weights
    metrics = _evaluate(cfg, plan, loaded, task_dict, timings)
    t = time.perf_counter()
    if dense_speed is not None:
        pruned_speed = _speed(cfg, loaded.model, plan.device)
        metrics["speed"] = {"dense": dense_speed, "pruned": pruned_speed, "speedup": speedup(dense_speed, pruned_speed)}
        t = _timed(timings, "speed/pruned", t)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    pattern = ({"kind": plan.pattern.kind, "ratio": plan.pattern.ratio, "n": plan.pattern.n, "m": plan.pattern.m,
                "label": plan.pattern.describe(), **({"allocation": plan.allocation.describe()}
                                                     if prunes and not plan.allocation.is_default else {})}
               if prunes else DENSE_PATTERN)
    record = _record(cfg, config, rid, loaded, plan.pruner.name, pattern, sparsity, metrics, timings, plan.device,
                     calibration, method_losses, pid, identity=scoped(ident, "run" if prunes else "dense"))
    if structure is not None:
        record["structure"] = structure
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


def summary(record: dict) -> str:
    allocation = f" ({record['pattern']['allocation']})" if record["pattern"].get("allocation") else ""
    head = f"{record['model']['name']} | {record['pruner']}{allocation} | {record['pattern']['label']}"
    if record.get("status") == "skipped":
        return f"{head} | skipped: already recorded at {record['path']} (force=true recomputes)"
    ppl = ", ".join(f"{k} {v['value']:.2f}" for k, v in record["metrics"]["ppl"].items())
    zeroshot = record["metrics"].get("zeroshot")
    structure, speed = record.get("structure"), record["metrics"].get("speed")
    if structure and record["pattern"]["kind"] == "rowcol":  # zeroed rows / columns, then the silent units cut out
        head_line = (f"{head} | sparsity {record['sparsity']['overall']:.2%} of "
                     f"{record['sparsity']['prunable_parameters']:,} prunable weights | parameters "
                     f"{structure['parameters_before']:,} -> {structure['parameters_after']:,} "
                     f"({structure['parameters_after'] / structure['parameters_before'] - 1:+.1%}: silent units removed)")
    elif structure:
        head_line = (f"{head} | parameters {structure['parameters_before']:,} -> {structure['parameters_after']:,} "
                     f"({structure['parameters_after'] / structure['parameters_before'] - 1:+.1%}; "
                     f"{structure['unit_scope']} {-structure['removed_fraction']:+.1%} of "
                     f"{structure['unit_parameters_before']:,})")
    else:
        head_line = (f"{head} | sparsity {record['sparsity']['overall']:.2%} of "
                     f"{record['sparsity']['prunable_parameters']:,} prunable weights")
    warning = (record.get("sparsity") or {}).get("warning")
    lines = [
        head_line,
        *([f"  warning: {warning}"] if warning else []),
        *([f"  perplexity: {ppl}"] if ppl else []),  # (eval=none: no line)
        *(["  zero-shot: " + ", ".join(f"{k} {v['acc']:.4f}" for k, v in zeroshot["tasks"].items())
           + f" | average acc {zeroshot['average']['acc']:.4f}"] if zeroshot else []),
        *([_speed_line(speed)] if speed else []),
        f"  time: {_prune_time(record)}, total {record['timings_s']['total']:.1f}s | "
        f"peak host {record['memory']['peak_host_rss_mb']:.0f} MB",
        *([f"  pruned weights from {record['pruned_from']['path']} (not pruned again; force=true prunes)"]
          if record.get("pruned_from") else []),
        *([f"  saved model: {record['saved_model']}"] if record.get("saved_model") else []),
    ]
    if record.get("status") == "reused":
        lines.append(f"  reused from {record['reused_from']}")
    if "path" in record:
        lines.append(f"  record: {record['path']}")
    return "\n".join(lines)


def _prune_time(record: dict) -> str:
    if "prune" in record["timings_s"] or not record.get("pruned_from"):
        return f"prune {record['timings_s'].get('prune', 0.0):.1f}s"
    source = record["pruned_from"]
    return f"prune reused ({source['timings_s'].get('prune', 0.0):.1f}s in {source['run_id']})"


def _speed_line(speed: dict) -> str:
    d, p, x = speed["dense"], speed["pruned"], speed["speedup"]
    setup = p["setup"]
    return (f"  speed: decode {d['decode_ms_per_token']:.2f} -> {p['decode_ms_per_token']:.2f} ms/token "
            f"({x['decode']:.2f}x), prefill {d['prefill_ms']:.1f} -> {p['prefill_ms']:.1f} ms ({x['prefill']:.2f}x) | "
            f"batch {setup['batch_size']}, prompt {setup['prompt_len']}, {setup['new_tokens']} new tokens, "
            f"{setup['device']}, {setup['threads']} thread{'s' if setup['threads'] != 1 else ''}")


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
