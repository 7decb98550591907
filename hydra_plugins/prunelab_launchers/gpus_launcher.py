"""``hydra/launcher=gpus``: the jobs of a multirun in parallel worker processes, one per GPU.

Each worker is a *spawned* process (a fresh interpreter, never a fork of the launching process) that
starts with ``CUDA_VISIBLE_DEVICES`` set to its one GPU and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
set to its share of the CPU cores, so CUDA and OpenMP see them before torch is imported there. Jobs go
to workers as workers free up, and the results come back to Hydra in job order. With no GPU visible
(or ``gpus: cpu``) the launcher runs ``cpu_workers`` CPU workers with ``CUDA_VISIBLE_DEVICES=""``.

Failures behave like Hydra's basic launcher: a job that raises is a failed ``JobReturn`` (its worker
traceback is attached as the exception's cause) and the other jobs still run; Hydra then reports
the first failed job in job order. A job that calls ``sys.exit(code)`` (the runner's bad-input path,
code 2) is a failed job whose ``SystemExit`` Hydra re-raises, so the command exits with that code once
every job is done. A worker that dies (killed, out of memory) fails its job and is replaced.

Hydra's plugin scanner imports (and re-imports) this module; the planning functions, the worker and
the pool live in the private ``_workers`` module, the structured config in ``_config``.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from ._config import GpusLauncherConf
from ._workers import (
    WorkerSpec,
    available_cores,
    dump_task,
    plan_workers,
    resolve_devices,
    run_pool,
    visible_gpus,
    wants_cpu,
)

log = logging.getLogger(__name__)

ConfigStore.instance().store(group="hydra/launcher", name="prunelab_gpus", node=GpusLauncherConf,
                             provider="prunelab")


class GpusLauncher(Launcher):
    """Run a multirun's jobs in parallel, one spawned worker process per GPU (or ``cpu_workers`` on CPU)."""

    def __init__(self, gpus: Any = "auto", jobs_per_gpu: int = 1, cpu_workers: int = 1,
                 threads_per_worker: int | None = None,
                 max_jobs_per_worker: int | None = None, retries: int = 1) -> None:
        super().__init__()
        self.gpus = OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_workers = cpu_workers
        self.threads_per_worker = threads_per_worker
        self.max_jobs_per_worker = max_jobs_per_worker
        self.retries = retries
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def workers(self, n_jobs: int) -> list[WorkerSpec]:
        devices = resolve_devices(self.gpus, [] if wants_cpu(self.gpus) else visible_gpus())
        return plan_workers(devices, n_jobs, available_cores(), cpu_workers=self.cpu_workers,
                            jobs_per_gpu=self.jobs_per_gpu, threads_per_worker=self.threads_per_worker)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import cloudpickle  # a dependency of submitit; pickles Hydra's state (lambda resolvers included)

        setup_globals()
        if not job_overrides:
            return []
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        specs = self.workers(len(job_overrides))
        threads = f"{specs[0].threads} thread" + ("s" if specs[0].threads != 1 else "")
        log.info(f"Launching {len(job_overrides)} jobs on {len(specs)} workers "
                 f"({', '.join(s.name for s in specs)}; {threads} each)")
        jobs = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            jobs.append((idx, list(overrides)))
        payload = cloudpickle.dumps((self.hydra_context, self.config, Singleton.get_state(),
                                     dump_task(self.task_function)))
        results = run_pool(specs, payload, jobs, self.max_jobs_per_worker, int(self.retries))
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [results[idx] for idx, _ in jobs]
