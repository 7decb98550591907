"""The sequential engine on every bundled family and pattern: exact sparsity, N:M validity, nothing else touched."""

import pytest
import torch

import corpora
from evaluators.ppl import perplexity
from pruners import Pattern, build_pruner, prune_sequential
from pruners.masks import satisfies_n_of_m, sparsity
from pruners.settings import EngineSettings

QUIET = EngineSettings(progress=False)

PATTERNS = {"50%": Pattern("unstructured", 0.5), "70%": Pattern("unstructured", 0.7),
            "2:4": Pattern("nm", 0.5, 2, 4), "4:8": Pattern("nm", 0.5, 4, 8)}


def calib(loaded, n=8, seqlen=64):
    return corpora.calibration_windows(loaded.tokenizer, "bundled", n, seqlen, seed=0).ids


def expected_zeros(pruner: str, pattern: Pattern, weight: torch.Tensor) -> int:
    d_out, d_in = weight.shape
    if pattern.kind == "nm":
        return d_out * d_in // pattern.m * (pattern.m - pattern.n)
    if pruner == "magnitude":
        return int(d_out * d_in * pattern.ratio)
    if pruner == "wanda":
        return d_out * int(d_in * pattern.ratio)
    # sparsegpt, apt: int(numel * s) inside each 128-column block
    return sum(int(d_out * (min(i + 128, d_in) - i) * pattern.ratio) for i in range(0, d_in, 128))


@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("pruner_name", ["magnitude", "wanda", "sparsegpt", "apt"])
def test_measured_sparsity_is_exact_and_other_parameters_untouched(tiny, pruner_name, pattern_name):
    pattern = PATTERNS[pattern_name]
    model, adapter = tiny.model, tiny.adapter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable = set(adapter.prunable_parameter_names())
    results = prune_sequential(model, adapter, build_pruner({"name": pruner_name}), pattern, calib(tiny), QUIET)
    assert len(results) == len(prunable)
    params = dict(model.named_parameters())
    for name in prunable:
        weight = params[name].detach()
        assert int((weight == 0).sum()) == expected_zeros(pruner_name, pattern, weight), name
        if pattern.kind == "nm":
            assert satisfies_n_of_m(weight, pattern.n, pattern.m), name
    for name, value in model.state_dict().items():
        if name not in prunable:
            assert torch.equal(value, before[name]), f"{name} changed"


def test_dense_pruner_changes_nothing():
    from .conftest import load_tiny

    loaded = load_tiny("tiny-opt")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    prune_sequential(loaded.model, loaded.adapter, build_pruner({"name": "dense"}), Pattern("unstructured", 0.5),
                     None, QUIET)
    assert all(torch.equal(v, before[k]) for k, v in loaded.model.state_dict().items())


def test_sequential_perplexity_equals_whole_model_perplexity(tiny):
    ids = corpora.calibration_windows(tiny.tokenizer, "bundled", 6, 48, seed=1).ids
    full = perplexity(tiny.model, tiny.adapter, ids, batch_size=4, mode="full", progress=False)
    seq = perplexity(tiny.model, tiny.adapter, ids, batch_size=4, mode="sequential", progress=False)
    assert seq == pytest.approx(full, rel=1e-5)


def test_engine_propagates_pruned_outputs(tiny):
    """SparseGPT's block 1 statistics must see block 0's pruned outputs (docs/methods.md §1.2 step 4)."""
    from models.blocks import capture_block_inputs, run_block

    ids = calib(tiny)
    adapter = tiny.adapter
    dense_in = capture_block_inputs(tiny.model, adapter, ids, "cpu", 8)
    dense_out = run_block(adapter, adapter.blocks()[0], dense_in)
    pruner = build_pruner({"name": "wanda"})
    prune_sequential(tiny.model, adapter, pruner, Pattern("unstructured", 0.7), ids, QUIET)
    pruned_out = run_block(adapter, adapter.blocks()[0], dense_in)
    assert not torch.allclose(dense_out[0], pruned_out[0])


def test_same_seed_same_result():
    from .conftest import load_tiny

    weights = []
    for _ in range(2):
        loaded = load_tiny("tiny-llama")
        prune_sequential(loaded.model, loaded.adapter, build_pruner({"name": "sparsegpt"}), PATTERNS["2:4"],
                         calib(loaded), QUIET)
        weights.append(loaded.model.model.layers[1].mlp.down_proj.weight.clone())
    assert torch.equal(weights[0], weights[1])
    assert sparsity(weights[0]) == 0.5
