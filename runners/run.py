"""``python -m runners.run [-m] [group=option ...] [key=value ...]``: prune + evaluate -> result record.

Every job of the command line (all combinations of a ``-m`` sweep) is composed and validated before
any model weights are loaded; bad input gives one ``prunelab: error: ...`` line and exit code 2.
"""

from __future__ import annotations

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

import corpora
import models
from evaluators.ppl import perplexity, protocol_windows
from pruners import prune_sequential
from pruners.masks import sparsity as measured_sparsity

from .record import code_version, device_info, library_versions, peak_memory, run_id, write_atomic
from .validate import ConfigError, Plan, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("prunelab")

_VALUE_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package"}
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--shell-completion", "--resolve",
                 "--experimental-rerun"}


def fail(message: str) -> None:
    print(f"prunelab: error: {message}", file=sys.stderr)
    sys.exit(2)


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # the SparseGPT reference disables TF32: it perturbs Cholesky / solves (METHODS.md §12)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _timed(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(now - start, 3)
    return now


def execute(cfg: DictConfig, plan: Plan | None = None, write: bool = True) -> dict:
    """Run one experiment in-process and return its record (also written unless ``write=False``)."""
    plan = plan or validate(cfg)
    set_determinism(int(cfg.seed))
    config = OmegaConf.to_container(cfg, resolve=True)
    prunes = plan.pruner.removes_weights
    rid = run_id(config, prunes=prunes, calibrates=plan.pruner.needs_calibration)
    out_path = Path(cfg.output_root) / str(cfg.sweep) / rid / "result.json"
    timings: dict = {}
    t_start = t = time.perf_counter()
    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(plan.device))

    loaded = models.load(cfg.model, plan.device)
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    t = _timed(timings, "load", t)

    calib_ids, calibration = None, None
    if plan.pruner.needs_calibration:
        windows = corpora.calibration_windows(
            tokenizer, cfg.calib.source, int(cfg.calib.nsamples), plan.calib_seqlen, int(cfg.calib.seed),
            path=cfg.calib.get("path"), dataset_root=cfg.calib.get("dataset_root"))
        calib_ids, calibration = windows.ids, windows.provenance
        t = _timed(timings, "calibration_data", t)

    stats_dtype = torch.float64 if cfg.engine.stats_dtype == "float64" else torch.float32
    module_results = prune_sequential(model, adapter, plan.pruner, plan.pattern, calib_ids, plan.device,
                                      int(cfg.engine.batch_size), stats_dtype, bool(cfg.progress))
    t = _timed(timings, "prune", t)

    per_module, zeros, total = {}, 0, 0
    prefix = adapter.blocks_prefix()
    for index, block in enumerate(adapter.blocks()):
        for name, linear in adapter.prunable_linears(block).items():
            full = f"{prefix}.{index}.{name}"
            value = measured_sparsity(linear.weight)
            per_module[full] = round(value, 6)
            zeros += round(value * linear.weight.numel())
            total += linear.weight.numel()

    metrics: dict = {"ppl": {}}
    for protocol in plan.protocols:
        ids, provenance = protocol_windows(tokenizer, protocol, plan.eval_seqlen, cfg.eval.ppl.get("dataset_root"),
                                           cfg.eval.ppl.get("max_windows"))
        key = f"{protocol.name}@{plan.eval_seqlen}"
        value = perplexity(model, adapter, ids, plan.device, int(cfg.eval.ppl.batch_size), cfg.eval.ppl.mode,
                           desc=f"ppl {key}", progress=bool(cfg.progress))
        metrics["ppl"][key] = {"value": value, "protocol": provenance}
        t = _timed(timings, f"eval/{key}", t)
    timings["total"] = round(time.perf_counter() - t_start, 3)

    record = {
        "schema": 1,
        "run_id": rid,
        "sweep": str(cfg.sweep),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": cfg.model.name, **loaded.source},
        "pruner": plan.pruner.name,
        "pattern": ({"kind": plan.pattern.kind, "ratio": plan.pattern.ratio, "n": plan.pattern.n,
                     "m": plan.pattern.m, "label": plan.pattern.describe()} if prunes
                    else {"kind": "dense", "ratio": 0.0, "n": None, "m": None, "label": "dense"}),
        "sparsity": {"target": plan.pattern.target_sparsity if prunes else 0.0, "overall": round(zeros / max(total, 1), 6),
                     "prunable_parameters": total, "per_module": per_module},
        "method_losses": {k: v.loss for k, v in module_results.items() if v.loss is not None},
        "metrics": metrics,
        "timings_s": timings,
        "memory": peak_memory(plan.device),
        "calibration": calibration,
        "seed": int(cfg.seed),
        "device": device_info(plan.device),
        "versions": library_versions(),
        "code": code_version(),
        "config": config,
    }
    if write:
        write_atomic(out_path, record)
        record["path"] = str(out_path)
    return record


def summary(record: dict) -> str:
    ppl = ", ".join(f"{k} {v['value']:.2f}" for k, v in record["metrics"]["ppl"].items()) or "no ppl"
    lines = [
        f"{record['model']['name']} | {record['pruner']} | {record['pattern']['label']} | "
        f"sparsity {record['sparsity']['overall']:.2%} of {record['sparsity']['prunable_parameters']:,} prunable weights",
        f"  perplexity: {ppl}",
        f"  time: prune {record['timings_s']['prune']:.1f}s, total {record['timings_s']['total']:.1f}s | "
        f"peak host {record['memory']['peak_host_rss_mb']:.0f} MB",
    ]
    if "path" in record:
        lines.append(f"  record: {record['path']}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> None:
    try:
        plan = validate(cfg)
    except ConfigError as err:
        fail(str(err))
    record = execute(cfg, plan)
    print(summary(record), flush=True)


# ---------------------------------------------------------------------------------------------
# validating every job of a command line before Hydra starts any of them


def _split_argv(argv: list[str]) -> tuple[list[str], str, bool] | None:
    overrides, config_name, multirun, skip = [], "config", False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in _PASS_THROUGH or arg.split("=")[0] in _PASS_THROUGH:
            return None  # help / printing modes: let Hydra handle them
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _VALUE_FLAGS:
            skip = True
            if arg in ("-cn", "--config-name") and i + 1 < len(argv):
                config_name = argv[i + 1]
        elif arg.startswith("-"):
            continue
        else:
            overrides.append(arg)
    return overrides, config_name, multirun


def _group_options(group: str) -> list[str] | None:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None


def prevalidate(argv: list[str]) -> str | None:
    """Compose and validate every job; return an error message, or None if all are valid.

    The jobs are the product of the command line's sweeps and of the sweeps a preset declares
    (``hydra.sweeper.params`` of ``+experiment=...``; the command line wins for a key set in both).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    split = _split_argv(argv)
    if split is None:
        return None
    overrides, config_name, multirun = split
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except Exception as err:  # Hydra's own syntax errors
        return str(err).strip().splitlines()[0]
    for o in parsed:
        options = _group_options(o.key_or_group)
        if options is not None and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for value in values:
                if str(value) not in options:
                    return f"{o.key_or_group}={value} is not an option (choose from: {', '.join(options)})"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            base = compose(config_name, overrides=[o.input_line for o in parsed if not o.is_sweep_override()],
                           return_hydra_config=True)
        except Exception as err:
            return str(err).strip().splitlines()[0]
        params = base.hydra.sweeper.get("params")
        preset = OmegaConf.to_container(params, resolve=False) if params else {}
        given = {o.key_or_group for o in parsed}
        parsed += parser.parse_overrides([f"{k}={v}" for k, v in preset.items() if k not in given])
        multirun = multirun or str(base.hydra.mode).endswith("MULTIRUN")
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps and not multirun:
            return f"{sweeps[0]} is a sweep: add -m (--multirun) to run every value"
        try:
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        except Exception:
            return None  # a sweep form we do not expand (e.g. glob): each job validates itself
        seen_models: dict = {}
        for job in jobs:
            where = f"  [job: {' '.join(job)}]" if len(jobs) > 1 else ""
            try:
                cfg = compose(config_name, overrides=job)
            except Exception as err:
                return " ".join(str(err).strip().splitlines()[:2]) + where
            key = OmegaConf.to_yaml(cfg.model)
            try:
                validate(cfg, check_model=key not in seen_models)
            except ConfigError as err:
                return f"{err}{where}"
            seen_models[key] = True
    return None


def main() -> None:
    error = prevalidate(sys.argv[1:])
    if error:
        fail(error)
    hydra_entry()


if __name__ == "__main__":
    main()
