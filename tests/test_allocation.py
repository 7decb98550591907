"""Per-layer sparsity allocation (pruners/allocation.py; docs/methods.md §3.4): OWL's math, its equality with
the reference code on a bundled model, targets / ignore, global, and the runner's record of the ratios."""

from __future__ import annotations

import json

import pytest
import torch

import corpora
from pruners.allocation import Allocation, allocate, global_ratios, outlier_ratio, owl_sparsities
from pruners.engine import prune_sequential
from pruners.magnitude import Magnitude
from pruners.masks import Pattern, global_prune_masks
from pruners.settings import EngineSettings
from pruners.wanda import Wanda

from .conftest import load_tiny
from .test_cli import FAST, run_cli

QUIET = EngineSettings(progress=False)


# --- the math --------------------------------------------------------------------------------------------------
def test_outlier_ratio_counts_entries_above_m_times_the_mean_in_percent():
    metric = torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0])  # mean 20.8
    assert outlier_ratio(metric, 2) == pytest.approx(20.0)  # 100 > 41.6 only
    assert outlier_ratio(metric, 5) == 0.0  # 104 > 100
    assert outlier_ratio(metric.view(1, 5), 0.01) == pytest.approx(100.0)


def test_owl_sparsities_rescale_to_two_lambda_around_the_target():
    # D = 1, 2, 3 -> r = 0, .1, .2 (2 lambda = .2) -> density = r - .1 + .5 -> sparsity .6, .5, .4
    assert owl_sparsities([1, 2, 3], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    # more outliers -> pruned less; the mean stays the target
    s = owl_sparsities([0.9, 0.1, 0.5, 0.3], 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7) and s.index(min(s)) == 0 and s.index(max(s)) == 1
    assert max(s) - min(s) == pytest.approx(0.16)


def test_owl_sparsities_floor_clamp_and_degenerate_inputs():
    # target 0.05, lambda 0.1: the most outlier-heavy block would get sparsity < 0 -> the reference's 0.01
    s = owl_sparsities([0, 0, 10], 0.05, 0.1)
    assert s[2] == 0.01 and s[0] == pytest.approx(0.05 + 0.2 / 3)
    assert owl_sparsities([2, 2, 2], 0.6, 0.08) == [0.6, 0.6, 0.6]  # the reference divides by zero here
    assert owl_sparsities([], 0.5, 0.08) == []


def test_global_ratios_share_one_threshold():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([[5.0, 6.0, 7.0, 8.0]])}
    assert global_ratios(scores, 0.5) == {"a": 1.0, "b": 0.0}
    assert global_ratios(scores, 0.75) == {"a": 1.0, "b": 0.5}


def test_allocation_config_keys_and_globs():
    a = Allocation.from_config({"allocation": "owl", "owl_lambda": 0.1, "owl_m": 7, "targets": ["self_attn.*"],
                                "ignore": "self_attn.o_proj"})
    assert (a.kind, a.owl_lambda, a.owl_m, a.targets, a.ignore) == ("owl", 0.1, 7.0, ("self_attn.*",), ("self_attn.o_proj",))
    assert a.selects("self_attn.q_proj") and not a.selects("self_attn.o_proj") and not a.selects("mlp.up_proj")
    assert Allocation.from_config({}).is_default and not a.is_default
    for bad, message in [({"allocation": "owll"}, "not one of"), ({"owl_lambda": 0}, "owl_lambda"),
                         ({"owl_m": -1}, "owl_m"), ({"targets": []}, "targets is empty")]:
        with pytest.raises(ValueError, match=message):
            Allocation.from_config(bad)
    with pytest.raises(ValueError, match="needs an unstructured pattern"):
        Allocation(kind="owl").check(Pattern("nm", 0.5, 2, 4))


# --- on a bundled model ----------------------------------------------------------------------------------------
def _calib(loaded, nsamples=128, seqlen=256):
    return corpora.calibration_windows(loaded.tokenizer, "bundled", nsamples, seqlen, 0).ids


# luuyin/OWL lib/prune_all.py:prune_wanda_outlier (Lamda 0.08, Hyper_m 5, sparsity 0.7) run on bundled
# tiny-llama, 128 bundled calibration windows of 256 tokens, seed 0, one window per forward (its loop), with
# its data loader pointed at these windows: the block sparsities it printed ("after adjustment", 1 - density).
REFERENCE_TINY_LLAMA_70 = [0.696978417266187, 0.6267625899280576, 0.6894964028776978, 0.7867625899280575]


@pytest.mark.parametrize("batch_size", [1, 8])
def test_owl_ratios_equal_the_reference_code_on_tiny_llama(batch_size):
    loaded = load_tiny("tiny-llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    ratios = allocate(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.7), Allocation(kind="owl"),
                      _calib(loaded), EngineSettings(batch_size=batch_size, progress=False))
    assert ratios.block_ratios == pytest.approx(REFERENCE_TINY_LLAMA_70, abs=1e-9)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items()), "the dense pass changes nothing"
    names = list(loaded.adapter.prunable_linears(loaded.adapter.blocks()[1]))
    assert {ratios.ratios[f"model.layers.1.{n}"] for n in names} == {REFERENCE_TINY_LLAMA_70[1]}


def test_owl_prunes_each_block_at_its_ratio_and_keeps_the_mean():
    loaded = load_tiny("tiny-llama")
    ids = _calib(loaded, 32, 128)
    ratios = allocate(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.7), Allocation(kind="owl"), ids,
                      QUIET)
    results = prune_sequential(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.7), ids, QUIET, ratios)
    assert len(set(ratios.block_ratios)) == len(ratios.block_ratios), "non-uniform"
    assert sum(ratios.block_ratios) / len(ratios.block_ratios) == pytest.approx(0.7)
    for index, block in enumerate(loaded.adapter.blocks()):
        for name, linear in loaded.adapter.prunable_linears(block).items():
            d_in = linear.weight.shape[1]
            per_row = (linear.weight == 0).sum(1)
            assert (per_row == int(d_in * ratios.block_ratios[index])).all(), f"block {index} {name}"
            assert results[f"model.layers.{index}.{name}"].pruned == int((linear.weight == 0).sum())


def test_a_list_schedule_prunes_each_block_at_its_own_ratio():
    """sparsity.allocation=list: the schedule a paper prints, block by block (Wanda's per-row count is exact)."""
    loaded = load_tiny("tiny-llama")
    schedule = (0.55, 0.65, 0.75, 0.85)
    ids = _calib(loaded, 8, 128)
    ratios = allocate(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.7),
                      Allocation(kind="list", block_ratios=schedule), ids, QUIET)
    assert ratios.block_ratios == list(schedule) and ratios.to_record(Allocation(kind="list"))["kind"] == "list"
    prune_sequential(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.7), ids, QUIET, ratios)
    for index, block in enumerate(loaded.adapter.blocks()):
        for name, linear in loaded.adapter.prunable_linears(block).items():
            per_row = (linear.weight == 0).sum(1)
            assert (per_row == int(linear.weight.shape[1] * schedule[index])).all(), f"block {index} {name}"
    with pytest.raises(ValueError, match="parameter-weighted mean"):
        allocate(loaded.model, loaded.adapter, Wanda(), Pattern("unstructured", 0.5),
                 Allocation(kind="list", block_ratios=schedule), ids, QUIET)


def test_targets_and_ignore_leave_the_other_linears_dense():
    loaded = load_tiny("tiny-llama")
    allocation = Allocation(targets=("self_attn.*", "mlp.*"), ignore=("mlp.down_proj", "self_attn.o_proj"))
    ratios = allocate(loaded.model, loaded.adapter, Magnitude(), Pattern("unstructured", 0.5), allocation, None, QUIET)
    prune_sequential(loaded.model, loaded.adapter, Magnitude(), Pattern("unstructured", 0.5), None, QUIET, ratios)
    for block in loaded.adapter.blocks():
        for name, linear in loaded.adapter.prunable_linears(block).items():
            zeros = float((linear.weight == 0).float().mean())
            if name in ("mlp.down_proj", "self_attn.o_proj"):
                assert zeros == 0.0, name
            else:
                assert zeros == pytest.approx(0.5, abs=1e-3), name
    with pytest.raises(ValueError, match="select no prunable linear"):
        allocate(loaded.model, loaded.adapter, Magnitude(), Pattern("unstructured", 0.5),
                 Allocation(targets=("attn.*",)), None, QUIET)


def test_global_magnitude_is_one_threshold_over_the_whole_model():
    loaded = load_tiny("tiny-opt")
    linears = {f"{loaded.adapter.blocks_prefix()}.{i}.{n}": m for i, b in enumerate(loaded.adapter.blocks())
               for n, m in loaded.adapter.prunable_linears(b).items()}
    expected = global_prune_masks({k: m.weight.detach().abs().float() for k, m in linears.items()}, 0.6)
    pattern = Pattern("unstructured", 0.6)
    ratios = allocate(loaded.model, loaded.adapter, Magnitude(), pattern, Allocation(kind="global"), None, QUIET)
    assert len({round(r, 6) for r in ratios.ratios.values()}) > 1, "layers get different ratios"
    prune_sequential(loaded.model, loaded.adapter, Magnitude(), pattern, None, QUIET, ratios)
    for name, module in linears.items():
        assert torch.equal(module.weight == 0, expected[name]), name


# --- through the runner ----------------------------------------------------------------------------------------
def test_runner_records_the_per_layer_ratios_and_labels_the_method(tmp_path):
    from runners.report import build_report

    proc = run_cli("pruner=wanda", "sparsity.ratio=0.7", "sparsity.allocation=owl", "model=tiny-llama",
                   f"output_root={tmp_path}", "sweep=owl", "dense_baseline=false", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wanda (OWL λ=0.08 M=5) | 70% |" in proc.stdout
    (path,) = (tmp_path / "owl").glob("*/result.json")
    record = json.loads(path.read_text())
    allocation = record["sparsity"]["allocation"]
    assert allocation["kind"] == "owl" and (allocation["owl_lambda"], allocation["owl_m"]) == (0.08, 5.0)
    assert len(allocation["block_ratios"]) == len(allocation["outlier_ratios"]) == 4
    assert sum(allocation["block_ratios"]) / 4 == pytest.approx(0.7)
    assert record["calibration"]["nsamples"] == 8 and "allocation" in record["timings_s"]
    for name, measured in record["sparsity"]["per_module"].items():
        block = int(name.split(".")[2])
        assert measured == pytest.approx(allocation["block_ratios"][block], abs=0.02), name
    build_report(tmp_path / "owl")
    assert "wanda (OWL λ=0.08 M=5)" in (tmp_path / "owl" / "report" / "ppl.md").read_text()


def test_run_ids_ignore_allocation_keys_the_run_never_reads():
    from runners.record import run_id

    from .conftest import compose

    def rid(*overrides):
        from omegaconf import OmegaConf

        return run_id(OmegaConf.to_container(compose("pruner=wanda", *overrides), resolve=True))

    uniform = rid()
    assert rid("sparsity.owl_lambda=0.2") == uniform and rid("sparsity.owl_m=7") == uniform
    owl = rid("sparsity.allocation=owl")
    assert owl != uniform and rid("sparsity.allocation=owl", "sparsity.owl_lambda=0.2") != owl
    assert rid("sparsity.ignore=[mlp.down_proj]") != uniform
