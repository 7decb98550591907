"""Structured pruning: physical removal in the adapters, save / reload, Numerical Pruning and FLAP math,
allocation, and the methods on the bundled tiny models."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import corpora
import models
from pruners import Pattern, build_pruner
from pruners.flap import bias_compensation, standardize
from pruners.numerical import (
    compensate_column_removal,
    numerical_kernel,
    numerical_score_closed_form,
    numerical_score_newton,
)
from pruners.settings import EngineSettings
from pruners.structured import global_keep, uniform_keep

from .conftest import compose, hessian_of, load_tiny

IDS = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def drop_every_third(adapter, block, group):
    keep = torch.tensor([u for u in range(group.count) if u % 3 != 1])
    adapter.remove_units(block, group.kind, keep)
    return keep


# ---------------------------------------------------------------------------------------------
# the adapters: removal, reload


def test_removing_no_units_leaves_logits_identical(tiny):
    before = logits(tiny.model)
    count = sum(p.numel() for p in tiny.model.parameters())
    for block in tiny.adapter.blocks():
        for group in tiny.adapter.unit_groups(block):
            tiny.adapter.remove_units(block, group.kind, torch.arange(group.count))
    assert torch.equal(logits(tiny.model), before)
    assert sum(p.numel() for p in tiny.model.parameters()) == count


def test_structured_pruner_at_ratio_zero_changes_nothing():
    loaded = load_tiny("tiny-llama")
    before = logits(loaded.model)
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 4, 64, seed=0).ids
    build_pruner({"name": "numerical"}).prune(loaded.model, loaded.adapter, Pattern("structured", 0.0), calib,
                                              EngineSettings(progress=False))
    assert torch.equal(logits(loaded.model), before)


def test_removal_equals_zeroing_the_units_slices(tiny):
    """Cutting a unit out gives the same outputs as zeroing every slice it owns in the full model."""
    zeroed = copy.deepcopy(tiny.model)
    zeroed_adapter = type(tiny.adapter)(zeroed)
    for block, zblock in zip(tiny.adapter.blocks(), zeroed_adapter.blocks(), strict=True):
        for group in tiny.adapter.structure_groups(block):
            keep = drop_every_third(tiny.adapter, block, group)
            removed = torch.tensor([u for u in range(group.count) if u not in set(keep.tolist())])
            with torch.no_grad():
                for path, (axis, index) in zeroed_adapter.unit_group(zblock, group.kind).owned.items():
                    zblock.get_parameter(path).index_fill_(axis, index[removed].reshape(-1), 0.0)
    assert sum(p.numel() for p in tiny.model.parameters()) < sum(p.numel() for p in zeroed.parameters())
    assert torch.allclose(logits(tiny.model), logits(zeroed), atol=1e-4)
    # and the KV cache / recurrent state path of generation agrees too
    prompt = IDS[:, :8]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    assert torch.equal(tiny.model.generate(prompt, **kwargs), zeroed.generate(prompt, **kwargs))


def test_gqa_query_heads_are_removed_equally_per_group(tmp_path):
    loaded = load_tiny("tiny-llama")
    adapter, block = loaded.adapter, loaded.adapter.blocks()[0]
    with pytest.raises(ValueError, match="query heads kept per KV group must be equal"):
        adapter.remove_units(block, "query_head", [0, 1, 2])  # group 0 keeps 2, group 1 keeps 1
    adapter.remove_units(block, "query_head", [1, 2])  # one query head of each group
    assert block.self_attn.num_key_value_groups == 1 and block.self_attn.q_proj.out_features == 2 * 32
    assert adapter.block_counts(block) == {"kv_group": 2, "query_head": 2, "mlp_neuron": 352}
    with pytest.raises(ValueError, match="must be equal"):  # one per group left: a group cannot lose its last
        adapter.remove_units(block, "query_head", [0])
    models.save_pruned(loaded.model, loaded.tokenizer, tmp_path, adapter)
    again = models.load(compose("model=local", f"model.path={tmp_path}", "model.seqlen=256").model, "cpu")
    assert torch.equal(logits(again.model), logits(loaded.model))
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2])
    group = adapter.unit_group(adapter.blocks()[1], "query_head")
    repaired = adapter.repair_keep(adapter.blocks()[1], group, torch.tensor([False, True, False, False]), scores)
    assert repaired.tolist() == [False, True, True, False]  # 1 kept -> 1 per group, each group's best
    repaired = adapter.repair_keep(adapter.blocks()[1], group, torch.tensor([False, True, True, True]), scores)
    assert repaired.all()  # 3 kept -> 1.5 per group, rounded up


def test_removing_every_unit_of_a_kind_is_refused():
    loaded = load_tiny("tiny-opt")
    with pytest.raises(ValueError, match="keep at least one"):
        loaded.adapter.remove_units(loaded.adapter.blocks()[0], "attention_head", [])


def test_save_and_reload_a_heterogeneous_pruned_model(tiny, tmp_path):
    """Blocks of different sizes plus an added bias: the structure file makes models.load rebuild them."""
    adapter = tiny.adapter
    for index, block in enumerate(adapter.blocks()):
        if index % 2:
            for group in adapter.structure_groups(block):
                drop_every_third(adapter, block, group)
    reader = adapter.blocks()[1].get_submodule(adapter.structure_groups(adapter.blocks()[1])[-1].reader)
    had_bias = reader.bias is not None  # OPT's fc2 has one; LLaMA's down_proj and Mamba's out_proj get one
    models.add_bias(reader).data.normal_(generator=torch.Generator().manual_seed(0))
    structure = models.save_pruned(tiny.model, tiny.tokenizer, tmp_path, adapter)
    assert not structure["plain_from_pretrained"] and bool(structure["added_biases"]) != had_bias
    again = models.load(compose("model=local", f"model.path={tmp_path}", "model.seqlen=256").model, "cpu")
    assert torch.equal(logits(again.model), logits(tiny.model))
    assert again.source["pruned_structure"]["blocks"] == [adapter.block_counts(b) for b in adapter.blocks()]
    assert sum(p.numel() for p in again.model.parameters()) == sum(p.numel() for p in tiny.model.parameters())


def test_uniformly_pruned_llama_reloads_with_plain_from_pretrained(tmp_path):
    loaded = load_tiny("tiny-llama")
    adapter = loaded.adapter
    for block in adapter.blocks():
        adapter.remove_units(block, "kv_group", [1])
        adapter.remove_units(block, "mlp_neuron", torch.arange(0, 352, 2))
    structure = models.save_pruned(loaded.model, loaded.tokenizer, tmp_path, adapter)
    assert structure["plain_from_pretrained"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (plain.config.num_key_value_heads, plain.config.intermediate_size) == (1, 176)
    assert torch.equal(logits(plain), logits(loaded.model))


# ---------------------------------------------------------------------------------------------
# the math, one function at a time


def test_compensation_is_the_least_squares_refit_and_beats_plain_removal(captured_layer):
    W, X = captured_layer  # tiny-llama gate_proj [352, 128] and the 2048 inputs it saw
    prune_cols = torch.arange(0, 128, 3)
    keep = torch.tensor([j for j in range(128) if j % 3])
    stat = hessian_of(X, torch.float64)
    updated, loss = compensate_column_removal(W, stat.matrix, prune_cols, percdamp=1e-10)
    target = X @ W.T
    refit = torch.linalg.lstsq(X[:, keep], target).solution.T  # independent: least squares on the kept inputs
    err = lambda B: ((target - X[:, keep] @ B.T) ** 2).sum().item()  # noqa: E731
    assert err(updated[:, keep]) == pytest.approx(err(refit), rel=1e-6)
    assert err(updated[:, keep]) < 0.5 * err(W[:, keep])  # plain removal is much worse
    assert loss == pytest.approx(err(updated[:, keep]) / X.shape[0], rel=1e-4)  # 1/2 tr(...) with H = 2/N X^T X
    damped, _ = compensate_column_removal(W, stat.matrix, prune_cols, percdamp=0.01)
    assert err(refit) <= err(damped[:, keep]) < err(W[:, keep])


def test_numerical_closed_form_is_one_newton_step_and_clipping_changes_it(captured_layer):
    W, X = captured_layer
    K = numerical_kernel(W, X.T @ X, damp=0.01)
    r = 0.7 * K.shape[0]
    closed = numerical_score_closed_form(K, r, lam=1.0)
    assert torch.allclose(numerical_score_newton(K, r, lam=1.0, iterations=1), closed, atol=1e-8)
    assert torch.allclose(numerical_score_newton(K, r, lam=1.0, iterations=50), closed, atol=1e-8)  # a fixed point
    clipped = numerical_score_newton(K, r, lam=1.0, iterations=50, clip=True)
    assert clipped.min() >= 0 and clipped.max() <= 1 and not torch.allclose(clipped, closed, atol=1e-3)
    # the constraint weight only rescales 1 - z inside a module: the ranking does not move
    assert torch.equal(torch.argsort(closed), torch.argsort(numerical_score_closed_form(K, r, lam=100.0)))


def test_numerical_score_of_a_diagonal_kernel_ranks_by_weight_times_input_energy():
    """K diagonal -> z_j = 1 - kappa / K_jj: the channel with the least ||W_:,j||^2 ||X_j||^2 goes first (§4.2)."""
    energy = torch.tensor([4.0, 1.0, 9.0, 0.5], dtype=torch.float64)
    z = numerical_score_closed_form(torch.diag(energy), r=2.0, lam=1.0)
    assert torch.equal(torch.argsort(z), torch.argsort(energy))


def test_global_keep_removes_the_weight_closest_to_the_ratio_and_respects_protection():
    scores = {"a": torch.tensor([0.1, 0.5, 0.9]), "b": torch.tensor([0.2, 0.3, 0.4, 0.6])}
    weights = {"a": 10, "b": 1}  # a's units are ten times bigger: total 34
    keep = global_keep(scores, weights, ratio=0.35)  # target 11.9: remove a0 (10) + b0 (1) + b1 (1) = 12
    assert keep["a"].tolist() == [False, True, True] and keep["b"].tolist() == [False, False, True, True]
    protected = {"a": torch.tensor([True, False, False]), "b": torch.zeros(4, dtype=torch.bool)}
    keep = global_keep(scores, weights, ratio=0.35, protected=protected)  # a0 is never removed
    assert keep["a"][0] and (~keep["a"]).sum() + (~keep["b"]).sum() >= 1
    uniform = uniform_keep(scores, 0.5)
    assert uniform["a"].tolist() == [False, False, True] and uniform["b"].tolist() == [False, False, True, True]


def test_flap_bias_compensation_keeps_the_mean_output():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(6, 10, generator=gen)
    X = torch.randn(500, 10, generator=gen) + torch.linspace(-2, 2, 10)
    removed = torch.tensor([1, 4, 7])
    kept = torch.tensor([j for j in range(10) if j not in (1, 4, 7)])
    shift = bias_compensation(W, X.mean(0), removed)
    assert torch.allclose((X[:, kept] @ W[:, kept].T + shift).mean(0), (X @ W.T).mean(0), atol=1e-5)
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert z.mean().abs() < 1e-6 and z.std() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# the methods on the tiny models


def _prune(name, pruner, ratio, **keys):
    loaded = load_tiny(name)
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 16, 256, seed=0).ids
    results = build_pruner({"name": pruner, **keys}).prune(loaded.model, loaded.adapter, Pattern("structured", ratio),
                                                           calib, EngineSettings(batch_size=16, progress=False))
    return loaded, results


@pytest.mark.parametrize("pruner", ["numerical", "flap"])
def test_parameter_count_matches_the_ratio(tiny, pruner):
    adapter = tiny.adapter
    unit_params = adapter.unit_parameters
    biggest_unit = max(g.params_per_unit(b) for b in adapter.blocks() for g in adapter.structure_groups(b))
    before = unit_params()
    calib = corpora.calibration_windows(tiny.tokenizer, "bundled", 8, 128, seed=0).ids
    results = build_pruner({"name": pruner}).prune(tiny.model, adapter, Pattern("structured", 0.3), calib,
                                                   EngineSettings(progress=False))
    removed = before - unit_params()
    assert abs(removed - 0.3 * before) <= biggest_unit  # closest cut: within one unit of the target
    assert all(r.unit_kind and r.kept_units for r in results.values())
    assert all(n >= 1 for b in adapter.blocks() for n in adapter.block_counts(b).values())  # min_units
    assert torch.isfinite(logits(tiny.model)).all()


def test_compensation_lowers_the_pruned_models_perplexity():
    from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows

    from .conftest import QUALITY_WINDOWS

    values = {}
    for compensate in (True, False):
        loaded, _ = _prune("tiny-llama", "numerical", 0.3, compensate=compensate)
        ids, _ = protocol_windows(loaded.tokenizer, PROTOCOLS["bundled-val"], 256, max_windows=QUALITY_WINDOWS)
        values[compensate] = perplexity(loaded.model, loaded.adapter, ids, batch_size=8, progress=False)
    assert values[True] < values[False]


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("pruner", ["goa", "flap", "wanda_sp", "llm_pruner", "unit_baseline", "numerical"])
def test_heads_pattern_removes_attention_units_only(family, pruner):
    """sparsity=heads (the GOA paper's Table 3): the ratio of the attention units goes, every MLP neuron stays."""
    loaded = load_tiny(family)
    adapter = loaded.adapter
    before = [adapter.block_counts(b) for b in adapter.blocks()]
    attention_before = adapter.unit_parameters("attention")
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 4, 64, seed=0).ids
    keys = {"allocation": "uniform"} if pruner in ("flap", "numerical") else {}  # (per block, to count)
    build_pruner({"name": pruner, **keys}).prune(loaded.model, adapter, Pattern("heads", 0.5), calib,
                                                 EngineSettings(progress=False))
    after = [adapter.block_counts(b) for b in adapter.blocks()]
    for was, now in zip(before, after, strict=True):
        assert now["mlp_neuron"] == was["mlp_neuron"]
        attention = "kv_group" if "kv_group" in was else "attention_head"
        assert now[attention] == was[attention] // 2
    assert adapter.unit_parameters("attention") == attention_before // 2
    assert torch.isfinite(logits(loaded.model)).all()


def test_goa_head_count_tau_removes_the_similar_heads_whatever_the_ratio():
    """pruner.head_count=tau: as many heads as Algorithm 2 finds (Table 3's GOA rows): a larger tau, more heads."""
    removed = {}
    for tau in (1e-9, 10.0):
        loaded = load_tiny("tiny-opt")
        calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 4, 64, seed=0).ids
        build_pruner({"name": "goa", "head_count": "tau", "tau": tau}).prune(
            loaded.model, loaded.adapter, Pattern("heads", 0.25), calib, EngineSettings(progress=False))
        removed[tau] = [4 - loaded.adapter.block_counts(b)["attention_head"] for b in loaded.adapter.blocks()]
    assert removed[1e-9] == [0, 0, 0, 0]  # no two heads that close
    assert removed[10.0] == [3, 3, 3, 3]  # every pair close: all but min_units
    with pytest.raises(ValueError, match="head_count=tau"):
        build_pruner({"name": "goa", "head_count": "tau", "similarity": False}).check(Pattern("heads", 0.25))


def test_heads_pattern_on_a_family_without_heads_is_a_config_error(tmp_path):
    from runners.validate import ConfigError, validate

    with pytest.raises(ConfigError, match="sparsity=heads: model family 'mamba' has no attention heads"):
        validate(compose("model=tiny-mamba", "pruner=flap", "sparsity=heads"))


def test_flap_uniform_removes_int_ratio_times_count_as_the_reference():
    """FLAP UL-UM (allocation=uniform) and Wanda-sp remove int(ratio · count) units per module, as FLAP's code
    (1 of 8 heads and 137 of 688 channels at 0.2); pruner.rounding=nearest is the closest-count rule."""
    from pruners.structured import units_to_remove

    assert (units_to_remove(0.2, 8, "floor"), units_to_remove(0.2, 688, "floor")) == (1, 137)
    assert (units_to_remove(0.2, 8, "nearest"), units_to_remove(0.2, 688, "nearest")) == (2, 138)
    kept = {}
    for rounding in ("floor", "nearest"):
        loaded = load_tiny("tiny-opt")  # 4 heads: int(0.2 * 4) = 0, round(0.8) = 1
        calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 4, 64, seed=0).ids
        build_pruner({"name": "flap", "allocation": "uniform", "rounding": rounding}).prune(
            loaded.model, loaded.adapter, Pattern("structured", 0.2), calib, EngineSettings(progress=False))
        kept[rounding] = loaded.adapter.block_counts(loaded.adapter.blocks()[0])
    ffn = load_tiny("tiny-opt").adapter.block_counts(load_tiny("tiny-opt").adapter.blocks()[0])["mlp_neuron"]
    assert kept["floor"] == {"attention_head": 4, "mlp_neuron": ffn - int(0.2 * ffn)}
    assert kept["nearest"] == {"attention_head": 3, "mlp_neuron": ffn - round(0.2 * ffn)}
    with pytest.raises(ValueError, match="pruner.rounding='up' is not one of: floor, nearest"):
        build_pruner({"name": "flap", "rounding": "up"}).check(Pattern("structured", 0.2))
