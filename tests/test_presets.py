"""Every tiny preset runs offline from one command and reports against its paper's published numbers
(a file of its own so that the test workers split the preset sweeps and test_report's sweep)."""

import pandas as pd
import pytest

from runners.report import main as report_main

from .test_report import FAST, cli, load

# each preset runs with its own calibration, evaluation and report settings, but on one model (the one its
# paper column maps) and one pattern of its sweep: every job of every preset is composed and validated in
# test_configs, and test_report runs the whole 18-job tiny-wanda-llama sweep; all jobs here would add minutes
PINNED = {"tiny-unstructured-nm": ["model=tiny-llama", "sparsity=2of4"],
          "tiny-numprune-llama": ["model=tiny-llama", "sparsity.ratio=0.3"],
          "tiny-mamba-apt": ["sparsity=2of4"], "tiny-owl": ["model=tiny-llama"]}


@pytest.mark.parametrize("preset", ["tiny-unstructured-nm", "tiny-sparsegpt-opt", "tiny-numprune-llama",
                                    "tiny-mamba-apt", "tiny-owl"])
def test_every_tiny_preset_runs_offline_and_reports_against_its_paper(tmp_path, preset):
    proc = cli("runners.run", f"+experiment={preset}", f"output_root={tmp_path}", *FAST, *PINNED.get(preset, []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / preset
    records = load(folder)
    assert records and all(r["metrics"]["ppl"] for r in records)
    assert report_main([str(folder), "--wandb", "disabled"]) == 0  # in-process (test_report runs the CLI)
    table = pd.read_csv(folder / "report" / "ppl.csv", dtype={"pattern": str})
    published = records[0]["config"]["report"]["published"]
    if published:
        paper_cols = [c for c in table.columns if c.endswith("| paper")]
        assert paper_cols, "a preset with published numbers gets a paper column"
    if preset == "tiny-numprune-llama":  # structured rows: ours beside the paper's, a parameter count per run
        assert {"numerical", "flap"} <= set(table.method) and "30% struct" in set(table.pattern)
        assert all(r["structure"]["parameters_after"] < r["structure"]["parameters_before"]
                   for r in records if r["pruner"] != "dense")
    if preset == "tiny-owl":  # uniform and OWL rows of each method, told apart, each beside its paper number
        owl = table[table.method == "wanda (OWL λ=0.08 M=5)"]
        assert {"wanda", "sparsegpt", "sparsegpt (OWL λ=0.08 M=5)"} <= set(table.method) and len(owl) == 1
        assert owl.filter(like="| paper").iloc[0].tolist() == [24.55]
