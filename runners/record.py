"""Result records: one JSON per run, written atomically (DESIGN.md "Result records and reports")."""

from __future__ import annotations

import functools
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

# keys that do not change a run's result: where it is written, how it is displayed and logged, and
# whether an existing record is reused
NON_RESULT_KEYS = ("sweep", "output_root", "progress", "force", "dense_baseline", "wandb", "report")
ROOT = Path(__file__).resolve().parent.parent
# the code and bundled data a result depends on (the report, benchmarks and docs do not count)
SOURCE_PATHS = ("corpora", "models", "pruners", "evaluators", "runners/run.py", "runners/validate.py")
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


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (12 hex) over the files a result depends on (:data:`SOURCE_PATHS`), names included.

    Part of every run id, so that a code change recomputes runs while edits to docs, reports or
    benchmarks do not; unlike a git commit it also sees uncommitted changes. Hashes ~15 MB (the
    tiny checkpoints and the corpus) once per process.
    """
    digest = hashlib.sha256()
    for entry in SOURCE_PATHS:
        path = ROOT / entry
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if not file.is_file() or "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def code_version() -> dict:
    root = ROOT
    info = {"prunelab": library_versions()["prunelab"], "source_digest": source_digest(), "git_commit": None,
            "git_dirty": None}
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
    info = {"device": device, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "host": platform.node(), "pid": os.getpid(),
            # set by the gpus launcher (one job per GPU) and by schedulers
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
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
    """``<model>_<pruner>_<pattern>_<hash>``; the hash covers every key that can change the result
    and the code version (:func:`source_digest`).

    A run that prunes nothing (dense) does not depend on the sparsity pattern, and one without
    calibration (dense, magnitude) not on the calibration data, so those keys leave its id.
    """
    ignored = (set(NON_RESULT_KEYS) | ({"sparsity", "engine", "speed", "save_model"} if not prunes else set())
               | ({"calib"} if not calibrates else set()))
    relevant = {k: v for k, v in config.items() if k not in ignored}
    relevant["_code"] = source_digest()
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]
    sp = config["sparsity"]
    if not prunes:
        pattern = "dense"
    elif sp["kind"] == "nm":
        pattern = f"{sp['n']}of{sp['m']}"
    elif sp["kind"] == "structured":
        pattern = f"struct{round(sp['ratio'] * 100)}pct"
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


def read_record(path: Path) -> dict | None:
    """The record at ``path``, or None if there is none (or it is unreadable: never a half-written one)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def find_record(output_root: Path, sweep: str, rid: str) -> Path | None:
    """Where run ``rid`` is already recorded: in this sweep first, then in any other sweep under ``output_root``."""
    root = Path(output_root)
    own = root / sweep / rid / "result.json"
    if read_record(own) is not None:
        return own
    for other in sorted(root.glob(f"*/{rid}/result.json")):
        if read_record(other) is not None:
            return other
    return None
