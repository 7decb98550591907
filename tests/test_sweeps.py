"""Resumable sweeps: ids, skips, reuse across sweeps, the dense baseline once, kills lose nothing; W&B offline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runners import tracking
from runners.record import source_digest
from runners.run import execute

from .conftest import ROOT, compose

FAST = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false"]


def records(folder):
    return {p.parent.name: p.read_bytes() for p in sorted(folder.glob("*/result.json"))}


def test_same_run_is_skipped_other_sweeps_reuse_it_and_force_recomputes(tmp_path):
    common = ["pruner=magnitude", f"output_root={tmp_path}", "wandb.mode=disabled", *FAST]
    first = execute(compose(*common, "sweep=a"))
    assert first["status"] == "computed"
    dense = [p for p in (tmp_path / "a").glob("*/result.json") if "_dense_" in p.parent.name]
    assert len(dense) == 1, "the dense baseline is recorded before the first pruning run"
    dense_record = json.loads(dense[0].read_text())
    assert dense_record["pruner"] == "dense" and dense_record["sparsity"]["overall"] == 0.0
    before = records(tmp_path / "a")

    again = execute(compose(*common, "sweep=a"))
    assert again["status"] == "skipped" and again["run_id"] == first["run_id"]
    assert records(tmp_path / "a") == before, "a skipped run rewrites nothing"

    # another sweep: the record (and the dense baseline) is copied, not recomputed
    other = execute(compose(*common, "sweep=b"))
    assert other["status"] == "reused" and other["reused_from"].endswith(f"a/{first['run_id']}/result.json")
    copied = json.loads((tmp_path / "b" / first["run_id"] / "result.json").read_text())
    assert copied["metrics"] == first["metrics"] and copied["sweep"] == "b"
    assert (tmp_path / "b" / dense[0].parent.name / "result.json").exists()

    # a different dense-independent setting reuses the dense baseline of the same model and eval
    second = execute(compose(*common, "sweep=a", "sparsity.ratio=0.6"))
    assert second["status"] == "computed"
    assert len([p for p in (tmp_path / "a").glob("*_dense_*/result.json")]) == 1

    forced = execute(compose(*common, "sweep=a", "force=true"))
    assert forced["status"] == "computed" and records(tmp_path / "a")[first["run_id"]] != before[first["run_id"]]
    assert forced["metrics"]["ppl"] == first["metrics"]["ppl"], "deterministic: same config, same numbers"


def test_run_id_includes_the_code_version(monkeypatch):
    from omegaconf import OmegaConf

    from runners import record

    config = OmegaConf.to_container(compose(), resolve=True)
    base = record.run_id(config)
    assert len(source_digest()) == 12
    monkeypatch.setattr(record, "code_fingerprint", lambda name, root=None: "0" * 12)
    assert record.run_id(config) != base


def _cli(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "runners.run", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_sweep_keeps_its_records_and_the_rerun_finishes_the_rest(tmp_path):
    args = ["-m", "model=tiny-llama", "pruner=magnitude", "sparsity.ratio=0.3,0.5,0.7", f"output_root={tmp_path}",
            "sweep=k", "wandb.mode=disabled", *FAST]
    proc = _cli(*args, start_new_session=True)
    folder = tmp_path / "k"
    deadline = time.time() + 300
    while time.time() < deadline and len([p for p in folder.glob("*_magnitude_*/result.json")]) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.wait()
    done = records(folder)
    assert any("_magnitude_" in name for name in done), "the first job finished before the kill"
    for content in done.values():
        json.loads(content)  # every record that exists is complete

    rerun = _cli(*args)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-2000:]
    finished = records(folder)
    assert len([n for n in finished if "_magnitude_" in n]) == 3
    for name, content in done.items():
        assert finished[name] == content, f"{name} was recomputed"
    assert out.count("skipped: already recorded") == len([n for n in done if "_magnitude_" in n])


def test_wandb_offline_logs_config_summary_and_per_layer_sparsity(tmp_path):
    cfg = compose("pruner=wanda", "sparsity=2of4", f"output_root={tmp_path}", "sweep=wb", "wandb.mode=offline",
                  "dense_baseline=false", *FAST)
    record = execute(cfg)
    import wandb

    wandb.teardown()  # W&B's background service writes the offline run: wait for it to exit before reading
    runs = tracking.offline_runs(tmp_path / "wb")
    assert len(runs) == 1
    logged = tracking.read_offline_run(runs[0])
    assert logged["group"] == "wb" and logged["name"] == record["run_id"] and logged["job_type"] == "wanda"
    assert logged["config"]["run_id"] == record["run_id"]
    assert logged["config"]["sparsity"] == {"kind": "nm", "n": 2, "m": 4, "allocation": "uniform", "owl_lambda": 0.08,
                                            "owl_m": 5, "targets": ["*"], "ignore": [], "block_ratios": []}
    key = "ppl/bundled@256"
    assert logged["summary"][key] == pytest.approx(record["metrics"]["ppl"]["bundled@256"]["value"])
    assert logged["summary"]["sparsity/overall"] == pytest.approx(record["sparsity"]["overall"])
    (table,) = [t for name, t in logged["tables"].items() if name.startswith("per_layer_sparsity")]
    assert dict(table["data"]) == record["sparsity"]["per_module"]


def test_wandb_failure_never_fails_the_run(tmp_path, monkeypatch):
    # online without credentials or network: W&B refuses, the run and its record go on
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose("pruner=magnitude", f"output_root={tmp_path}", "sweep=wbfail", "wandb.mode=online",
                  "dense_baseline=false", *FAST)
    record = execute(cfg)
    assert record["status"] == "computed"
    assert json.loads((tmp_path / "wbfail" / record["run_id"] / "result.json").read_text())["run_id"] == record["run_id"]
    # the unreachable server: the run was logged offline instead (wandb sync uploads it later); its contents are
    # written by W&B's background service, so they are not read here (no race with a background writer: the
    # offline test above reads a run W&B was started offline for)
    (run,) = tracking.offline_runs(tmp_path / "wbfail")
    assert next(run.glob("run-*.wandb"), None) is not None


def test_sparsity_above_the_target_is_a_warning_and_a_record_field(tmp_path):
    """A calibration text that leaves ReLU inputs dead: SparseGPT zeroes the dead columns on top of its 50% (as the
    reference does); the record says by how much and warns. Magnitude on the same model meets the target."""
    text = tmp_path / "dead.txt"
    text.write_text("the the the the . " * 4000)
    common = ["model=tiny-opt", "calib=text", f"calib.path={text}", f"output_root={tmp_path}", "sweep=dev",
              "wandb.mode=disabled", "dense_baseline=false", *FAST]
    over = execute(compose("pruner=sparsegpt", *common))["sparsity"]
    assert over["deviation"] > 0.01 and over["overall"] == pytest.approx(0.5 + over["deviation"], abs=1e-5)
    assert "points above the target 50.00%" in over["warning"]
    exact = execute(compose("pruner=magnitude", *common))["sparsity"]
    assert abs(exact["deviation"]) < 1e-3 and "warning" not in exact


def test_sparsity_deviation_allows_rounding_only():
    from pruners.accounting import sparsity_deviation

    assert "warning" not in sparsity_deviation(0.28125, 0.3, "unstructured", True, 32)  # int(0.3 * 32) = 9 of 32
    assert "below the target" in sparsity_deviation(0.25, 0.3, "unstructured", True, 32)["warning"]
    assert "below the target" in sparsity_deviation(0.49, 0.5, "nm", True, 64)["warning"]  # N:M is exact
    assert "above the target" in sparsity_deviation(0.502, 0.5, "unstructured", True, 64)["warning"]


def _second_run_while_held(record: Path, content: bytes, args: list[str]) -> tuple[int, str]:
    """Run the CLI with ``args`` while the test holds ``record``'s run lock, as a first process computing it would;
    once the second process says it waits, the "first" writes ``content`` as its record and lets the lock go
    (no timing involved). Returns the second process's exit code and output."""
    import threading

    from runners.record import run_lock

    held, release = threading.Event(), threading.Event()

    def first_process():
        with run_lock(record.parent):
            held.set()
            release.wait(600)
            record.write_bytes(content)  # its record, then the lock goes

    holder = threading.Thread(target=first_process)
    holder.start()
    held.wait(60)
    second = _cli(*args)
    lines = []
    for line in second.stdout:
        lines.append(line)
        if "waiting for its record" in line:
            release.set()
    second.wait(timeout=600)
    holder.join()
    return second.returncode, "".join(lines)


def test_a_second_process_of_a_run_waits_for_the_first_and_reuses_its_record(tmp_path):
    """The run's lock held (here by the test, as a first process would): a second process of the same run id
    waits, and once the record is there and the lock free it reuses the record instead of computing the run."""
    args = ["model=tiny-llama", "pruner=magnitude", f"output_root={tmp_path}", "sweep=twice", "wandb.mode=disabled",
            "dense_baseline=false", *FAST]
    first = _cli(*args)
    assert first.communicate(timeout=600)[0] and first.returncode == 0
    (record,) = tmp_path.glob("twice/*/result.json")
    content = record.read_bytes()
    record.unlink()  # as if the first process were still computing it
    returncode, out = _second_run_while_held(record, content, args)
    assert returncode == 0 and "waiting for its record" in out, out[-2000:]
    assert "skipped: already recorded" in out and record.read_bytes() == content
    assert not (record.parent / ".lock").exists()


def test_a_dense_baseline_being_computed_by_another_job_is_waited_for_not_computed_twice(tmp_path):
    """Two jobs of a sweep that share a dense baseline: the second waits on the baseline's lock (held here by the
    test, as the first job would) and keeps the first's baseline record instead of writing its own."""
    args = ["model=tiny-llama", "pruner=magnitude", f"output_root={tmp_path}", "sweep=shared", "wandb.mode=disabled",
            *FAST]
    first = _cli(*args)
    assert first.communicate(timeout=600)[0] and first.returncode == 0
    (dense,) = tmp_path.glob("shared/*dense*/result.json")
    (pruned,) = (p for p in tmp_path.glob("shared/*/result.json") if p != dense)
    content = dense.read_bytes()
    dense.unlink()
    pruned.unlink()  # the pruning run must compute again; its baseline is "being computed" by the holder
    returncode, out = _second_run_while_held(dense, content, args)
    assert returncode == 0 and f"dense baseline {dense.parent.name} is being computed" in out, out[-2000:]
    assert "dense baseline recorded" not in out and dense.read_bytes() == content  # kept, not rewritten
    assert pruned.exists() and not (dense.parent / ".lock").exists()


def test_a_lock_left_by_a_killed_process_is_free_and_a_failed_holder_leaves_nothing(tmp_path):
    from runners.record import run_lock

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text("some-node 12345\n")  # a holder killed -9: its kernel lock went with it
    with run_lock(folder) as waited:
        assert not waited and (folder / ".lock").read_text().split()[1] == str(os.getpid())
    assert not folder.exists()  # released, and the empty folder removed
    with pytest.raises(RuntimeError, match="the run failed"), run_lock(folder):
        raise RuntimeError("the run failed")
    assert not folder.exists()
