"""Result records: one JSON per run, written atomically (DESIGN.md "Result records and reports")."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

# keys that do not change a run's result: where it is written and how it is displayed
NON_RESULT_KEYS = ("sweep", "output_root", "progress")
PACKAGES = ("prunelab", "torch", "transformers", "tokenizers", "datasets", "hydra-core", "omegaconf",
            "lm_eval", "wandb", "numpy", "safetensors", "mambapy", "gguf")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version() -> dict:
    root = Path(__file__).resolve().parent.parent
    info = {"prunelab": library_versions()["prunelab"], "git_commit": None, "git_dirty": None}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def device_info(device: str) -> dict:
    info = {"device": device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def peak_memory(device: str) -> dict:
    # ru_maxrss is the process peak (KiB on Linux): in a multirun in one process it covers earlier jobs too
    mem = {"peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        mem["peak_device_mb"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    else:
        mem["peak_device_mb"] = None
    return mem


def run_id(config: dict, prunes: bool = True, calibrates: bool = True) -> str:
    """``<model>_<pruner>_<pattern>_<hash>``; the hash covers every key that can change the result.

    A run that prunes nothing (dense) does not depend on the sparsity pattern, and one without
    calibration (dense, magnitude) not on the calibration data, so those keys leave its id.
    """
    ignored = set(NON_RESULT_KEYS) | ({"sparsity"} if not prunes else set()) | ({"calib"} if not calibrates else set())
    relevant = {k: v for k, v in config.items() if k not in ignored}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]
    sp = config["sparsity"]
    if not prunes:
        pattern = "dense"
    elif sp["kind"] == "nm":
        pattern = f"{sp['n']}of{sp['m']}"
    else:
        pattern = f"{round(sp['ratio'] * 100)}pct"
    return f"{config['model']['name']}_{config['pruner']['name']}_{pattern}_{digest}"


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
