"""Benchmarks are presets (conf/experiment/bench-*.yaml) run by runners.run + runners.report: the options they need
beyond ordinary runs, on the bundled tiny models. The zero-shot ``cli`` backend (lm-eval's own command line on the
saved model) against the in-memory path; the report's runs table (columns, ratios to a baseline run, the swept
keys, whether a peak memory is the run's own); speed at several batch sizes. Every expected value is read from the
records the runs wrote (no number typed in), so each check can fail."""

import json
import math

import pandas as pd
import pytest

from runners.report import main as report_main
from runners.report import markdown_runs, runs_caption, runs_table, select_records

from .test_report import cli, load

QUICK = ["progress=false", "wandb.mode=disabled"]


def test_zeroshot_cli_backend_matches_the_in_memory_path_through_the_bench_preset(tmp_path):
    """``+experiment=bench-zeroshot``: two dense runs, memory and cli, each in its own worker process; same accuracies;
    the runs table shows both rows and the cli run's ratios to the in-memory one."""
    proc = cli("runners.run", "+experiment=bench-zeroshot", f"output_root={tmp_path}", "eval.zeroshot.limit=12", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "bench-zeroshot"
    records = {r["metrics"]["zeroshot"]["backend"]: r for r in load(folder)}
    assert set(records) == {"memory", "cli"}
    memory, cli_run = records["memory"]["metrics"]["zeroshot"], records["cli"]["metrics"]["zeroshot"]
    assert records["memory"]["device"]["pid"] != records["cli"]["device"]["pid"]  # a fresh process per run
    assert records["memory"]["run_id"] != records["cli"]["run_id"]  # the backend is part of the run's identity
    assert set(memory["tasks"]) == set(cli_run["tasks"]) == {"austen_next", "austen_cloze"}
    for task, mine in memory["tasks"].items():
        theirs = cli_run["tasks"][task]
        assert theirs["samples"] == mine["samples"] == 12
        for metric in ("acc", "acc_norm", "acc_stderr"):
            assert theirs[metric] == pytest.approx(mine[metric], abs=1e-12), (task, metric)
    assert cli_run["batch_size"]["used"] == memory["batch_size"]["used"] == 8
    command = cli_run["cli"]["command"]
    assert command[1:3] == ["-m", "lm_eval"] and "--limit" in command and command[command.index("--tasks") + 1] == \
        "austen_next,austen_cloze"
    assert cli_run["cli"]["wall_s"] > 0 and cli_run["seconds"] >= cli_run["cli"]["wall_s"]

    assert report_main([str(folder), "--wandb", "disabled"]) == 0
    table = pd.read_csv(folder / "report" / "runs.csv")
    assert list(table["eval.zeroshot.backend"]) == ["memory", "cli"]  # the baseline's row first
    by = table.set_index("eval.zeroshot.backend")
    assert by.loc["cli", "zeroshot_s / memory"] == pytest.approx(cli_run["seconds"] / memory["seconds"])
    assert by.loc["cli", "acc austen_cloze / memory"] == pytest.approx(1.0)
    assert by.loc["memory", "total_s"] == records["memory"]["timings_s"]["total"]
    text = (folder / "report" / "runs.md").read_text()
    assert "eval.zeroshot.backend=memory run's" in text and "| tiny-llama | dense | dense | cli |" in text


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """magnitude and wanda on tiny-llama, wanda at two calibration sizes, in one process (the basic launcher)."""
    out = tmp_path_factory.mktemp("runs")
    proc = cli("runners.run", "-m", "model=tiny-llama", "pruner=magnitude,wanda", "calib.nsamples=4,8",
               "eval.ppl.max_windows=2", "sweep=runs", f"output_root={out}", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, _, _ = select_records(load(out / "runs"))
    return out / "runs", records


def test_runs_table_divides_by_the_baseline_run_with_the_same_pattern_and_swept_keys(swept):
    folder, records = swept
    by = {(r["pruner"], r["config"]["calib"]["nsamples"] if r.get("calibration") else None): r for r in records}
    assert set(by) == {("dense", None), ("magnitude", None), ("wanda", 4), ("wanda", 8)}  # magnitude: no calibration
    table, meta = runs_table(records, ["ppl", "prune_s", "peak_host_mb"], "magnitude")
    assert meta["varying"] == ["calib.nsamples"]  # what the sweep swept besides the method
    assert list(zip(table.method, table["calib.nsamples"], strict=True)) == [
        ("dense", "-"), ("magnitude", "-"), ("wanda", "4"), ("wanda", "8")]
    magnitude = by[("magnitude", None)]
    for n in (4, 8):  # the magnitude run, which has no calib key, is the baseline of both wanda runs
        row = table[(table.method == "wanda") & (table["calib.nsamples"] == str(n))].iloc[0]
        wanda = by[("wanda", n)]
        assert row["prune_s"] == wanda["timings_s"]["prune"]
        assert row["prune_s / magnitude"] == pytest.approx(wanda["timings_s"]["prune"] / magnitude["timings_s"]["prune"])
        assert row["ppl bundled@256 / magnitude"] == pytest.approx(
            wanda["metrics"]["ppl"]["bundled@256"]["value"] / magnitude["metrics"]["ppl"]["bundled@256"]["value"])
        assert row["peak_host_mb"] == wanda["memory"]["peak_host_rss_mb"]
    dense = table[table.method == "dense"].iloc[0]
    assert math.isnan(dense["prune_s / magnitude"])  # no magnitude run at the dense pattern
    assert table[table.method == "magnitude"].iloc[0]["prune_s / magnitude"] == pytest.approx(1.0)
    text = markdown_runs(table, meta, runs_caption(records, meta))
    assert "| magnitude | 50% | - |" in text and "(1.00x)" in text
    assert "shared a process with another run" in text  # one process ran every job: the peaks are not their own


def test_runs_table_from_the_command_line_and_its_bad_input(swept, capsys):
    folder, records = swept
    assert report_main([str(folder), "--wandb", "disabled", "--columns", "prune_s,timings_s.load,method_loss",
                        "--baseline", "wanda"]) == 0
    table = pd.read_csv(folder / "report" / "runs.csv")
    assert {"prune_s", "timings_s.load", "method_loss", "prune_s / wanda"} <= set(table.columns)
    loads = {r["timings_s"]["load"] for r in records}
    assert set(table["timings_s.load"]) == loads
    assert "**Runs.**" in capsys.readouterr().out
    assert report_main([str(folder), "--wandb", "disabled", "--baseline", "magnitude"]) == 0  # default columns
    assert "prune_s / magnitude" in pd.read_csv(folder / "report" / "runs.csv").columns
    for args, message in [(["--columns", "prune_s,prune_time"], "--columns prune_time: not a column"),
                          (["--baseline", "sparsegpt"], "--baseline sparsegpt: no run of that method"),
                          (["--baseline", "calib.nsamples=16"], "no run has calib.nsamples=16 (values: 4, 8)"),
                          (["--columns", "ppl", "--baseline", "="], "--baseline =: give <config key>=<value>")]:
        assert report_main([str(folder), "--wandb", "disabled", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("prunelab: error: ") and message in err and "\n" not in err, err


def test_speed_at_several_batch_sizes_is_recorded_and_reported(tmp_path):
    speed = ["speed.batch_size=[1,3]", "speed.repeats=2", "speed.new_tokens=3", "speed.prompt_len=8", "speed.threads=1"]
    proc = cli("runners.run", "model=tiny-llama", "pruner=flap", "sparsity=structured", "sparsity.ratio=0.3",
               "calib.nsamples=4", "eval.ppl.max_windows=2", "sweep=speed", f"output_root={tmp_path}", *QUICK, *speed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [r for r in load(tmp_path / "speed") if r["pruner"] == "flap"]
    sp = record["metrics"]["speed"]
    for side in ("dense", "pruned"):
        assert set(sp[side]["by_batch_size"]) == {"1", "3"}
        assert {b: m["setup"]["batch_size"] for b, m in sp[side]["by_batch_size"].items()} == {"1": 1, "3": 3}
        assert sp[side]["decode_ms_per_token"] == sp[side]["by_batch_size"]["1"]["decode_ms_per_token"]
    assert "batch 1, prompt 8" in proc.stdout  # the summary line: the first batch size
    assert report_main([str(tmp_path / "speed"), "--wandb", "disabled"]) == 0
    table = pd.read_csv(tmp_path / "speed" / "report" / "speed.csv")
    assert list(table.batch) == [1, 3]
    for _, row in table.iterrows():
        d, p = (sp[side]["by_batch_size"][str(row.batch)] for side in ("dense", "pruned"))
        assert row["decode speedup"] == pytest.approx(d["decode_ms_per_token"] / p["decode_ms_per_token"], abs=1e-3)
        assert row["prefill ms"] == p["prefill_ms"]
    assert json.loads(json.dumps(sp)) == sp


def test_an_unknown_backend_stops_before_any_model_loads(tmp_path):
    proc = cli("runners.run", "eval.zeroshot.backend=disk", f"output_root={tmp_path}", *QUICK)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "prunelab: error: eval.zeroshot.backend=disk is not one of: memory, cli"
    assert not any(tmp_path.rglob("result.json"))


def test_a_decode_time_lost_in_timing_noise_is_no_number():
    """The decode time is a difference of two generations' medians; where a busy host times the longer one no
    slower, the record says no decode time (and no decode speedup), not 0.00 ms/token."""
    from evaluators.speed import decode_seconds_per_token, speedup
    from runners.summary import _speed_line

    assert decode_seconds_per_token(1.0, 2.55, 32) == pytest.approx(0.05)
    assert decode_seconds_per_token(1.0, 0.9, 32) is None
    setup = {"batch_size": 1, "prompt_len": 8, "new_tokens": 4, "device": "cpu", "threads": 2, "dtype": "float32"}
    dense = {"prefill_ms": 10.0, "decode_ms_per_token": None, "parameters": 4, "setup": setup}
    pruned = {"prefill_ms": 5.0, "decode_ms_per_token": 2.0, "parameters": 2, "setup": setup}
    x = speedup(dense, pruned)
    assert x == {"prefill": 2.0, "decode": None, "parameters": 2.0}
    line = _speed_line({"dense": dense, "pruned": pruned, "speedup": x})
    assert "decode not timed" in line and "prefill 10.0 -> 5.0 ms (2.00x)" in line
    # the report's speed table says so too, alone or beside a run whose decode was timed (pandas: None -> NaN)
    from runners.report import markdown_speed, speed_table

    def record(d, p):
        return {"model": {"name": "tiny-llama"}, "pruner": "numerical", "pattern": {"kind": "structured", "ratio": 0.3},
                "metrics": {"speed": {"dense": d, "pruned": p, "speedup": speedup(d, p)}}}

    timed = {**dense, "decode_ms_per_token": 4.0}
    for records in ([record(dense, pruned)], [record(dense, pruned), record(timed, pruned)]):
        md = markdown_speed(speed_table(records))
        assert md.count("not timed") == 2 and "nan" not in md, md
    assert "| 2.00 (dense 4.00) | 2.00x | 5.0 (dense 10.0) | 2.00x |" in md, md
