"""The command line as a user runs it: records, multirun, and bad input -> one line, exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

FAST = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled"]


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    proc = run_cli("-m", "model=tiny-llama,tiny-mamba", "pruner=magnitude,wanda", "sparsity=2of4", f"output_root={out}",
                   "sweep=cli", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_multirun_writes_one_complete_record_per_job(finished_sweep):
    out, proc = finished_sweep
    everything = [json.loads(p.read_text()) for p in sorted((out / "cli").glob("*/result.json"))]
    dense = [r for r in everything if r["pruner"] == "dense"]
    assert sorted(r["model"]["name"] for r in dense) == ["tiny-llama", "tiny-mamba"], "one dense baseline per model"
    records = [r for r in everything if r["pruner"] != "dense"]
    assert len(records) == 4
    assert {(r["model"]["name"], r["pruner"]) for r in records} == {
        (m, p) for m in ("tiny-llama", "tiny-mamba") for p in ("magnitude", "wanda")}
    for r in records:
        assert r["sparsity"]["overall"] == pytest.approx(0.5)
        assert r["pattern"]["label"] == "2:4"
        (key, metric), = r["metrics"]["ppl"].items()
        assert key == "bundled@256" and metric["protocol"]["windows"] == 4 and metric["value"] > 1
        assert set(r["timings_s"]) >= {"load", "prune", "total", "eval/bundled@256"}
        assert r["versions"]["torch"] and r["versions"]["transformers"] and r["seed"] == 0
        assert r["memory"]["peak_host_rss_mb"] > 0 and r["device"]["device"] == "cpu"
        assert r["config"]["model"]["name"] == r["model"]["name"]
        if r["pruner"] == "wanda":
            assert r["calibration"]["nsamples"] == 8 and r["calibration"]["tokens_sha256"]
        else:
            assert r["calibration"] is None
    assert not list((out / "cli").glob("*/.tmp-*"))
    assert proc.stdout.count("record:") == 4


def test_rerunning_a_sweep_recomputes_nothing(finished_sweep):
    out, _ = finished_sweep
    before = {p: p.read_bytes() for p in (out / "cli").glob("*/result.json")}
    proc = run_cli("-m", "model=tiny-llama,tiny-mamba", "pruner=magnitude,wanda", "sparsity=2of4",
                   f"output_root={out}", "sweep=cli", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped: already recorded") == 4
    assert {p: p.read_bytes() for p in (out / "cli").glob("*/result.json")} == before


@pytest.mark.parametrize("args,message", [
    (["pruner=foo"], "pruner=foo is not an option (choose from: "),
    (["sparsity.ratio=1.0"], "sparsity: sparsity.ratio=1.0 is outside [0, 1)"),
    (["sparsity=nm", "sparsity.n=4", "sparsity.m=2"], "needs 0 < n < m"),
    (["model=local", "model.path=/no/such/checkpoint"], "model.path=/no/such/checkpoint: no such directory"),
    (["-m", "pruner=wanda,sparsegpt", "sparsity.ratio=0.5,1.5"], "outside [0, 1)"),
    (["pruner=wanda,sparsegpt"], "is a sweep: add -m"),
    (["not_a_key=3"], "not_a_key"),
])
def test_bad_input_exits_2_with_one_line_and_loses_nothing(finished_sweep, args, message):
    out, _ = finished_sweep
    before = sorted(p.read_bytes() for p in (out / "cli").glob("*/result.json"))
    proc = run_cli(*args, f"output_root={out}", "sweep=cli")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunelab: error:") and message in lines[0], proc.stderr
    assert sorted(p.read_bytes() for p in (out / "cli").glob("*/result.json")) == before


def test_unsupported_architecture_exits_2(tmp_path):
    ckpt = tmp_path / "gpt2ish"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = run_cli("model=local", f"model.path={ckpt}", f"output_root={tmp_path}")
    assert proc.returncode == 2
    assert "model_type 'gpt2' is not supported" in proc.stderr
    assert not (Path(tmp_path) / "default").exists() or not list((Path(tmp_path) / "default").glob("*/result.json"))
