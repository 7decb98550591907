"""The command line as a user runs it: records, multirun, and bad input -> one line, exit code 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import ROOT, compose

FAST = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled"]


OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=cwd, env=OFFLINE, capture_output=True,
                          text=True, timeout=600)


def run_cli_batch(commands: list[list[str]], folder: Path) -> dict[tuple, SimpleNamespace]:
    """Each command as ``run_cli`` would run it (exit code, stdout, stderr), all from one interpreter start
    (tests/cli_batch.py: a forked child per command); keyed by the command's arguments."""
    cases, results = folder / "cases.json", folder / "results.json"
    cases.write_text(json.dumps([{"args": list(c)} for c in commands]))
    proc = subprocess.run([sys.executable, "-m", "tests.cli_batch", str(cases), str(results)], cwd=ROOT, env=OFFLINE,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {tuple(c): SimpleNamespace(**r) for c, r in zip(commands, json.loads(results.read_text()), strict=True)}


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


BAD_INPUT = [
    (["pruner=foo"], "pruner=foo is not an option (choose from: "),
    (["sparsity.ratio=1.0"], "sparsity: sparsity.ratio=1.0 is outside [0, 1)"),
    (["sparsity=nm", "sparsity.n=4", "sparsity.m=2"], "needs 0 < n < m"),
    (["model=local", "model.path=/no/such/checkpoint"], "model.path=/no/such/checkpoint: no such directory"),
    (["-m", "pruner=wanda,sparsegpt", "sparsity.ratio=0.5,1.5"], "outside [0, 1)"),
    (["pruner=wanda,sparsegpt"], "is a sweep: add -m"),
    (["not_a_key=3"], "not_a_key"),
    (["pruner=numerical"], "pruner 'numerical' does not support sparsity kind 'unstructured'"),
    (["sparsity=structured", "sparsity.ratio=0.3"], "pruner 'sparsegpt' does not support sparsity kind 'structured'"),
    (["-m", "pruner=numerical,flap", "sparsity=structured", "sparsity.ratio=0.2,1.2"], "outside [0, 1)"),
    (["-m", "pruner=surgeon,kobd", "pruner.shots=4"], "is written ++pruner.shots=4"),
    (["-m", "pruner=flap", "sparsity=structured", "pruner.blocks=[0,1],[1,99]"],  # (a later job, the same model)
     "pruner.blocks=[1, 99] goes past the model's 4 blocks"),
    (["sparsity=2of4", "sparsity.allocation=owl"], "sparsity.allocation=owl needs an unstructured pattern"),
    (["sparsity.allocation=owll"], "sparsity.allocation=owll is not one of: uniform, owl, global"),
    (["pruner=sparsegpt", "sparsity.allocation=global"], "allocation=global needs a method with a per-weight score"),
    (["pruner=flap", "sparsity=structured", "sparsity.ignore=[mlp.*]"], "do not apply to structured pruning"),
    (["pruner=wanda", "model=tiny-llama", "sparsity.targets=[attn.*]"], "select no prunable linear"),
    (["sparsity.owl_lambda=abc"], "sparsity.owl_lambda=abc is not a number"),
    (["seed=1.5"], "seed=1.5 is not an integer"),
    (["model.attn_implementation=foo"], "model.attn_implementation=foo: "),
    (["model=local", "model.path=models/tiny/tiny-mamba", "model.seqlen=256", "model.attn_implementation=sdpa"],
     "model.attn_implementation=sdpa: MambaForCausalLM does not support"),
    (["engine.batch_size=true"], "engine.batch_size=True is not an integer"),
    (["calib=text", "calib.path=/tmp/dé x.txt"], "calib.path=/tmp/dé x.txt: Hydra cannot read this value unquoted"),
]


@pytest.fixture(scope="module")
def bad_input_runs(finished_sweep, tmp_path_factory):
    """Every BAD_INPUT command against the finished sweep's output_root, and its records before / after them all."""
    out, _ = finished_sweep
    records = lambda: sorted(p.read_bytes() for p in (out / "cli").glob("*/result.json"))  # noqa: E731
    before = records()
    runs = run_cli_batch([[*args, f"output_root={out}", "sweep=cli"] for args, _ in BAD_INPUT],
                         tmp_path_factory.mktemp("bad-input"))
    return {key[:-2]: proc for key, proc in runs.items()}, before, records()


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_loses_nothing(bad_input_runs, args, message):
    runs, before, after = bad_input_runs
    proc = runs[tuple(args)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunelab: error:") and message in lines[0], proc.stderr
    assert after == before  # (no command of the batch changed or added a record)


UNUSABLE_DATA = [
    (["calib=text", "calib.path={empty}"], "calib.path={empty}: 0 tokens, fewer than one calibration window of 256"),
    (["calib=text", "calib.path={short}"], "calib.path={short}: 2 tokens, fewer than one calibration window"),
    (["calib=text", "calib.path={binary}"], "calib.path={binary}: not UTF-8 text (byte 0xff at position 3)"),
    (["calib.nsamples=1000000"], "calib.nsamples=1000000: 1000000 windows of 256 tokens need 256000000 tokens"),
    (["eval.ppl.datasets=[{empty}]"], "eval.ppl.datasets: {empty}: 0 tokens, fewer than one window of 256"),
    (["pruner=magnitude", "eval.ppl.datasets=[{binary}]"], "eval.ppl.datasets: {binary}: not UTF-8 text"),
    (["model.tokenizer=/no/such/tokenizer"], "model.tokenizer=/no/such/tokenizer: no such directory"),
    # offline (run_cli sets HF_HUB_OFFLINE; the test's HF_HOME is empty): one line at once, no minute of retries
    (["model=opt-125m"], "model.path=facebook/opt-125m: not in the local Hugging Face cache and offline mode is set"),
    (["calib=c4"], "calib=c4: dataset allenai/c4 is not in the local Hugging Face cache"),
    (["eval=ppl"], "eval.ppl.datasets (wikitext2): dataset wikitext is not in the local Hugging Face cache"),
    (["calib=c4", "calib.dataset_root={mirror}"], "calib.dataset_root={mirror}: no {mirror}/allenai/c4"),
    (["eval.zeroshot.tasks=[boolq]"], "lm-eval task 'boolq' cannot be loaded offline"),
    (["calib=text", "calib.path='{unicode}'"], "calib.path={unicode}: 0 tokens"),  # quoted: the path reaches us
    (["model=local", "model.path={truncated}", "model.seqlen=256"],
     "model.path={truncated}: {truncated}/model.safetensors: 1387168 bytes, its header describes 2774336"),
]


@pytest.fixture(scope="module")
def unusable_data_runs(tmp_path_factory):
    """Every UNUSABLE_DATA command, each with an output_root of its own; the files they name."""
    base = tmp_path_factory.mktemp("unusable-data")
    files = {"empty": base / "empty.txt", "short": base / "short.txt", "binary": base / "binary.txt",
             "unicode": base / "Persuasion é x.txt"}
    files["empty"].write_text("")
    files["unicode"].write_text("")
    files["short"].write_text("Emma Woodhouse")
    files["binary"].write_bytes(b"abc\xff\xfe\x00\x01" * 50)
    names = {k: str(v) for k, v in files.items()} | {"mirror": str(base / "mirror"), "truncated": str(base / "truncated")}
    (base / "mirror").mkdir()
    shutil.copytree(ROOT / "models" / "tiny" / "tiny-opt", base / "truncated")  # half its weights file
    weights = base / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    commands = [[*(a.format(**names) for a in args), f"output_root={base / f'out{i}'}", "sweep=data",
                 "dense_baseline=true"] for i, (args, _) in enumerate(UNUSABLE_DATA)]
    runs = run_cli_batch(commands, base)
    by_case = {tuple(args): (runs[tuple(c)], base / f"out{i}") for i, ((args, _), c) in
               enumerate(zip(UNUSABLE_DATA, commands, strict=True))}
    return by_case, names


@pytest.mark.parametrize("args,message", UNUSABLE_DATA)
def test_unusable_data_exits_2_before_any_record_or_model(unusable_data_runs, args, message):
    """Calibration and evaluation texts are read and tokenized before the dense baseline or the model: an empty,
    too short or binary text, or more windows than the text holds, is one line naming the key, and nothing is
    written under output_root."""
    runs, names = unusable_data_runs
    proc, out = runs[tuple(args)]
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prunelab: error:") and message.format(**names) in lines[0], \
        proc.stderr
    assert not list(out.rglob("result.json")) and not list(out.rglob("*.safetensors"))


def test_unsupported_architecture_exits_2(tmp_path):
    ckpt = tmp_path / "bertish"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert"}))
    proc = run_cli("model=local", f"model.path={ckpt}", f"output_root={tmp_path}")
    assert proc.returncode == 2
    assert "model_type 'bert' is not supported" in proc.stderr
    assert not (Path(tmp_path) / "default").exists() or not list((Path(tmp_path) / "default").glob("*/result.json"))


def test_structured_run_prints_the_smaller_model_its_speed_and_saves_a_reloadable_checkpoint(tmp_path):
    """The issue's command: parameter counts before -> after, decode / prefill speed dense vs pruned, a record
    with the kept units per block, and save_model=true -> a folder that model=local reloads exactly."""
    speed = ["speed.repeats=2", "speed.new_tokens=4", "speed.prompt_len=16", "speed.batch_size=2", "speed.threads=1"]
    proc = run_cli("pruner=numerical", "sparsity=structured", "sparsity.ratio=0.3", "model=tiny-llama", "save_model=true",
                   f"output_root={tmp_path}", "sweep=struct", *FAST, *speed)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parameters 1,262,720 -> " in proc.stdout and "speed: decode " in proc.stdout, proc.stdout
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "struct").glob("*numerical*/result.json")]
    structure = record["structure"]
    assert structure["parameters_after"] < structure["parameters_before"] == 1262720
    assert record["sparsity"]["target"] == 0.3 and abs(record["sparsity"]["overall"] - 0.3) < 0.05
    assert record["sparsity"]["overall"] == structure["removed_fraction"]
    for block in structure["blocks"]:
        kept = block["mlp_neuron"]
        assert kept["of"] == 352 and len(kept["kept_units"]) == kept["kept"] < 352
    sp = record["metrics"]["speed"]
    assert sp["pruned"]["parameters"] == structure["parameters_after"] and sp["dense"]["setup"]["batch_size"] == 2
    assert sp["speedup"]["parameters"] > 1
    # the saved model reloads through the documented path with the very same perplexity
    import models
    from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows

    from .conftest import compose

    again = models.load(compose("model=local", f"model.path={record['saved_model']}", "model.seqlen=256").model, "cpu")
    ids, _ = protocol_windows(again.tokenizer, PROTOCOLS["bundled"], 256, max_windows=4)
    value = perplexity(again.model, again.adapter, ids, batch_size=8, progress=False)
    assert value == pytest.approx(record["metrics"]["ppl"]["bundled@256"]["value"], rel=1e-6)
    assert sum(p.numel() for p in again.model.parameters()) == structure["parameters_after"]
    # the report's speed table carries the record's numbers
    import pandas as pd

    from runners.report import main as report_main

    assert report_main([str(tmp_path / "struct"), "--wandb", "disabled"]) == 0
    table = pd.read_csv(tmp_path / "struct" / "report" / "speed.csv")
    (row,) = table.to_dict("records")
    assert row["parameters"] == structure["parameters_after"] and row["decode speedup"] == sp["speedup"]["decode"]
    assert "batch 2, prompt 16" in (tmp_path / "struct" / "report" / "speed.md").read_text()


def test_a_misspelt_key_inside_a_preset_exits_2_before_anything_runs(tmp_path):
    """A preset of the user's own (``-cd`` DIR/experiment/NAME.yaml) with a typo: one line naming the key."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nsparsity:\n  ratoi: 0.6\nsweep: mine\n")
    proc = run_cli("-cd", str(tmp_path / "conf"), "+experiment=mine", f"output_root={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["prunelab: error: sparsity.ratoi: unknown key of sparsity (did you mean sparsity.ratio?)"], lines
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_config_are_an_error_not_random_weights(tmp_path):
    """An OPT config.json beside Mamba weights: transformers would initialise every OPT weight at random."""
    import shutil

    frank = tmp_path / "frank"
    frank.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "tiny" / "tiny-opt" / name, frank / name)
    shutil.copy(ROOT / "models" / "tiny" / "tiny-mamba" / "model.safetensors", frank / "model.safetensors")
    proc = run_cli("model=local", f"model.path={frank}", "model.seqlen=256", f"output_root={tmp_path / 'out'}",
                   "wandb.mode=disabled", "progress=false")
    assert proc.returncode == 2
    assert f"prunelab: error: model.path={frank}: the weights do not fit the architecture" in proc.stderr
    assert "missing" in proc.stderr and "unexpected" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip() and "Loading weights" not in line]) == 1
    assert not list((tmp_path / "out").rglob("result.json"))


def test_ctrl_c_prints_one_line_and_keeps_what_finished(tmp_path):
    """SIGINT once the first job's record is written (read from the output, not timed): exit 130, one line on what
    was kept, the finished record complete. The second job's run lock is held by the test, so the sweep is still
    running (waiting for it) when the signal comes, however fast its jobs are."""
    import signal
    import threading

    from runners.record import run_lock

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    common = ["pruner=magnitude", "dense_baseline=false", "sweep=s", "progress=false", "wandb.mode=disabled",
              "eval.ppl.max_windows=4"]
    from runners.run import execute

    # the second job's run id (output_root is not part of it), from the same run in this process
    second = execute(compose(*common, "sparsity.ratio=0.4", f"output_root={tmp_path / 'probe'}"))["run_id"]
    root = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def first_holder():
        with run_lock(root / "s" / second):
            held.set()
            release.wait(600)

    holder = threading.Thread(target=first_holder)
    holder.start()
    held.wait(60)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "runners.run", "-m", *common, "sparsity.ratio=0.3,0.4,0.5,0.6",
                                 f"output_root={root}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                # (a test suite started in the background of a shell inherits SIGINT ignored)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for line in proc.stdout:
            if line.startswith("  record:"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=600)
    finally:
        release.set()
        holder.join()
    assert proc.returncode == 130, err[-2000:]
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("prunelab: interrupted:")
    assert "Traceback" not in err
    records = list((root / "s").glob("*/result.json"))
    assert len(records) == 1 and all(json.loads(p.read_text())["metrics"] for p in records)


def test_an_output_root_that_is_a_file_is_one_line_before_any_work(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    proc = run_cli(f"output_root={occupied}", "wandb.mode=disabled")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"prunelab: error: output_root={occupied} is a file, not a folder"]
    assert occupied.read_text() == "not a folder"


def test_the_hub_probe_is_one_connect_to_the_endpoint(monkeypatch):
    """runners.hub.hub_reachable: a listening endpoint is reachable, a closed one is not (at once, no retries), and an
    offline flag wins without any probe."""
    import socket

    from runners.hub import hub_reachable

    probe = hub_reachable.__wrapped__  # (the runner caches it once per process)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PRUNELAB_HUB_PROBE", "HTTPS_PROXY",
                "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert probe(timeout=3.0)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not probe(timeout=3.0)
        monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not probe(timeout=3.0)  # closed: refused
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # behind a proxy a direct connect says nothing: not probed
    assert probe(timeout=3.0)


def test_a_cached_hub_model_runs_offline_from_the_cache(tmp_path):
    """Offline, a hub model id whose files are in the Hugging Face cache passes the hub check and runs (the cache
    laid out as huggingface_hub writes it, holding the bundled tiny OPT under facebook/opt-125m)."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--facebook--opt-125m"
    shutil.copytree(ROOT / "models" / "tiny" / "tiny-opt", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "runners.run", "model=opt-125m", "model.seqlen=256", "pruner=magnitude",
                           f"output_root={tmp_path / 'out'}", "dense_baseline=false", *FAST], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = (tmp_path / "out").rglob("result.json")
    assert json.loads(record.read_text())["model"]["name"] == "opt-125m"


def test_a_full_disk_at_the_record_is_one_line_and_the_metrics_are_printed(tmp_path, monkeypatch, capsys):
    """(A full disk or a folder made read-only mid-run cannot be produced as root: the write itself is made to fail.)"""
    import errno

    import runners.run as run
    from runners.validate import ConfigError

    from .conftest import compose

    def full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "write_atomic", full)
    cfg = compose("pruner=magnitude", f"output_root={tmp_path}", "dense_baseline=false", "eval.ppl.max_windows=2",
                  "wandb.mode=disabled", "progress=false")
    with pytest.raises(ConfigError, match=r"^output_root=.*could not be written \(No space left on device\); its "
                                          r"metrics are printed above$"):
        run.execute(cfg)
    printed = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert printed["metrics"]["ppl"]["bundled@256"]["value"] > 1 and printed["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not list(tmp_path.rglob("result.json"))
