"""The issue's done-means: a 3 pruners x 3 patterns x 2 models preset sweep from one command, re-run with
nothing recomputed, then ``runners.report`` -> tables, plots, W&B files (the tiny presets: test_presets.py)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from runners import tracking
from runners.report import load_published, main, pattern_order

from .conftest import ROOT

FAST = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled"]


def cli(module, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def preset_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    args = ["+experiment=tiny-wanda-llama", f"output_root={out}", "eval.zeroshot.limit=24", *FAST]
    proc = cli("runners.run", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny-wanda-llama", args


def load(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*/result.json"))]


def test_preset_sweep_runs_every_job_and_a_rerun_recomputes_nothing(preset_sweep):
    folder, args = preset_sweep
    records = load(folder)
    pruned = {(r["model"]["name"], r["pruner"], r["pattern"]["label"]) for r in records if r["pruner"] != "dense"}
    assert len(pruned) == 18
    assert sorted(r["model"]["name"] for r in records if r["pruner"] == "dense") == ["tiny-llama", "tiny-opt"]
    for r in records:
        zs = r["metrics"]["zeroshot"]
        assert set(zs["tasks"]) == {"austen_next", "austen_cloze"} and zs["limit"] == 24
    before = {p: p.read_bytes() for p in folder.glob("*/result.json")}
    proc = cli("runners.run", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped: already recorded") == 18
    assert {p: p.read_bytes() for p in folder.glob("*/result.json")} == before


@pytest.fixture(scope="module")
def report(preset_sweep):
    folder, _ = preset_sweep
    proc = cli("runners.report", str(folder), "--wandb", "offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, folder / "report", proc.stdout


def test_report_writes_tables_plots_and_csv(report):
    _, out, stdout = report
    for name in ("ppl", "ppl_by_sparsity", "zeroshot"):
        for ext in ("md", "csv", "tex"):
            assert (out / f"{name}.{ext}").stat().st_size > 100, f"{name}.{ext}"
    import matplotlib.image

    for plot in ("ppl_vs_sparsity.png", "zeroshot_vs_sparsity.png"):
        image = matplotlib.image.imread(out / plot)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # not blank
    assert "bundled@256" in (out / "ppl.md").read_text()  # the caption names the protocol
    assert "\\begin{table}" in (out / "ppl.tex").read_text()
    assert "Perplexity" in stdout


def test_ppl_table_matches_the_records_with_dense_first_and_deltas(report):
    folder, out, _ = report
    records = load(folder)
    table = pd.read_csv(out / "ppl.csv", dtype={"pattern": str})
    assert tuple(table.iloc[0][["method", "pattern"]]) == ("dense", "dense")
    assert pattern_order(table.pattern) == ["dense", "50%", "4:8", "2:4"]
    value = {(r["model"]["name"], r["pruner"], r["pattern"]["label"]): r["metrics"]["ppl"]["bundled@256"]["value"]
             for r in records}
    row = table[(table.method == "wanda") & (table.pattern == "2:4")].iloc[0]
    for model in ("tiny-llama", "tiny-opt"):
        ours = value[(model, "wanda", "2:4")]
        assert row[f"{model} | bundled@256 | ours"] == pytest.approx(ours)
        assert row[f"{model} | bundled@256 | delta"] == pytest.approx(ours - value[(model, "dense", "dense")])


def test_paper_column_comes_from_the_presets_published_numbers(report):
    _, out, _ = report
    table = pd.read_csv(out / "ppl.csv", dtype={"pattern": str})
    paper = load_published("wanda-llama").set_index(["model", "method", "pattern", "dataset"])["value"]
    # the tiny preset maps tiny-llama -> llama-7b and bundled@256 -> wikitext2@2048 (a shape check)
    for method, pattern in (("dense", "dense"), ("wanda", "50%"), ("wanda", "2:4"), ("magnitude", "4:8")):
        row = table[(table.method == method) & (table.pattern == pattern)].iloc[0]
        assert row["tiny-llama | bundled@256 | paper"] == paper[("llama-7b", method, pattern, "wikitext2@2048")]
        assert row["tiny-llama | bundled@256 | ours"] > 0
    assert "tiny-opt | bundled@256 | paper" not in table.columns  # no paper model for tiny-opt
    assert "paper" in (out / "ppl.md").read_text() and "llama-7b" in (out / "ppl.md").read_text()


def test_zeroshot_table_has_tasks_average_and_delta(report):
    folder, out, _ = report
    table = pd.read_csv(out / "zeroshot.csv", dtype={"pattern": str})
    assert {"austen_next", "austen_cloze", "average", "delta avg"} <= set(table.columns)
    for _, row in table.iterrows():
        assert row["average"] == pytest.approx((row["austen_next"] + row["austen_cloze"]) / 2)
    dense = table[(table.model == "tiny-opt") & (table.method == "dense")].iloc[0]
    some = table[(table.model == "tiny-opt") & (table.method == "magnitude") & (table.pattern == "2:4")].iloc[0]
    assert some["delta avg"] == pytest.approx(some["average"] - dense["average"])


def test_report_logs_tables_and_plots_to_wandb_offline(report):
    folder, _, _ = report
    runs = [r for r in tracking.offline_runs(folder) if tracking.read_offline_run(r)["job_type"] == "report"]
    assert len(runs) == 1
    logged = tracking.read_offline_run(runs[0])
    assert logged["group"] == "tiny-wanda-llama"
    names = set(logged["tables"])
    assert any(n.startswith("ppl_") and not n.startswith("ppl_by") for n in names)
    assert any(n.startswith("zeroshot_") for n in names)
    assert len(logged["images"]) == 2
    (ppl,) = [t for n, t in logged["tables"].items() if n.startswith("ppl_") and not n.startswith("ppl_by")]
    table = pd.read_csv(report[1] / "ppl.csv")
    assert len(ppl["data"]) == len(table) and ppl["columns"] == list(table.columns)


def test_report_bad_input_exits_2(tmp_path):
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2  # no records
    assert main([str(tmp_path), "--published", "no-such-preset"]) == 2


# ---------------------------------------------------------------------------------------------
# code versions, duplicates and seeds (hand-written records in the format runners.run writes)


def _record(folder, name, *, pruner="sparsegpt", seed=0, fingerprint="aaaaaaaaaaaa", created="2026-01-01T00:00:00+00:00",
            ppl=100.0):
    from omegaconf import OmegaConf

    from .conftest import compose

    config = OmegaConf.to_container(compose(f"pruner={pruner}", f"seed={seed}", "wandb.mode=disabled"), resolve=True)
    dense = pruner == "dense"
    pattern = ({"kind": "dense", "ratio": 0.0, "n": None, "m": None, "label": "dense"} if dense
               else {"kind": "unstructured", "ratio": 0.5, "n": None, "m": None, "label": "50% unstructured"})
    rec = {"schema": 1, "run_id": f"tiny-opt_{pruner}_{name}", "sweep": folder.name, "created": created,
           "model": {"name": "tiny-opt"}, "pruner": pruner, "pattern": pattern,
           "sparsity": {"target": 0.0 if dense else 0.5, "overall": 0.0 if dense else 0.5},
           "method_losses": {}, "metrics": {"ppl": {"bundled@256": {"value": ppl, "protocol": {
               "name": "bundled", "windows": 4, "seqlen": 256}}}},
           "timings_s": {"prune": 0.0, "total": 1.0}, "memory": {}, "calibration": None if dense else {"nsamples": 8},
           "seed": seed, "device": {}, "versions": {},
           "code": {"source_digest": "d" * 12, "fingerprint": fingerprint}, "config": config}
    path = folder / rec["run_id"] / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    return path


def test_report_shows_the_fresh_record_and_lists_the_stale_one(tmp_path):
    from runners.report import build_report

    folder = tmp_path / "sweep"
    _record(folder, "dense", pruner="dense", ppl=50.0)
    old = _record(folder, "old", fingerprint="0ld0ld0ld0ld", created="2026-01-01T00:00:00+00:00", ppl=200.0)
    new = _record(folder, "new", fingerprint="7e57e57e57e5", created="2026-02-01T00:00:00+00:00", ppl=100.0)
    written = build_report(folder, wandb_mode="disabled")
    table = written["tables"]["ppl"].set_index("method")
    assert table.loc["sparsegpt", "tiny-opt | bundled@256 | ours"] == pytest.approx(100.0)  # not the mean 150
    assert [r["path"] for r in written["stale"]] == [str(old)]
    stale_md = (written["out"] / "stale.md").read_text()
    assert str(old) in stale_md and str(new) in stale_md
    assert "stale" in (written["out"] / "ppl.md").read_text()
    assert written["records"] == 2
    included = build_report(folder, tmp_path / "with-stale", wandb_mode="disabled", include_stale=True)
    assert included["tables"]["ppl"].set_index("method").loc["sparsegpt", "tiny-opt | bundled@256 | ours"] \
        == pytest.approx(150.0)
    assert main([str(folder), "--wandb", "disabled", "--include-stale"]) == 0


def test_report_keeps_one_record_per_seed_and_gives_mean_spread_and_n(tmp_path):
    from runners.report import build_report

    folder = tmp_path / "sweep"
    _record(folder, "dense", pruner="dense", ppl=50.0)
    _record(folder, "s0", seed=0, ppl=100.0)
    _record(folder, "s1", seed=1, ppl=102.0)
    _record(folder, "s2", seed=2, ppl=104.0, created="2026-01-02T00:00:00+00:00")
    dup = _record(folder, "s2copy", seed=2, ppl=999.0, created="2026-01-01T12:00:00+00:00")  # same cell, seed, code
    written = build_report(folder, wandb_mode="disabled")
    row = written["tables"]["ppl"].set_index("method").loc["sparsegpt"]
    assert row["tiny-opt | bundled@256 | ours"] == pytest.approx(102.0)
    assert row["tiny-opt | bundled@256 | sd"] == pytest.approx(2.0) and row["tiny-opt | bundled@256 | n"] == 3
    assert [r["path"] for r in written["duplicates"]] == [str(dup)] and not written["stale"]
    md = (written["out"] / "ppl.md").read_text()
    assert "102.00 ± 2.00 (n=3)" in md and "duplicate" in md
    assert "102.00 ± 2.00 (n=3)" in (written["out"] / "ppl_by_sparsity.md").read_text()
    assert str(dup) in (written["out"] / "stale.md").read_text()


def test_records_differing_only_in_eval_windows_are_never_averaged(tmp_path):
    """Real runs: dense and magnitude on tiny-opt at two eval.ppl.max_windows. The report shows four rows named by
    the key that differs, each pruned row's delta taken against the dense row with the same windows."""
    from runners.report import build_report
    from runners.run import execute

    from .conftest import compose

    records = {}
    for windows in (4, 8):
        for pruner in ("dense", "magnitude"):
            rec = execute(compose("model=tiny-opt", f"pruner={pruner}", f"eval.ppl.max_windows={windows}",
                                  f"output_root={tmp_path}", "sweep=s", "progress=false", "wandb.mode=disabled",
                                  "dense_baseline=false", "cache_pruned=never"))
            records[(pruner, windows)] = rec["metrics"]["ppl"]["bundled@256"]["value"]
    assert records[("dense", 4)] != records[("dense", 8)]
    table = build_report(tmp_path / "s", wandb_mode="disabled")["tables"]["ppl"].set_index("method")
    assert sorted(table.index) == ["dense (eval.ppl.max_windows=4)", "dense (eval.ppl.max_windows=8)",
                                   "magnitude (eval.ppl.max_windows=4)", "magnitude (eval.ppl.max_windows=8)"]
    column = "tiny-opt | bundled@256 | ours"
    for (pruner, windows), value in records.items():
        assert table.loc[f"{pruner} (eval.ppl.max_windows={windows})", column] == pytest.approx(value)
    for windows in (4, 8):
        assert table.loc[f"magnitude (eval.ppl.max_windows={windows})", "tiny-opt | bundled@256 | delta"] == \
            pytest.approx(records[("magnitude", windows)] - records[("dense", windows)])


@pytest.mark.parametrize("sparsity", [{"kind": "unstructured", "ratio": 0.5}, {"kind": "unstructured", "ratio": 0.695},
                                      {"kind": "nm", "n": 2, "m": 4}, {"kind": "nm", "n": 1, "m": 8},
                                      {"kind": "structured", "ratio": 0.25}])
def test_every_pattern_label_round_trips(sparsity):
    """One label format (records, run ids, reports, published numbers) and one parser."""
    from pruners.masks import Pattern, parse_pattern_label, pattern_slug
    from runners.report import pattern_key

    pattern = Pattern.from_config(type("S", (), sparsity)())
    recorded = {"kind": pattern.kind, "ratio": pattern.ratio, "n": pattern.n, "m": pattern.m,
                "label": pattern.describe()}  # as runners/run.py records it
    assert pattern_key(recorded) == recorded["label"]
    parsed = parse_pattern_label(recorded["label"])
    assert parsed["kind"] == pattern.kind and parsed["n"] == pattern.n and parsed["m"] == pattern.m
    assert parsed["ratio"] == pytest.approx(pattern.ratio)
    assert pattern_key(parsed) == recorded["label"] and "%" not in pattern_slug(recorded["label"])
    assert pattern_key({"kind": "dense"}) == "dense" == parse_pattern_label("dense")["kind"]


def test_records_without_an_identity_are_stale_once_the_same_config_has_one(tmp_path):
    """A record written before ids covered the identity is older code: left out (stale.md) beside a new record of
    the same config, not shown as another row."""
    from runners.report import build_report

    folder = tmp_path / "sweep"
    _record(folder, "dense", pruner="dense", ppl=50.0)
    old = _record(folder, "old", ppl=200.0)
    new = _record(folder, "new", ppl=100.0, fingerprint="7e57e57e57e5", created="2026-02-01T00:00:00+00:00")
    rec = json.loads(new.read_text())
    rec["identity"] = {"resolved": {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"},
                       "checkpoint": {"sha256": "c" * 16}, "data": {}, "versions": {"torch": "2.13.0"}}
    new.write_text(json.dumps(rec))
    written = build_report(folder, wandb_mode="disabled")
    table = written["tables"]["ppl"].set_index("method")
    assert list(table.index) == ["dense", "sparsegpt"]
    assert table.loc["sparsegpt", "tiny-opt | bundled@256 | ours"] == pytest.approx(100.0)
    assert [r["path"] for r in written["stale"]] == [str(old)]


def test_the_runs_table_splits_runs_that_differ_only_in_their_identity(tmp_path):
    from runners.report import build_report

    folder = tmp_path / "sweep"
    for name, dtype, ppl in (("a", "float32", 100.0), ("b", "bfloat16", 104.0)):
        path = _record(folder, name, ppl=ppl)
        rec = json.loads(path.read_text())
        rec["identity"] = {"resolved": {"device": "cpu", "dtype": dtype, "attn_implementation": "sdpa"},
                           "checkpoint": {"sha256": "c" * 16}, "data": {}, "versions": {}}
        path.write_text(json.dumps(rec))
    written = build_report(folder, wandb_mode="disabled", columns_=["ppl"])
    runs = written["tables"]["runs"]
    assert len(runs) == 2 and "identity.resolved.dtype" in runs.columns
    assert sorted(written["tables"]["ppl"]["method"]) == ["sparsegpt (identity.resolved.dtype=bfloat16)",
                                                          "sparsegpt (identity.resolved.dtype=float32)"]


def test_a_method_baseline_with_several_settings_is_matched_on_the_keys_both_have(tmp_path):
    """Two runs of the baseline method (surgeon_reference with shots 5, and with obd=true shots 1): a 5-shot run of
    another method takes the 5-shot one, a 1-shot run the 1-shot one (not the first found)."""
    from runners.report import runs_table

    folder = tmp_path / "sweep"
    records = []
    for name, pruner, keys, ppl in [("ours", "surgeon", {"shots": 5}, 100.0), ("kobd", "kobd", {"shots": 1}, 120.0),
                                    ("ref5", "surgeon_reference", {"shots": 5, "obd": False}, 110.0),
                                    ("ref1", "surgeon_reference", {"shots": 1, "obd": True}, 130.0)]:
        rec = json.loads(_record(folder, name, pruner=pruner, ppl=ppl).read_text())
        rec["config"]["pruner"].update(keys)
        records.append(rec)
    table, _ = runs_table(records, ["ppl"], baseline="surgeon_reference")
    ratio = [c for c in table.columns if c.endswith("/ surgeon_reference")][0]
    by_method = {(m, s): r for m, s, r in zip(table.method, table["pruner.shots"], table[ratio], strict=True)}
    assert by_method[("surgeon", "5")] == pytest.approx(100 / 110) and by_method[("kobd", "1")] == pytest.approx(120 / 130)


def test_zeroshot_table_puts_the_paper_s_accuracies_under_the_matching_row(report):
    """Published acc cells (in % as printed) for a row's model, method and pattern follow it as a '[paper]' row;
    rows without published cells get none."""
    from runners.report import tidy, zeroshot_table

    folder, _, _ = report
    frame = tidy(load(folder))
    published = pd.DataFrame([
        {"model": "tiny-opt", "method": "magnitude", "pattern": "2:4", "dataset": "austen_next", "metric": "acc",
         "value": 41.5, "tag": "PAPER", "source": "test"},
        {"model": "tiny-opt", "method": "magnitude", "pattern": "2:4", "dataset": "average", "metric": "acc",
         "value": 40.0, "tag": "PAPER", "source": "test"},
        {"model": "tiny-opt", "method": "magnitude", "pattern": "2:4", "dataset": "bundled@256", "metric": "ppl",
         "value": 150.0, "tag": "PAPER", "source": "test"}])
    table = zeroshot_table(frame, published)
    assert len(table) == len(zeroshot_table(frame)) + 1
    ours = table.index[(table.model == "tiny-opt") & (table.method == "magnitude") & (table.pattern == "2:4")][0]
    paper = table.loc[ours + 1]
    assert paper.method == "magnitude [paper]" and paper.pattern == "2:4"
    assert paper.austen_next == 41.5 and paper.average == 40.0 and pd.isna(paper.austen_cloze)


def test_label_keys_name_a_variant_in_the_label_whatever_else_shares_the_folder():
    """report.label_keys: a run's value of a listed pruner key enters its method label when it is not the pruner's
    default (so 'goa (pruner.remedy=true)' matches the published row), and never when it is."""
    from runners.report import method_label, shown_keys

    keys = ["pruner.calibration", "pruner.remedy", "pruner.allocation", "pruner.bias_compensation"]

    def rec(pruner, **values):
        return {"pruner": pruner, "pattern": {"kind": "structured"}, "config": {"pruner": {"name": pruner, **values}}}

    default = rec("goa", calibration="data", remedy=False)
    remedy = rec("goa", calibration="data", remedy=True)
    flap = rec("flap", allocation="uniform", bias_compensation=False)
    for r in (default, remedy, flap):
        r["shown"] = shown_keys(r, keys)
    assert method_label(default) == "goa"
    assert method_label(remedy) == "goa (pruner.remedy=true)"
    assert method_label(flap) == "flap (pruner.allocation=uniform, pruner.bias_compensation=false)"
    assert shown_keys(remedy, []) == "" and shown_keys(rec("wanda_sp", allocation="uniform"), keys) == ""
