"""Weights & Biases logging for runs and reports (docs/architecture.md §6).

Offline by default: files under ``<output_root>/<sweep>/wandb/`` (``wandb sync`` uploads them later);
``wandb.mode=online`` logs live, ``wandb.mode=disabled`` turns it off. W&B is a mirror of the result
records, never their source: an absent package, a failed login or an unreachable server only logs a
warning, and the run (whose record is already written) goes on.

Runs of one sweep share a W&B group (the sweep name); a run is named by its run id.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("prunelab")


def settings(cfg) -> dict | None:
    """The W&B settings of a composed config, or None when logging is disabled."""
    section = cfg.get("wandb") if cfg is not None else None
    if section is None or section.get("mode", "disabled") == "disabled":
        return None
    folder = section.get("dir") or str(Path(cfg.output_root) / str(cfg.sweep))
    return {"mode": str(section.mode), "project": str(section.get("project") or "prunelab"),
            "entity": section.get("entity"), "dir": folder, "tags": [str(t) for t in section.get("tags") or []],
            "group": str(cfg.sweep)}


ONLINE_INIT_TIMEOUT_S = 15  # an unreachable W&B server costs at most this per run, then the run is logged offline


def _init(opts: dict, name: str, job_type: str, config: dict):
    import wandb

    Path(opts["dir"]).mkdir(parents=True, exist_ok=True)
    if opts["mode"] == "offline":  # keep W&B's own logs next to the run files, not in $HOME/.cache
        os.environ.setdefault("WANDB_CACHE_DIR", str(Path(opts["dir"]) / "wandb" / ".cache"))
    def init(mode: str):
        return wandb.init(project=opts["project"], entity=opts["entity"], mode=mode, dir=opts["dir"],
                          group=opts["group"], job_type=job_type, name=name, tags=opts["tags"], config=config,
                          reinit="create_new",
                          settings=wandb.Settings(silent=True, console="off", init_timeout=ONLINE_INIT_TIMEOUT_S))

    if opts["mode"] != "online":
        return init(opts["mode"])
    try:
        return init("online")
    except Exception as err:  # an unreachable server: the run is logged offline (wandb sync uploads it later)
        log.warning("W&B online init failed (%s); logging this run offline under %s (wandb sync uploads it)",
                    type(err).__name__, opts["dir"])
        os.environ.setdefault("WANDB_CACHE_DIR", str(Path(opts["dir"]) / "wandb" / ".cache"))
        return init("offline")


IMAGE_METRICS = ("fid", "sfid", "is", "precision", "recall", "class_accuracy", "class_fid", "samples")


def run_summary(record: dict) -> dict:
    """Flat summary metrics of a record: ``ppl/<protocol@seqlen>``, ``zeroshot/<task>/acc``, ``image/fid`` and the
    other image metrics (evaluators/image.py), sparsity, speed, time, memory."""
    out = {f"ppl/{key}": entry["value"] for key, entry in record["metrics"].get("ppl", {}).items()}
    zeroshot = record["metrics"].get("zeroshot")
    if zeroshot:
        for task, values in zeroshot["tasks"].items():
            for metric in ("acc", "acc_norm"):
                if values.get(metric) is not None:
                    out[f"zeroshot/{task}/{metric}"] = values[metric]
        for metric, value in zeroshot["average"].items():
            if value is not None:
                out[f"zeroshot/average/{metric}"] = value
    structure = record.get("structure")
    if structure:
        out["parameters/before"] = structure["parameters_before"]
        out["parameters/after"] = structure["parameters_after"]
    image = record["metrics"].get("image") or {}
    out.update({f"image/{k}": image[k] for k in IMAGE_METRICS if isinstance(image.get(k), (int, float))})
    speed = record["metrics"].get("speed")
    if speed:
        out.update({f"speed/{k}_speedup": v for k, v in speed["speedup"].items() if v is not None})
        for key in ("decode_ms_per_token", "prefill_ms", "ms_per_image"):  # (text models: the first two; image
            if speed["pruned"].get(key) is not None:  # generators: the last; None: a host too busy to time a decode)
                out[f"speed/{key}"] = speed["pruned"][key]
    out["sparsity/overall"] = record["sparsity"]["overall"]
    out["sparsity/target"] = record["sparsity"]["target"]
    out.update({f"time_s/{k}": v for k, v in record["timings_s"].items()})
    out["memory/peak_host_rss_mb"] = record["memory"]["peak_host_rss_mb"]
    if record["memory"].get("peak_device_mb") is not None:
        out["memory/peak_device_mb"] = record["memory"]["peak_device_mb"]
    return out


def log_run(record: dict, cfg) -> str | None:
    """Log one run (config, summary metrics, per-layer sparsity table); return its W&B folder or None."""
    opts = settings(cfg)
    if opts is None:
        return None
    try:
        import wandb

        config = {**record["config"], "run_id": record["run_id"], "pattern_label": record["pattern"]["label"],
                  "code": record["code"], "versions": record["versions"]}
        run = _init(opts, record["run_id"], record["pruner"], config)
        try:
            per_module = record["sparsity"]["per_module"]
            payload = {"per_layer_sparsity": wandb.Table(columns=["module", "sparsity"],
                                                         data=[[k, v] for k, v in per_module.items()])}
            grid = (record["metrics"].get("image") or {}).get("grid")
            if grid and record.get("path") and (Path(record["path"]).parent / grid).is_file():  # an image generator's
                payload["samples"] = wandb.Image(str(Path(record["path"]).parent / grid))  # samples, per class
            run.log(payload)
            run.summary.update(run_summary(record))
            folder = str(Path(run.dir).parent)
        finally:
            run.finish()
        return folder
    except Exception as err:  # W&B is optional: never fail a run for it
        log.warning("W&B logging skipped (%s: %s); the result record is unaffected", type(err).__name__, err)
        return None


def log_report(opts: dict, name: str, tables: dict, images: dict) -> str | None:
    """Log a report: each pandas DataFrame as a ``wandb.Table``, each PNG path as a ``wandb.Image``."""
    try:
        import wandb

        run = _init(opts, name, "report", {"tables": sorted(tables), "plots": sorted(images)})
        try:
            payload = {key: wandb.Table(dataframe=_json_ready(frame)) for key, frame in tables.items()}
            payload.update({key: wandb.Image(str(path)) for key, path in images.items()})
            run.log(payload)
            folder = str(Path(run.dir).parent)
        finally:
            run.finish()
        return folder
    except Exception as err:
        log.warning("W&B report logging skipped (%s: %s)", type(err).__name__, err)
        return None


def _json_ready(frame):
    """A fresh 0..n-1 index (tables concatenated from pivots repeat labels) and None for missing cells."""
    frame = frame.reset_index(drop=True).astype(object)
    return frame.where(frame.notna(), None)


# ---------------------------------------------------------------------------------------------
# reading an offline run back (tests; checking what would be synced without syncing it)

_BLOCK = 32 * 1024


def _records(data: bytes):
    """Protobuf payloads of a ``.wandb`` file: a LevelDB-style log (7-byte file header, 32 KiB blocks,
    chunks with a 7-byte header ``crc32, length, type``; types 1 full, 2 first, 3 middle, 4 last)."""
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            yield pending
            pending = b""


def read_offline_run(run_dir: str | Path) -> dict:
    """Config, summary, group, job type, name and logged table files of an offline W&B run folder."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    out: dict = {"config": {}, "summary": {}, "group": None, "job_type": None, "name": None,
                 "tables": {p.name: json.loads(p.read_text())
                            for p in sorted(run_dir.glob("files/media/table/**/*.table.json"))},
                 "images": sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("files/media/images/**/*.png"))}
    for payload in _records(next(run_dir.glob("run-*.wandb")).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(group=record.run.run_group, job_type=record.run.job_type, name=record.run.display_name)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
            continue
        else:
            continue
        for item in updates:
            out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def offline_runs(folder: str | Path) -> list[Path]:
    """The offline run folders W&B wrote under ``folder`` (``<folder>/wandb/offline-run-*``), oldest first."""
    return sorted(Path(folder).glob("wandb/offline-run-*"))
