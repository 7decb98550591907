"""The structured config of ``hydra/launcher=gpus`` (``hydra/launcher=prunelab_gpus`` in Hydra's ConfigStore).

A private module (Hydra's plugin scanner skips ``_`` names and re-executes the modules it scans), so
the class stays one object per process and configs that carry it pickle between processes.
"""

from dataclasses import dataclass
from typing import Any


@dataclass
class GpusLauncherConf:
    """``hydra.launcher`` keys of ``hydra/launcher=gpus`` (conf/hydra/launcher/gpus.yaml documents them)."""

    _target_: str = "hydra_plugins.prunelab_launchers.gpus_launcher.GpusLauncher"
    # auto: every GPU the launching process sees (its CUDA_VISIBLE_DEVICES, else torch.cuda.device_count());
    # a list of indices into those, e.g. [0,2], or of GPU-/MIG- uuids; cpu: CPU workers only
    gpus: Any = "auto"
    # workers per GPU (small models: several jobs share one GPU)
    jobs_per_gpu: int = 1
    # CPU worker processes when no GPU is used
    cpu_workers: int = 1
    # torch / OpenMP threads per worker; null: the launching process's cores // workers
    threads_per_worker: int | None = None
    # start a fresh worker after this many jobs (1: a new process per job); null: keep workers
    max_jobs_per_worker: int | None = None
    # a job whose worker dies (killed, out of memory) runs again this many times in a fresh worker: the same run,
    # which with engine.resume=true goes on after the last block it kept
    retries: int = 1
