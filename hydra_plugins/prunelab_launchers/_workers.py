"""The machinery of ``hydra/launcher=gpus``: pure planning functions, the worker process, the pool.

Each worker is a *spawned* process (a fresh interpreter, never a fork of the launching process) that
starts with ``CUDA_VISIBLE_DEVICES`` set to its GPU and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to
its share of the CPU cores, so CUDA and OpenMP see them before torch is imported there. Jobs go to
workers as workers free up; results are collected per job index.

A private module: Hydra's plugin scanner does not import (or re-execute) it, so the worker code and
its classes are one object per process.
"""

import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

CPU_WORDS = ("cpu", "none", "")


def _is_device_token(token: str) -> bool:
    return token.isdigit() or (token.startswith(("GPU-", "MIG-")) and len(token) > 4)


def parse_visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` -> its device entries; None when unset (then every device is visible).

    As CUDA reads it: entries are indices or ``GPU-``/``MIG-`` uuids, spaces are ignored and the list
    ends at the first invalid entry, so ``""`` and ``"-1"`` hide every GPU and ``"0,-1,1"`` is ``["0"]``.
    """
    if value is None:
        return None
    devices: list[str] = []
    for entry in value.split(","):
        token = entry.strip()
        if not _is_device_token(token):
            break
        devices.append(token)
    return devices


def wants_cpu(spec: Any) -> bool:
    if spec is None:
        return True
    if isinstance(spec, str):
        return spec.strip().lower() in CPU_WORDS
    return isinstance(spec, (list, tuple)) and len(spec) == 0


def resolve_devices(spec: Any, visible: Sequence[str]) -> list[str]:
    """The ``gpus`` key -> one ``CUDA_VISIBLE_DEVICES`` value per GPU to use.

    ``visible``: the devices the launching process sees (``parse_visible_devices`` of its
    ``CUDA_VISIBLE_DEVICES``, or ``"0" ... "<count-1>"`` when that is unset). ``auto`` takes them all;
    ``cpu`` / ``none`` / ``[]`` / null none; a list (or a comma string ``"0,2"``) picks by index into
    ``visible`` (so ``[1]`` under ``CUDA_VISIBLE_DEVICES=4,5`` is device 5) or names ``GPU-``/``MIG-`` uuids.
    """
    if wants_cpu(spec):
        return []
    if isinstance(spec, str):
        if spec.strip().lower() == "auto":
            return list(visible)
        spec = spec.split(",")
    if isinstance(spec, (bool, int, float)) or not isinstance(spec, (list, tuple)):
        raise ValueError(f"hydra.launcher.gpus={spec}: give auto, cpu or a list of device indices such as [0,2]")
    devices: list[str] = []
    for entry in spec:
        token = str(entry).strip()
        if token.isdigit():
            if int(token) >= len(visible):
                raise ValueError(f"hydra.launcher.gpus: GPU {token} is not visible "
                                 f"(visible: {', '.join(visible) if visible else 'none'})")
            token = visible[int(token)]
        elif not _is_device_token(token):
            raise ValueError(f"hydra.launcher.gpus: {entry!r} is not a device index or a GPU-/MIG- uuid")
        if token in devices:
            raise ValueError(f"hydra.launcher.gpus: GPU {entry} is listed twice")
        devices.append(token)
    return devices


def split_threads(cores: int, workers: int, threads_per_worker: int | None = None) -> int:
    """Threads for each of ``workers`` processes: ``threads_per_worker`` if given, else ``cores // workers`` (>= 1)."""
    if threads_per_worker is not None:
        if int(threads_per_worker) < 1:
            raise ValueError(f"hydra.launcher.threads_per_worker={threads_per_worker} must be >= 1")
        return int(threads_per_worker)
    return max(1, int(cores) // max(1, int(workers)))


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its name in logs, its ``CUDA_VISIBLE_DEVICES`` ("" = CPU) and its thread count."""

    name: str
    cuda_visible_devices: str
    threads: int

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        return {"CUDA_VISIBLE_DEVICES": self.cuda_visible_devices, "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads}


def plan_workers(devices: Sequence[str], n_jobs: int, cores: int, cpu_workers: int = 1, jobs_per_gpu: int = 1,
                 threads_per_worker: int | None = None) -> list[WorkerSpec]:
    """The workers for ``n_jobs`` jobs: ``jobs_per_gpu`` per device, else ``cpu_workers`` CPU ones; never more than jobs."""
    if devices:
        if int(jobs_per_gpu) < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu} must be >= 1")
        slots = [(f"gpu {d}" + (f"/{k}" if jobs_per_gpu > 1 else ""), d)
                 for k in range(int(jobs_per_gpu)) for d in devices]
    else:
        if int(cpu_workers) < 1:
            raise ValueError(f"hydra.launcher.cpu_workers={cpu_workers} must be >= 1")
        slots = [(f"cpu {i}", "") for i in range(int(cpu_workers))]
    slots = slots[:max(1, n_jobs)]
    threads = split_threads(cores, len(slots), threads_per_worker)
    return [WorkerSpec(name, visible, threads) for name, visible in slots]


def assign_jobs(pending: Sequence[Any], idle: Sequence[int]) -> list[tuple[int, Any]]:
    """Hand the first pending jobs (in job order) to the idle workers (lowest slot first)."""
    return list(zip(sorted(idle), pending, strict=False))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a cgroup / taskset allows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The launching process's GPUs: its ``CUDA_VISIBLE_DEVICES`` if set, else torch's device count.

    ``torch.cuda.device_count()`` asks the driver for a count without creating a CUDA context; the
    workers are spawned (not forked), so a parent with CUDA initialised is harmless either way. (The
    runner has imported torch and called ``torch.cuda.is_available()`` by then anyway.)
    """
    parsed = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    if parsed is not None:
        return parsed
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------------------------------------
# the worker process


class RemoteTraceback(Exception):
    """The traceback of a job's exception in its worker process (attached as that exception's cause)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip()


def _failed(overrides: Sequence[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = error
    return ret


def _round_trips(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
        return True
    except Exception:
        return False


def _plain(cfg: Any) -> Any:
    """A config without structured-config classes: in a worker, Hydra's plugin scan re-executes the
    plugin modules, so the classes a config carries are no longer the importable ones and plain pickle
    refuses them. Values and interpolations are kept."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    return cfg


def _sendable(ret: JobReturn) -> tuple[JobReturn, str | None]:
    """The JobReturn as it can cross to the parent, and the worker traceback of a failed job."""
    value = ret._return_value
    text = None
    if ret.status == JobStatus.FAILED and isinstance(value, BaseException) and not isinstance(value, SystemExit):
        text = "".join(traceback.format_exception(type(value), value, value.__traceback__))
    ret.cfg, ret.hydra_cfg = _plain(ret.cfg), _plain(ret.hydra_cfg)
    if not _round_trips(value):  # an exception / return value that does not pickle (or unpickle)
        if ret.status == JobStatus.FAILED:
            ret.return_value = RuntimeError(f"{type(value).__name__}: {value}")
        else:
            log.warning("the job's return value does not pickle; Hydra gets its repr")
            ret.return_value = repr(value)
    if not _round_trips(ret):
        bare = JobReturn(overrides=ret.overrides, working_dir=ret.working_dir, task_name=ret.task_name,
                         status=ret.status)
        bare.return_value = ret._return_value
        ret = bare
    return ret, text


def _run_one(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, idx: int,
             overrides: Sequence[str]) -> JobReturn:
    try:
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except SystemExit as exit_:  # run_job catches Exception only; sys.exit() ends the job, not the worker
        if exit_.code in (0, None):
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            ret.return_value = None
            return ret
        return _failed(overrides, exit_)
    except Exception as err:  # before the task ran (composing the job's config)
        return _failed(overrides, err)
    finally:
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)


def dump_task(task_function: TaskFunction) -> bytes:
    """The task function by reference where it can be (``runners.run.run_task``; also ``__main__.run_task``
    under ``python -m``: a spawned worker imports the launching ``__main__`` module as its own), else by value."""
    try:
        return pickle.dumps(task_function)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle

        return cloudpickle.dumps(task_function)


def _worker_main(conn: Any, payload: bytes, spec: WorkerSpec) -> None:
    """A worker: receive ``(idx, overrides)``, run the job, send ``(idx, JobReturn, traceback)``; None ends it."""
    try:
        # cloudpickle's output: plain pickle reads it (cloudpickle is imported as needed)
        hydra_context, config, singleton_state, task = pickle.loads(payload)
        task_function = pickle.loads(task)
        Singleton.set_state(singleton_state)
        setup_globals()
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        torch = sys.modules.get("torch")  # imported with the launching __main__ module (the runner's is)
        if torch is not None:
            torch.set_num_threads(spec.threads)  # else torch reads OMP_NUM_THREADS when the job imports it
        while True:
            message = conn.recv()
            if message is None:
                break
            idx, overrides = message
            ret, text = _sendable(_run_one(hydra_context, task_function, config, idx, overrides))
            conn.send((idx, ret, text))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # Ctrl-C, or the launcher went away
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# the launching process


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (a spawned child copies the environment at start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class _Worker:
    """The launcher's handle on one worker process."""

    def __init__(self, ctx: Any, spec: WorkerSpec, payload: bytes) -> None:
        self.spec = spec
        self.conn, child = ctx.Pipe()
        # not daemonic: a job may start processes of its own (datasets, tokenizers)
        self.process = ctx.Process(target=_worker_main, args=(child, payload, spec), name=f"prunelab {spec.name}")
        with _environ(spec.env()):
            self.process.start()
        child.close()
        self.job: tuple[int, list[str]] | None = None
        self.started = 0.0
        self.done = 0

    def give(self, job: tuple[int, list[str]]) -> None:
        self.job, self.started = job, time.perf_counter()
        with contextlib.suppress(OSError):  # a worker that died on start: its sentinel reports it
            self.conn.send(job)

    def stop(self, timeout: float) -> None:
        if self.process.is_alive() and timeout > 0:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run_pool(specs: Sequence[WorkerSpec], payload: bytes, jobs: Sequence[tuple[int, list[str]]],
             max_jobs_per_worker: int | None = None, retries: int = 0) -> dict[int, JobReturn]:
    """Run ``jobs`` (``(idx, overrides)``) on one spawned worker per spec; return ``{idx: JobReturn}``. A job whose
    worker dies goes back to the front of the queue, up to ``retries`` times, for a fresh worker."""
    attempts: dict[int, int] = {}
    ctx = get_context("spawn")
    pending = deque(jobs)
    results: dict[int, JobReturn] = {}
    workers: dict[int, _Worker] = {}
    finished = False
    on_term = _interrupt_on_sigterm()
    try:
        for slot, spec in enumerate(specs):
            workers[slot] = _Worker(ctx, spec, payload)
        while len(results) < len(jobs):
            idle = [slot for slot, w in workers.items() if w.job is None]
            for slot, job in assign_jobs(list(pending), idle):
                pending.popleft()
                workers[slot].give(job)
            busy = {slot: w for slot, w in workers.items() if w.job is not None}
            wait([w.conn for w in busy.values()] + [w.process.sentinel for w in busy.values()])
            for slot, w in busy.items():
                replace, message, closed = False, None, False
                try:
                    message = w.conn.recv() if w.conn.poll() else None
                except (EOFError, OSError):
                    closed = True
                if message is not None:
                    idx, ret, text = message
                    if text is not None and isinstance(ret._return_value, BaseException):
                        ret._return_value.__cause__ = RemoteTraceback(text)
                    results[idx] = ret
                    _log_result(idx, ret, w)
                    w.job, w.done = None, w.done + 1
                    replace = bool(max_jobs_per_worker) and w.done >= int(max_jobs_per_worker)
                elif closed or not w.process.is_alive():  # died (or hangs up) with a job in flight
                    w.process.join(10)
                    if w.process.is_alive():
                        w.process.terminate()
                        w.process.join()
                    idx, overrides = w.job
                    error = RuntimeError(f"the {w.spec.name} worker (pid {w.process.pid}) exited with code "
                                         f"{w.process.exitcode} while running job #{idx}")
                    attempts[idx] = attempts.get(idx, 0) + 1
                    if attempts[idx] <= retries:  # the same job again, in a fresh worker
                        log.warning(f"#{idx}: {error}; running it again ({attempts[idx]} of {retries})")
                        pending.appendleft(w.job)
                    else:
                        results[idx] = _failed(overrides, error)
                        log.error(f"#{idx} failed: {error}")
                    w.job, replace = None, True
                if replace:
                    w.stop(timeout=30)
                    del workers[slot]
                    if pending:  # (a job sent back for another attempt included)
                        workers[slot] = _Worker(ctx, w.spec, payload)
        finished = True
    finally:
        # normal end: ask each worker to exit; Ctrl-C or an error in the launcher: terminate them now
        for w in workers.values():
            w.stop(timeout=30 if finished else 0)
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    return results


def _interrupt_on_sigterm() -> Any:
    """While the pool runs, SIGTERM (kill, a scheduler's time limit) ends it like Ctrl-C, so that the
    workers are terminated too instead of finishing their jobs orphaned. Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


def _log_result(idx: int, ret: JobReturn, w: _Worker) -> None:
    where = f"{w.spec.name}, pid {w.process.pid}, {time.perf_counter() - w.started:.1f} s"
    value = ret._return_value
    if ret.status == JobStatus.COMPLETED:
        log.info(f"#{idx} done ({where})")
    elif isinstance(value, SystemExit):
        log.error(f"#{idx} failed ({where}): the job exited with status {value.code}")
    else:
        log.error(f"#{idx} failed ({where}): {type(value).__name__}: {value}")


