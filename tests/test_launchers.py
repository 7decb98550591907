"""Hydra launchers: ``hydra/launcher=gpus`` (our plugin, hydra_plugins/prunelab_launchers) and ``slurm`` (submitit).

The pure planning functions alone; the real CLI sweep in parallel CPU workers; a tiny Hydra app (in a
temporary folder, so the plugin must be found from another working directory) for the failure paths;
the launcher configs composed as Hydra composes them.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hydra_plugins.prunelab_launchers._workers import (
    WorkerSpec,
    assign_jobs,
    available_cores,
    parse_visible_devices,
    plan_workers,
    resolve_devices,
    split_threads,
)
from runners.cli import prevalidate

from .conftest import CONF_DIR, ROOT, compose

FAST = ["pruner=magnitude", "calib.nsamples=4", "eval.ppl.max_windows=4", "progress=false"]
PLUGIN_HINT = "is the package installed? re-run `pip install -e .` so that hydra_plugins/ is registered"


def _env(**extra: str) -> dict:
    # offline for certain (the failing job below needs the hub), the parent itself single-threaded
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run(cmd, cwd, env, timeout=600):
    """Run a command; return (returncode, stdout + stderr, stderr, its pid). Hydra logs to stdout."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return proc.returncode, stdout + stderr, stderr, proc.pid


def _optional_overrides() -> list[str]:
    """Keys that make the tiny runs faster where the config has them (no dense baseline, no W&B files)."""
    cfg = compose()
    return (["dense_baseline=false"] if "dense_baseline" in cfg else []) + (
        ["wandb.mode=disabled"] if "wandb" in cfg else [])


def _records(root):
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/result.json"))]


# ---------------------------------------------------------------------------------------------
# (a) the pure parts


@pytest.mark.parametrize("value,expected", [
    (None, None),                       # unset: every device is visible
    ("", []),                           # set but empty: no GPU
    ("0,2", ["0", "2"]),
    (" 1 , 3 ", ["1", "3"]),
    ("-1", []),
    ("0,-1,1", ["0"]),                  # CUDA stops at the first invalid entry
    ("0,cpu,1", ["0"]),
    ("GPU-8f6c1a2b-3d4e-5f60-7182-93a4b5c6d7e8,GPU-11111111-2222",
     ["GPU-8f6c1a2b-3d4e-5f60-7182-93a4b5c6d7e8", "GPU-11111111-2222"]),
    ("MIG-4f1d3e2a-aaaa-bbbb-cccc-111122223333", ["MIG-4f1d3e2a-aaaa-bbbb-cccc-111122223333"]),
])
def test_parse_visible_devices(value, expected):
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize("spec,visible,expected", [
    ("auto", ["0", "1"], ["0", "1"]),
    ("auto", [], []),
    ("cpu", ["0", "1"], []),
    (None, ["0"], []),
    ([], ["0"], []),
    ([0, 2], ["4", "5", "6"], ["4", "6"]),     # indices into the launching process's visible devices
    ("0,2", ["0", "1", "2"], ["0", "2"]),
    ([1], ["GPU-aaaa", "GPU-bbbb"], ["GPU-bbbb"]),
    (["GPU-cccc"], [], ["GPU-cccc"]),
])
def test_resolve_devices(spec, visible, expected):
    assert resolve_devices(spec, visible) == expected


@pytest.mark.parametrize("spec,visible,message", [
    ([3], ["0", "1"], "GPU 3 is not visible"),
    ([0], [], "GPU 0 is not visible (visible: none)"),
    ([0, 0], ["0"], "listed twice"),
    (2, ["0", "1", "2"], "give auto, cpu or a list"),
    (["x"], ["0"], "not a device index"),
])
def test_resolve_devices_rejects(spec, visible, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_devices(spec, visible)


@pytest.mark.parametrize("cores,workers,given,expected", [
    (2, 2, None, 1), (16, 3, None, 5), (1, 4, None, 1), (16, 4, 3, 3), (8, 1, None, 8)])
def test_split_threads(cores, workers, given, expected):
    assert split_threads(cores, workers, given) == expected


def test_split_threads_rejects_zero():
    with pytest.raises(ValueError, match="threads_per_worker=0"):
        split_threads(8, 2, 0)


def test_plan_workers():
    gpus = plan_workers(["4", "6"], n_jobs=5, cores=16)
    assert [(w.name, w.cuda_visible_devices, w.threads) for w in gpus] == [("gpu 4", "4", 8), ("gpu 6", "6", 8)]
    assert gpus[0].env() == {"CUDA_VISIBLE_DEVICES": "4", "OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    # never more workers than jobs; the cores go to the workers that run
    assert plan_workers(["4", "6"], n_jobs=1, cores=16) == [WorkerSpec("gpu 4", "4", 16)]
    shared = plan_workers(["0", "1"], n_jobs=8, cores=8, jobs_per_gpu=2)
    assert [w.cuda_visible_devices for w in shared] == ["0", "1", "0", "1"] and {w.threads for w in shared} == {2}
    cpu = plan_workers([], n_jobs=3, cores=2, cpu_workers=2)
    assert [(w.name, w.cuda_visible_devices, w.threads) for w in cpu] == [("cpu 0", "", 1), ("cpu 1", "", 1)]
    assert plan_workers([], n_jobs=3, cores=12, cpu_workers=2, threads_per_worker=3)[1].threads == 3
    with pytest.raises(ValueError, match="cpu_workers=0"):
        plan_workers([], n_jobs=3, cores=2, cpu_workers=0)


def test_assign_jobs_gives_the_next_jobs_in_order_to_the_free_workers():
    jobs = [(5, ["a=1"]), (6, ["a=2"]), (7, ["a=3"])]
    assert assign_jobs(jobs, [3, 1]) == [(1, jobs[0]), (3, jobs[1])]
    assert assign_jobs(jobs[2:], [0, 2]) == [(0, jobs[2])]
    assert assign_jobs(jobs, []) == [] and assign_jobs([], [0]) == []


# ---------------------------------------------------------------------------------------------
# (b) the real CLI: a sweep in two CPU worker processes, one job failing inside the job


@pytest.fixture(scope="module")
def cpu_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "wikitext").mkdir()  # an empty copy: it passes validation, the job fails where the data loads
    result = run([sys.executable, "-m", "runners.run", "-m", "hydra/launcher=gpus", "hydra.launcher.cpu_workers=2",
                  *FAST, "sparsity.ratio=0.5", "eval.ppl.datasets=[bundled],[wikitext2],[bundled-val]",
                  f"eval.ppl.dataset_root={mirror}", "sweep=launch", f"output_root={out}", *_optional_overrides()],
                 cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""))
    return out, result


def test_cli_sweep_runs_jobs_in_parallel_cpu_workers(cpu_sweep):
    out, (_, output, _, pid) = cpu_sweep
    assert "Launching 3 jobs on 2 workers (cpu 0, cpu 1" in output, output[-3000:]
    records = [r for r in _records(out) if r["pruner"] == "magnitude"]
    assert sorted(k for r in records for k in r["metrics"]["ppl"]) == ["bundled-val@256", "bundled@256"]
    # jobs #0 and #1 start at once on the two workers (which worker then takes #2 is a race)
    first = re.search(r"#0 done \(cpu 0, pid (\d+)", output)
    second = re.search(r"#1 failed \(cpu 1, pid (\d+)", output)
    assert first and second, output[-3000:]
    workers = {int(first.group(1)), int(second.group(1))}
    assert len(workers) == 2 and pid not in workers  # two workers, neither of them the launching process
    assert {r["device"]["pid"] for r in records} <= workers
    threads = split_threads(available_cores(), 2)
    for r in records:
        assert r["device"]["cuda_visible_devices"] == "" and r["device"]["device"] == "cpu"
        assert r["device"]["torch_threads"] == threads
        assert r["sparsity"]["overall"] == pytest.approx(0.5)


def test_cli_sweep_reports_the_failed_job_and_keeps_the_others(cpu_sweep):
    out, (returncode, output, stderr, _) = cpu_sweep
    # job #1 reads WikiText-2 from an empty local copy: it passes validation and fails inside the job;
    # its worker then takes job #2
    assert returncode == 1, output[-3000:]
    assert "Error executing job with overrides" in stderr and "eval.ppl.datasets=[wikitext2]" in stderr
    assert "#1 failed (cpu " in output and "#0 done (cpu " in output and "#2 done (cpu " in output
    assert "RemoteTraceback" in stderr  # the worker's traceback comes with the error
    assert len([r for r in _records(out) if r["pruner"] == "magnitude"]) == 2


# ---------------------------------------------------------------------------------------------
# a tiny Hydra app run from a temporary folder: failures, worker death, exit codes, job order

TOY = '''
import json, os, sys, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=".", config_name="toy")
def task(cfg):
    Path(cfg.out, f"{cfg.job}.json").write_text(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "num": HydraConfig.get().job.num,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS")}))
    if cfg.job == "slowfail":
        time.sleep(4)
        raise ValueError("slowfail: the first failed job")
    if cfg.job == "fail":
        raise ValueError("fail: a later job")
    if cfg.job == "exit2":
        sys.exit(2)
    if cfg.job == "die":
        os._exit(3)
    return cfg.job


if __name__ == "__main__":
    task()
'''


def run_toy(tmp_path, *overrides, env=None):
    (tmp_path / "app.py").write_text(textwrap.dedent(TOY))
    (tmp_path / "toy.yaml").write_text("job: ok\nout: .\nhydra:\n  sweep:\n    dir: ${out}/sweep\n")
    result = run([sys.executable, "app.py", "-m", "hydra/launcher=prunelab_gpus", f"out={tmp_path}", *overrides],
                 cwd=tmp_path, env=env or _env(), timeout=300)
    assert "Could not load 'hydra/launcher/prunelab_gpus'" not in result[1], PLUGIN_HINT
    marks = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    return result, marks


def test_failures_are_reported_in_job_order_and_a_dead_worker_is_replaced(tmp_path):
    (returncode, output, stderr, pid), marks = run_toy(tmp_path, "hydra.launcher.gpus=cpu", "hydra.launcher.cpu_workers=2",
                                                      "job=slowfail,die,fail,ok")
    assert returncode == 1, output[-3000:]
    assert set(marks) == {"slowfail", "die", "fail", "ok"}  # every job ran, the one after the death too
    assert all(m["ppid"] == pid and m["cuda_visible_devices"] == "" for m in marks.values())
    assert marks["slowfail"]["pid"] != marks["die"]["pid"]  # in parallel
    assert f"#1 failed: the cpu 1 worker (pid {marks['die']['pid']}) exited with code 3" in output
    assert "#2 failed (cpu " in output and "ValueError: fail: a later job" in output
    assert "#3 done (cpu " in output
    # Hydra raises the first failed job *in job order* (job 0 failed last), with the worker's traceback
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == "ValueError: slowfail: the first failed job", output[-3000:]
    # the worker's frame (cloudpickle >= 3.1.3 names the file of a by-value function "<dynamic-code>")
    assert "RemoteTraceback" in stderr and ", in task\n" in stderr


def test_sys_exit_in_a_job_ends_the_sweep_with_its_code_and_fresh_workers(tmp_path):
    (returncode, output, _, _), marks = run_toy(tmp_path, "hydra.launcher.gpus=cpu", "hydra.launcher.cpu_workers=1",
                                               "hydra.launcher.max_jobs_per_worker=1",
                                               "hydra.launcher.threads_per_worker=3", "job=ok,exit2")
    assert returncode == 2, output[-3000:]
    assert "#1 failed (cpu 0, pid" in output and "the job exited with status 2" in output
    assert set(marks) == {"ok", "exit2"} and marks["ok"]["pid"] != marks["exit2"]["pid"]  # a new process per job
    assert [marks[k]["num"] for k in ("ok", "exit2")] == [0, 1]
    assert all(m["omp"] == "3" for m in marks.values())


def test_each_worker_sees_one_of_the_visible_gpus(tmp_path):
    """The pinning itself needs no GPU: the workers' CUDA_VISIBLE_DEVICES come from the launcher's."""
    (_, output, _, _), marks = run_toy(tmp_path, "hydra.launcher.gpus=auto", "job=a,b,c",
                                       env=_env(CUDA_VISIBLE_DEVICES="3,GPU-5f00"))
    assert "Launching 3 jobs on 2 workers (gpu 3, gpu GPU-5f00" in output, output[-3000:]
    devices = {m["num"]: m["cuda_visible_devices"] for m in marks.values()}
    assert set(devices.values()) == {"3", "GPU-5f00"} and devices[0] != devices[1]  # the first two in parallel
    (_, output, _, _), marks = run_toy(tmp_path, "hydra.launcher.gpus=[1]", "job=d", env=_env(CUDA_VISIBLE_DEVICES="3,5"))
    assert marks["d"]["cuda_visible_devices"] == "5", output[-3000:]


# ---------------------------------------------------------------------------------------------
# (c, d) the launcher configs compose, resolve and pass the runner's pre-validation


def compose_hydra(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)  # for ${hydra:...} and ${hydra.sweep.dir}
        return cfg, OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_launcher_config():
    cfg, launcher = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
                                  "hydra.launcher.setup=[module load cuda]", "sweep=s1")
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["account"], launcher["qos"]) == ("gpu", "lab", None)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)
    assert launcher["timeout_min"] > 0 and launcher["cpus_per_task"] > 0 and launcher["mem_gb"] > 0
    assert launcher["array_parallelism"] > 0 and launcher["setup"] == ["module load cuda"]
    assert launcher["submitit_folder"].startswith("outputs/s1/.hydra/") and launcher["submitit_folder"].endswith(
        "/.submitit/%j")
    plugin = instantiate(cfg.hydra.launcher)  # the submitit plugin accepts every key (nothing is submitted)
    assert type(plugin).__name__ == "SlurmLauncher" and plugin.params["partition"] == "gpu"
    assert prevalidate(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "pruner=magnitude,wanda"]) is None


def test_gpus_launcher_config(monkeypatch):
    cfg, launcher = compose_hydra("hydra/launcher=gpus")
    assert launcher == {"_target_": "hydra_plugins.prunelab_launchers.gpus_launcher.GpusLauncher", "gpus": "auto",
                        "jobs_per_gpu": 1, "cpu_workers": 1, "threads_per_worker": None, "max_jobs_per_worker": None,
                        "retries": 1}
    cfg, launcher = compose_hydra("hydra/launcher=gpus", "hydra.launcher.gpus=[0,2]")
    plugin = instantiate(cfg.hydra.launcher)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert [(w.name, w.cuda_visible_devices) for w in plugin.workers(n_jobs=3)] == [("gpu 4", "4"), ("gpu 6", "6")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [w.cuda_visible_devices for w in instantiate(compose_hydra("hydra/launcher=gpus")[0].hydra.launcher)
            .workers(n_jobs=3)] == [""]
    with pytest.raises(Exception, match="cpu_workers"):  # a typed structured config
        compose_hydra("hydra/launcher=gpus", "hydra.launcher.cpu_workers=two")
    assert prevalidate(["-m", "hydra/launcher=gpus", "hydra.launcher.cpu_workers=2", "sparsity.ratio=0.5,0.6"]) is None


# ---------------------------------------------------------------------------------------------
# CUDA: one job per GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sweep_pins_one_gpu_per_job(tmp_path):
    returncode, output, _, pid = run([sys.executable, "-m", "runners.run", "-m", "hydra/launcher=gpus", *FAST,
                                      "sparsity.ratio=0.5,0.6", "sweep=gpus", f"output_root={tmp_path}",
                                      *_optional_overrides()], cwd=ROOT, env=_env())
    assert returncode == 0, output[-3000:]
    records = [r for r in _records(tmp_path) if r["pruner"] == "magnitude"]
    assert len(records) == 2
    visible = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")) or [
        str(i) for i in range(torch.cuda.device_count())]
    for r in records:
        assert r["device"]["device"] == "cuda" and r["device"]["pid"] != pid
        assert r["device"]["cuda_visible_devices"] in visible  # exactly one device
    if len(visible) >= 2:  # two GPUs: the two jobs ran at once, each on its own
        assert len({r["device"]["cuda_visible_devices"] for r in records}) == 2
        assert len({r["device"]["pid"] for r in records}) == 2
