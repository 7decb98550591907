"""Result records: one JSON per run, written atomically (docs/architecture.md §5)."""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf

# keys that do not change a run's result: where it is written, how it is displayed and logged, and
# whether an existing record (or kept pruned model: runners/prune_cache.py) is reused
NON_RESULT_KEYS = ("sweep", "output_root", "progress", "force", "dense_baseline", "wandb", "report",
                   "cache_pruned", "cache_pruned_max_params", "reuse_cache", "reuse_cache_max_mb")
# engine keys that change where or how a prune runs, not what it computes
ENGINE_NON_RESULT_KEYS = ("offload_dir", "resume", "onload", "activations")
MODEL_NON_RESULT_KEYS = ("group_defaults",)  # which groups a run uses is in the config itself
# the keys that determine the pruned weights (:func:`prune_config`): not eval, speed, save_model, nor the above
PRUNE_KEYS = ("model", "calib", "pruner", "sparsity", "engine", "seed", "device")
ROOT = Path(__file__).resolve().parent.parent
# the code and bundled data a result depends on (the report, benchmarks and docs do not count)
SOURCE_PATHS = ("corpora", "models", "pruners", "evaluators", "runners/run.py", "runners/results.py", "runners/pruning.py",
                "runners/validate.py")
# the scoped code fingerprint (:func:`code_fingerprint`): the shared code every result depends on ...
SHARED_CODE = ("pruners", "models", "corpora", "evaluators", "runners/run.py", "runners/results.py", "runners/pruning.py",
               "runners/validate.py")
# ... and the part of it that produces the pruned weights (:func:`prune_fingerprint`): no evaluators, no run.py
# (which evaluates and records); runners/pruning.py is the prune step, runners/validate.py builds its Plan
PRUNE_CODE = ("pruners", "models", "corpora", "runners/pruning.py", "runners/validate.py")
# ... minus scripts that build bundled data or benchmark, which no run imports
SCRIPT_PREFIXES = ("build_", "train_", "bench_")
DENSE = "dense"
PACKAGES = ("prunelab", "torch", "transformers", "tokenizers", "datasets", "hydra-core", "omegaconf",
            "lm_eval", "wandb", "numpy", "safetensors", "mambapy", "gguf")


def package_versions(names) -> dict:
    """``{package: installed version or None}``."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def library_versions() -> dict:
    return {"python": platform.python_version(), **package_versions(PACKAGES)}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (12 hex) over the files a result depends on (:data:`SOURCE_PATHS`), names included.

    Recorded for provenance (``code.source_digest``); unlike a git commit it also sees uncommitted
    changes. The run id uses the scoped :func:`code_fingerprint` instead. Hashes ~15 MB (the tiny
    checkpoints and the corpus) once per process.
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


def _normalized_python(source: bytes) -> bytes:
    """The AST of a Python file without docstrings (or any other bare string statement, a no-op) and without
    line numbers: comments, docstrings, blank lines and formatting do not change it (Python-version specific)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # not parseable: the bytes themselves
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 and isinstance(s.value.value, str))]
    return ast.dump(tree, include_attributes=False).encode()


def _is_script(path: Path) -> bool:
    return path.suffix == ".py" and path.name.startswith(SCRIPT_PREFIXES)


@functools.lru_cache(maxsize=1)
def method_files() -> dict[str, tuple[str, ...]]:
    """Per registered pruner (``pruners.PRUNERS``), the files (relative to the repository) of its class and of
    its base classes inside ``pruners/``, found through the MRO; ``dense`` has none (it prunes nothing)."""
    from pruners import PRUNERS

    package = ROOT / "pruners"
    out = {}
    for name, cls in PRUNERS.items():
        files = set()
        for klass in cls.__mro__:
            try:
                path = Path(inspect.getfile(klass)).resolve()
            except TypeError:  # builtins (object)
                continue
            if path.parent == package:
                files.add(path.relative_to(ROOT).as_posix())
        out[name] = () if name == DENSE else tuple(sorted(files))
    return out


def _own_files() -> set[str]:
    """The files that define a registered method: a result depends on its own method's file only."""
    from pruners import PRUNERS

    return {Path(inspect.getfile(cls)).resolve().relative_to(ROOT).as_posix() for cls in PRUNERS.values()}


def fingerprint_files(pruner_name: str, root: Path | str | None = None, shared: tuple[str, ...] = SHARED_CODE) -> list[str]:
    """The files :func:`code_fingerprint` covers for ``pruner_name``, relative to ``root`` (default: this
    checkout): the shared code (:data:`SHARED_CODE` minus :data:`SCRIPT_PREFIXES` scripts, minus every
    method's own file, documentation ``*.md`` left out, bundled data kept) plus the method's own files.
    ``shared=PRUNE_CODE``: the files :func:`prune_fingerprint` covers."""
    root = Path(root) if root is not None else ROOT
    methods = method_files()
    if pruner_name not in methods:
        raise ValueError(f"pruner '{pruner_name}' is not one of: {', '.join(sorted(methods))}")
    own = _own_files()
    files = set(methods[pruner_name])
    for entry in shared:
        path = root / entry
        for file in (sorted(path.rglob("*")) if path.is_dir() else [path]):
            if (not file.is_file() or "__pycache__" in file.parts or file.suffix in (".pyc", ".md")
                    or _is_script(file)):
                continue
            rel = file.relative_to(root).as_posix()
            if rel not in own:
                files.add(rel)
    return sorted(files)


@functools.cache
def code_fingerprint(pruner_name: str, root: Path | str | None = None) -> str:
    """sha256 (12 hex) of the code that produces a ``pruner_name`` result: :func:`fingerprint_files`, Python
    files by their docstring-free AST (comments and formatting vanish), data files by their bytes, names
    included. Part of every run id, so that editing one method's file recomputes that method's runs only,
    and a comment, docstring, benchmark or build script recomputes nothing. Cached per process.
    """
    return _fingerprint(pruner_name, root, SHARED_CODE)


@functools.cache
def prune_fingerprint(pruner_name: str, root: Path | str | None = None) -> str:
    """Like :func:`code_fingerprint`, over the code that produces the pruned weights only (:data:`PRUNE_CODE`):
    part of every prune id (:func:`prune_id`), so that editing an evaluator or runners/run.py keeps the kept
    pruned models (runners/prune_cache.py) valid. Cached per process."""
    return _fingerprint(pruner_name, root, PRUNE_CODE)


def _fingerprint(pruner_name: str, root: Path | str | None, shared: tuple[str, ...]) -> str:
    root = Path(root) if root is not None else ROOT
    digest = hashlib.sha256()
    for rel in fingerprint_files(pruner_name, root, shared):
        data = (root / rel).read_bytes()
        if rel.endswith(".py"):
            data = _normalized_python(data)
        digest.update(rel.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:12]


def code_version(pruner: str | None = None) -> dict:
    root = ROOT
    # source_digest: every byte of SOURCE_PATHS (provenance); fingerprint: what the run id covers;
    # prune_fingerprint: what the prune id covers (dense: none)
    info = {"prunelab": library_versions()["prunelab"], "source_digest": source_digest(),
            "fingerprint": code_fingerprint(pruner) if pruner else None,
            "prune_fingerprint": prune_fingerprint(pruner) if pruner and pruner != DENSE else None,
            "git_commit": None, "git_dirty": None}
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


def result_config(config: dict, prunes: bool = True, calibrates: bool = True) -> dict:
    """The keys of a resolved config that can change a run's result (seed included, code not).

    A run that prunes nothing (dense) does not depend on the sparsity pattern, and one without
    calibration (dense, magnitude) not on the calibration data, so those keys are left out.
    """
    ignored = (set(NON_RESULT_KEYS) | ({"sparsity", "engine", "speed", "save_model"} if not prunes else set())
               | ({"calib"} if not calibrates else set()))
    out = {k: v for k, v in config.items() if k not in ignored}
    if isinstance(out.get("eval"), dict):  # which intermediate shots are also recorded: not this run's result
        out["eval"] = {k: v for k, v in out["eval"].items() if k != "shots_every"}
    if isinstance(out.get("engine"), dict):  # where offloaded tensors wait, whether blocks are kept: not what they are
        out["engine"] = {k: v for k, v in out["engine"].items() if k not in ENGINE_NON_RESULT_KEYS}
    out = _without_model_defaults(out)
    if isinstance(out.get("sparsity"), dict):
        out["sparsity"] = semantic_sparsity(out["sparsity"])
    return out


ALLOCATION_DEFAULTS = {"allocation": "uniform", "targets": ["*"], "ignore": [], "block_ratios": []}


def semantic_sparsity(sparsity: dict) -> dict:
    """The sparsity keys that can change a result: OWL's ``owl_lambda`` / ``owl_m`` only with ``allocation=owl``,
    and the allocation keys not at all while they are the defaults (uniform over every linear), so that a run
    id does not move with a key its run never reads (pruners/allocation.py)."""
    out = dict(sparsity)
    if out.get("allocation", "uniform") != "owl":
        out.pop("owl_lambda", None)
        out.pop("owl_m", None)
    if all(out.get(k, v) == v for k, v in ALLOCATION_DEFAULTS.items()):
        for key in ALLOCATION_DEFAULTS:
            out.pop(key, None)
    return out


def _digest(data, length: int) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _hashed(config: dict, identity: dict | None) -> dict:
    """What an id hashes: the result config, with the keys the identity holds resolved (runners/identity.py:
    device, model.dtype, model.attn_implementation) replaced by the identity itself."""
    if identity is None:  # (a config alone: ids of configs compared with each other, e.g. in tests)
        return config
    from .identity import strip_unresolved

    return {**strip_unresolved(config), "_identity": identity}


def cell_key(config: dict, prunes: bool = True, calibrates: bool = True, identity: dict | None = None) -> str:
    """A run's cell: its result config and identity (runners/identity.py) without the seed, the code and the
    library versions (12 hex). Runs that differ only in seed share a cell (a report averages them); code and
    library versions of one cell are told apart by :func:`runners.report.record_fingerprint`."""
    from .identity import scoped

    ident = scoped(identity, "run" if prunes else "dense")
    if ident is not None:
        ident = {k: v for k, v in ident.items() if k != "versions"}
    relevant = {k: v for k, v in result_config(config, prunes, calibrates).items() if k != "seed"}
    return _digest(_hashed(relevant, ident), 12)


def run_id(config: dict, prunes: bool = True, calibrates: bool = True, identity: dict | None = None) -> str:
    """``<model>_<pruner>_<pattern>_<hash>``; the hash covers every key that can change the result
    (:func:`result_config`), the run's identity (runners/identity.py: resolved device type, dtype and attention,
    checkpoint and data content, library versions) and the code that produced it, scoped to the method
    (:func:`code_fingerprint`: editing another method's file, a docstring or a comment keeps the id).
    """
    from .identity import scoped

    relevant = _hashed(result_config(config, prunes, calibrates), scoped(identity, "run" if prunes else "dense"))
    relevant["_code"] = code_fingerprint(config["pruner"]["name"])
    return f"{_label(config, prunes)}_{_digest(relevant, 10)}"


def _label(config: dict, prunes: bool) -> str:
    from pruners.masks import pattern_label, pattern_slug

    sp = config["sparsity"]
    label = "dense" if not prunes else pattern_label(sp["kind"], sp.get("ratio"), sp.get("n"), sp.get("m"))
    return f"{config['model']['name']}_{config['pruner']['name']}_{pattern_slug(label)}"


def prune_config(config: dict, calibrates: bool = True) -> dict:
    """The keys of a resolved config that determine the pruned weights (:data:`PRUNE_KEYS`): model, calibration
    (when the run calibrates), pruner, sparsity, engine, seed, device. Not ``eval``, ``speed``, ``save_model``,
    nor where or how the run is written: runs that differ only in those share their pruned model."""
    out = {k: config.get(k) for k in PRUNE_KEYS if calibrates or k != "calib"}
    if isinstance(out.get("engine"), dict):  # (as in result_config)
        out["engine"] = {k: v for k, v in out["engine"].items() if k not in ENGINE_NON_RESULT_KEYS}
    return _without_model_defaults(out)


def _without_model_defaults(out: dict) -> dict:
    """``out`` without the model's :data:`MODEL_NON_RESULT_KEYS` (absent ones leave the config as it was)."""
    model = out.get("model")
    if isinstance(model, dict) and any(k in model for k in MODEL_NON_RESULT_KEYS):
        out = {**out, "model": {k: v for k, v in model.items() if k not in MODEL_NON_RESULT_KEYS}}
    return out


def prune_id(config: dict, calibrates: bool = True, identity: dict | None = None) -> str:
    """``<model>_<pruner>_<pattern>_<hash>`` of the pruned weights: :func:`prune_config`, the identity of what
    pruning reads (runners/identity.py: no evaluation data) and the pruning code (:func:`prune_fingerprint`).
    Runs with one prune id differ at most in how they evaluate, so a recorded run's kept pruned model
    (runners/prune_cache.py) serves them all. Only for runs that prune (not dense)."""
    from .identity import scoped

    relevant = _hashed(prune_config(config, calibrates), scoped(identity, "prune"))
    relevant["_code"] = prune_fingerprint(config["pruner"]["name"])
    return f"{_label(config, True)}_{_digest(relevant, 10)}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())  # an ordinary file (mkstemp creates 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def run_lock(folder: Path, poll_s: float = 2.0, on_wait=None):
    """Hold ``<folder>/.lock`` while a run computes, so that two processes of one run id never both compute it: a
    kernel lock (``flock``; released when its process dies, kill -9 included, and across hosts on a shared file
    system that supports it) on a file naming ``<host> <pid>``; a second process waits until it is free, then
    re-checks for the record. ``on_wait(holder)`` is called once when waiting starts. On release the lock file goes,
    and the folder too if it stayed empty (a failed run leaves nothing behind)."""
    import fcntl

    lock = folder / ".lock"
    waiting = False
    while True:
        folder.mkdir(parents=True, exist_ok=True)  # (again after a failed holder removed it)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not waiting and on_wait is not None:
                on_wait(_holder(lock))
            waiting = True
            time.sleep(poll_s)
            continue
        except OSError:  # a file system without locks (some network mounts): run unlocked, as before locks existed
            os.close(fd)
            try:
                yield waiting
            finally:
                lock.unlink(missing_ok=True)
            return
        try:  # the file we locked must still be the lock (its holder may have removed it after we opened it)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{platform.node()} {os.getpid()}\n".encode())
        yield waiting
    finally:
        lock.unlink(missing_ok=True)  # (while holding it: a waiter that opened it sees another inode and retries)
        os.close(fd)
        with contextlib.suppress(OSError):
            folder.rmdir()  # (only if empty)


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


# ---- the dense baseline's config, reusing a record (runners/run.py) ----

def dense_config(config: dict) -> dict:
    """The dense baseline's resolved config: this run's with the ``dense`` pruner."""
    dense = dict(config)
    dense["pruner"] = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "pruner" / "dense.yaml"), resolve=True)
    return dense


def reuse(found: Path, out_path: Path, cfg, write: bool) -> dict:
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
