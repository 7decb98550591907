"""Greedy Output Approximation (pruners/goa.py): the criteria against direct computations, Algorithm 2 on hand-made
matrices, the refit against least squares, and the method on small models (docs/methods.md §7)."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from models.blocks import capture_block_inputs
from pruners import build_pruner
from pruners.goa import (
    channel_scores,
    head_scores,
    js_divergence_sum,
    ridge_refit,
    select_heads,
    similar_heads,
)
from pruners.masks import Pattern
from pruners.settings import EngineSettings

from .test_seam import random_ids, random_model

QUIET = EngineSettings(progress=False, batch_size=2)


def test_js_divergence_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 4, generator=g), dim=-1)
    probs[0, 1, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # (zeros: 0 log 0 = 0)
    D = js_divergence_sum(probs)
    for i in range(3):
        for j in range(3):
            total = 0.0
            for b in range(2):
                for q in range(4):
                    p, r = probs[b, i, q].double(), probs[b, j, q].double()
                    m = (p + r) / 2
                    kl = lambda a, c: sum(float(x * torch.log(x / y)) for x, y in zip(a, c, strict=True) if x > 0)  # noqa: E731
                    total += 0.5 * kl(p, m) + 0.5 * kl(r, m)
            assert D[i, j] == pytest.approx(total, abs=1e-12)
    assert torch.allclose(D, D.T) and not D.diagonal().any()
    assert (D / 8).max() <= torch.log(torch.tensor(2.0))  # (JS is at most ln 2 per row)


def test_algorithm_2_takes_one_of_every_close_pair_in_row_order():
    D = torch.tensor([[0.0, 0.1, 0.5, 0.3], [0.1, 0.0, 0.05, 0.4], [0.5, 0.05, 0.0, 0.12], [0.3, 0.4, 0.12, 0.0]])
    # row 0: (0,1) close -> 0; row 1: (1,0) has 0 chosen, (1,2) close -> 1; row 2: (2,1) has 1; (2,3) close -> 2;
    # row 3: (3,2) has 2 chosen
    assert similar_heads(D, 0.16) == [0, 1, 2]
    assert similar_heads(D, 0.08) == [1]
    assert similar_heads(D, 0.01) == []
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert select_heads(D, scores, 3, 0.16).tolist() == [0, 1, 2]
    assert select_heads(D, scores, 2, 0.08).tolist() == [1, 3]  # candidate 1, then the lowest score of the rest
    # too many candidates: keep those closest to a head that stays (0: 0.1 to 1 ... all three vs head 3)
    assert select_heads(D, scores, 1, 0.16).tolist() == [2]  # min distance to head 3: 0 -> 0.3, 1 -> 0.4, 2 -> 0.12
    assert select_heads(None, scores, 2, 0.16).tolist() == [1, 3]
    assert select_heads(D, scores, 0, 0.16).tolist() == []


def test_channel_scores_are_the_second_moments_they_estimate():
    """M_j = ||B_:,j||^2 a_j^T Σ a_j = Σ_i E[(B_ij a_j^T x)^2] over the samples Σ is taken from (Eq. 2-3); a gated
    FFN multiplies its branches; a head sums its channels' ||W_O[:, j]||^2 E[z_j^2]."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    A, U = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    B = torch.randn(4, 5, generator=g, dtype=torch.float64)
    sigma = X.T @ X / X.shape[0]
    empirical = lambda W: ((X @ W.T)[:, None, :] * B[None]).pow(2).sum(1).mean(0)  # noqa: E731
    torch.testing.assert_close(channel_scores([A], B, sigma), empirical(A))
    torch.testing.assert_close(channel_scores([A, U], B, sigma), empirical(A) * empirical(U))
    z2 = torch.rand(6, generator=g, dtype=torch.float64)
    W_O = torch.randn(3, 6, generator=g, dtype=torch.float64)
    columns = torch.arange(6).view(2, 3)
    expected = (W_O.pow(2).sum(0) * z2).view(2, 3).sum(1)
    torch.testing.assert_close(head_scores(W_O, z2, columns), expected)


def test_ridge_refit_is_least_squares():
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ridge_refit(X.T @ X, X.T @ Y, 1e-12), torch.linalg.lstsq(X, Y).solution)
    lam = 0.5 * torch.diagonal(X.T @ X).mean()
    ridge = torch.linalg.solve(X.T @ X + lam * torch.eye(5, dtype=X.dtype), X.T @ Y)
    torch.testing.assert_close(ridge_refit(X.T @ X, X.T @ Y, 0.5), ridge)
    W0 = torch.randn(5, 3, generator=g, dtype=torch.float64)  # refit_prior=weights: ridge toward W0
    toward = torch.linalg.solve(X.T @ X + lam * torch.eye(5, dtype=X.dtype), X.T @ Y + lam * W0)
    torch.testing.assert_close(ridge_refit(X.T @ X, X.T @ Y, 0.5, W0), toward)
    # targets the current weights already meet: the plain ridge shrinks them, the ridge toward them keeps them
    torch.testing.assert_close(ridge_refit(X.T @ X, X.T @ (X @ W0), 0.5, W0), W0)
    assert not torch.allclose(ridge_refit(X.T @ X, X.T @ (X @ W0), 0.5), W0, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_attention_probabilities_equal_the_eager_attention_weights(family):
    model = random_model(family)
    model.config._attn_implementation = "eager"
    ids = random_ids(n=2, seqlen=9)
    with torch.no_grad():
        expected = model(input_ids=ids, output_attentions=True).attentions[0]
    adapter = models.adapter_for(model)
    inputs = capture_block_inputs(model, adapter, ids, "cpu", 2)
    block, captured = adapter.blocks()[0], {}
    names = adapter.query_key(block)
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o))
             for n in names]
    with torch.no_grad():
        adapter.call_block(block, inputs.batches[0], inputs.kwargs(inputs.batches[0]))
    for hook in hooks:
        hook.remove()
    probs = adapter.attention_probabilities(block, captured[names[0]], captured[names[1]],
                                            inputs.kwargs(inputs.batches[0]))
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,unit", [("llama", "kv_group"), ("llama", "query_head"), ("opt", "kv_group"),
                                         ("gpt2", "kv_group")])
@pytest.mark.parametrize("reconstruct", [False, True])
def test_goa_removes_the_ratio_of_units_in_the_chosen_blocks_only(family, unit, reconstruct):
    model = random_model(family)
    adapter = models.adapter_for(model)
    before = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    untouched = copy.deepcopy(adapter.blocks()[0].state_dict())
    pruner = build_pruner({"name": "goa", "blocks": [1, 2], "attention_unit": unit, "reconstruct": reconstruct})
    results = pruner.prune(model, adapter, Pattern("structured", 0.5), random_ids(n=4, seqlen=10), QUIET)
    after = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    assert after[0] == before[0]
    assert all(torch.equal(v, adapter.blocks()[0].state_dict()[k]) for k, v in untouched.items())
    kinds = {r.unit_kind for r in results.values()}
    assert len(results) == 2 and "mlp_neuron" in kinds
    for kind in kinds:  # half of the units of each pruned module
        assert after[1][kind] == before[1][kind] - round(0.5 * before[1][kind])
    with torch.no_grad():
        logits = model(input_ids=random_ids(n=2, seqlen=10)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_final_refit_brings_the_pruned_readers_outputs_closer_to_the_dense_ones(family):
    """pruner.final_refit: after the removal, each reader's kept columns are refit by least squares to the dense
    reader's outputs on the same windows, so every pruned reader's output error there can only go down."""
    dense = random_model(family)
    ids = random_ids(n=8, seqlen=12)
    errors = {}
    for final in (False, True):
        model = copy.deepcopy(dense)
        adapter = models.adapter_for(model)
        build_pruner({"name": "goa", "blocks": [0, 1], "damp": 1e-8, "final_refit": final}).prune(
            model, adapter, Pattern("structured", 0.5), ids, QUIET)
        readers = [g.reader for g in adapter.unit_groups(adapter.blocks()[0])]
        outputs = {}
        for tag, m in (("pruned", model), ("dense", dense)):
            block = models.adapter_for(m).blocks()[0]
            hooks = [block.get_submodule(r).register_forward_hook(
                lambda mod, args, out, key=(tag, r), store=outputs: store.__setitem__(key, out.detach())) for r in readers]
            with torch.no_grad():  # each model on the pruned model's block input (block 0: the embeddings)
                m(input_ids=ids)
            for hook in hooks:
                hook.remove()
        errors[final] = [float((outputs[("pruned", r)] - outputs[("dense", r)]).pow(2).sum()) for r in readers]
    assert all(after <= before * (1 + 1e-6) for before, after in zip(errors[False], errors[True], strict=True))
    assert any(after < 0.99 * before for before, after in zip(errors[False], errors[True], strict=True))


def test_the_refit_of_an_unpruned_module_gives_its_outputs_back():
    """With nothing removed upstream the current inputs are the dense ones, so the least-squares refit (tiny ridge)
    reproduces the dense outputs of the same linears: the same logits (not always the same weights: a layer norm's
    outputs are linearly dependent once the bias's ones column is appended, and the ridge picks the smallest)."""
    model = random_model("opt")
    adapter = models.adapter_for(model)
    reference = copy.deepcopy(model)
    pruner = build_pruner({"name": "goa", "blocks": [0, 2], "damp": 1e-10})  # (both blocks: the streams carry on)
    pruner.keep = lambda adapter_, block, group, inputs, ratio, sigma=None: torch.ones(group.count, dtype=torch.bool)
    ids = random_ids(n=8, seqlen=12)
    pruner.prune(model, adapter, Pattern("structured", 0.5), ids, QUIET)
    changed = any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert changed  # (the refit ran)


def test_unit_baselines_rank_by_owned_weight_norms_and_random_follows_the_seed():
    from pruners.unit_baseline import unit_norms

    model = random_model("llama")
    adapter = models.adapter_for(model)
    block = adapter.blocks()[0]
    group = adapter.unit_group(block, "mlp_neuron")
    mlp = block.mlp
    expected = (mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1)
                + mlp.down_proj.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(unit_norms(block, group, 2).float(), expected.detach())
    l1 = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    torch.testing.assert_close(unit_norms(block, group, 1).float(), l1.detach())
    kept = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        m = random_model("llama")
        torch.manual_seed(seed)
        torch.rand(3)  # (the global generator used since: no effect)
        results = build_pruner({"name": "unit_baseline", "score": "random"}).prune(
            m, models.adapter_for(m), Pattern("structured", 0.5), None, QUIET)
        kept.setdefault(seed, []).append(sorted((k, tuple(r.kept_units)) for k, r in results.items()))
    assert kept[0][0] == kept[0][1] and kept[0][0] != kept[1][0]


def test_the_remedy_refits_on_the_recovery_windows_after_the_calibration_ones():
    """remedy: the last remedy_samples windows are the recovery set (the runner draws them after calib.nsamples);
    the criteria see only the first ones, so the units kept differ from a refit on the calibration windows."""
    ids = random_ids(n=10, seqlen=10)
    kept = {}
    for remedy in (False, True):
        model = random_model("opt")
        pruner = build_pruner({"name": "goa", "remedy": remedy, "remedy_samples": 6})
        assert pruner.extra_windows() == (6 if remedy else 0)
        results = pruner.prune(model, models.adapter_for(model), Pattern("structured", 0.5), ids, QUIET)
        kept[remedy] = {k: r.kept_units for k, r in results.items()}
    assert kept[False] != kept[True]
    with pytest.raises(ValueError, match="remedy_samples=6"):
        build_pruner({"name": "goa", "remedy": True, "remedy_samples": 6}).prune(
            random_model("opt"), models.adapter_for(random_model("opt")), Pattern("structured", 0.5), ids[:6], QUIET)
    with pytest.raises(ValueError, match="needs pruner.reconstruct=true"):
        build_pruner({"name": "goa", "remedy": True, "reconstruct": False}).check(Pattern("structured", 0.5))


def test_the_data_free_variant_reads_no_data_and_writes_its_own_windows():
    from pruners.goa import random_token_windows, self_generated_windows

    model = random_model("llama")
    before = torch.random.get_rng_state()
    windows = self_generated_windows(model, 3, 7, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # (the global generator untouched)
    assert windows.shape == (3, 7) and windows.max() < model.config.vocab_size
    assert torch.equal(windows, self_generated_windows(model, 3, 7, seed=5))
    assert not torch.equal(windows, self_generated_windows(model, 3, 7, seed=6))
    assert random_token_windows(64, 2, 5, 0).shape == (2, 5)
    pruner = build_pruner({"name": "goa", "calibration": "self-generated", "generated_samples": 4,
                           "generated_seqlen": 8})
    assert not pruner.needs_calibration and build_pruner({"name": "goa"}).needs_calibration
    results = pruner.prune(model, models.adapter_for(model), Pattern("structured", 0.5), None, QUIET)
    assert {r.unit_kind for r in results.values()} == {"kv_group", "mlp_neuron"}
    with pytest.raises(ValueError, match="not with pruner.calibration=self-generated"):
        build_pruner({"name": "goa", "calibration": "self-generated", "remedy": True}).check(Pattern("structured", 0.5))


@pytest.mark.parametrize("name", ["unit_baseline", "flap"])
def test_block_range_methods_prune_only_their_blocks(name):
    model = random_model("llama")
    adapter = models.adapter_for(model)
    before = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    untouched = copy.deepcopy(adapter.blocks()[0].state_dict())
    results = build_pruner({"name": name, "blocks": [1, 2], "allocation": "uniform"}).prune(
        model, adapter, Pattern("structured", 0.5), random_ids(n=4, seqlen=10), QUIET)
    after = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    assert after[0] == before[0] and after[1]["mlp_neuron"] == before[1]["mlp_neuron"] // 2
    assert all(torch.equal(v, adapter.blocks()[0].state_dict()[k]) for k, v in untouched.items())
    assert results and all(".1." in name for name in results)


@pytest.mark.parametrize("rounding, removed", [("floor", 0), ("nearest", 1)])
@pytest.mark.parametrize("name", ["goa", "unit_baseline", "llm_pruner", "wanda_sp"])
def test_rounding_decides_the_units_a_fractional_ratio_removes(name, rounding, removed):
    """2 KV groups at 37.5%: 0.75 of a group, int() removes none, round() one (pruner.rounding, every uniform method)."""
    model = random_model("llama")  # 2 KV groups per block
    adapter = models.adapter_for(model)
    before = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    pruner = build_pruner({"name": name, "rounding": rounding})
    pruner.prune(model, adapter, Pattern("structured", 0.375), random_ids(n=4, seqlen=10), QUIET)
    after = [{g.kind: g.count for g in adapter.unit_groups(b)} for b in adapter.blocks()]
    kind = next(k for k in before[0] if k != "mlp_neuron")
    assert [b[kind] - a[kind] for b, a in zip(before, after, strict=True)] == [removed] * len(before)


def test_query_heads_keep_goa_s_choice_where_the_family_evens_out_the_groups():
    """GQA with query heads as units: the adapter keeps an equal count per KV group; what GOA chose to keep must
    outrank what it chose to remove (not the head scores alone)."""
    from pruners.goa import GOA

    model = random_model("llama")  # 4 query heads in 2 KV groups
    adapter = models.adapter_for(model)
    block = adapter.blocks()[0]
    group = adapter.unit_group(block, "query_head")
    pruner = GOA(attention_unit="query_head", similarity=False)
    # scores that alone would keep heads 0 and 1 (one group); GOA's choice: drop 1 and 3 (one per group)
    keep = torch.tensor([True, False, True, False])
    rank = torch.tensor([3.0, 2.0, 1.0, 0.0]) / 4
    repaired = adapter.repair_keep(block, group, keep, keep.double() * 2 + rank)
    assert repaired.tolist() == [True, False, True, False]
    assert pruner.attention_unit == "query_head"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wanda_sp_removes_the_units_with_the_lowest_weight_times_activation_scores_on_the_pruned_model(family):
    """Wanda-sp (FLAP's prune_wanda_sp): block 1's units are scored on the outputs of block 0 as pruned, by
    Σ_{j in unit} mean_i |W_ij| · sqrt(E[x_j^2]) on the reader's input; the lowest round(ratio · count) go."""
    from pruners.wanda_sp import wanda_sp_scores

    ids = random_ids(n=4, seqlen=10)
    model = random_model(family)
    reference = copy.deepcopy(model)
    results = build_pruner({"name": "wanda_sp"}).prune(model, models.adapter_for(model), Pattern("structured", 0.5),
                                                       ids, QUIET)
    adapter = models.adapter_for(reference)
    prefix = adapter.blocks_prefix()
    # block 0 exactly as the pruner left it (its kept units), then block 1's reader inputs by hooks
    for group in adapter.structure_groups(adapter.blocks()[0]):
        adapter.remove_units(adapter.blocks()[0], group.kind, results[f"{prefix}.0.{group.reader}"].kept_units)
    block = adapter.blocks()[1]
    for group in adapter.structure_groups(block):
        reader = block.get_submodule(group.reader)
        seen = []
        handle = reader.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            reference(input_ids=ids)
        handle.remove()
        X = torch.cat(seen).double()
        channel = (reader.weight.detach().double().abs() * X.pow(2).mean(0).sqrt()).mean(0)
        expected = channel[group.reader_columns()].sum(1)
        torch.testing.assert_close(wanda_sp_scores(reader.weight.detach(), X.pow(2).mean(0), group.reader_columns()),
                                   expected)
        removed = set(torch.argsort(expected)[: round(0.5 * group.count)].tolist())
        result = results[f"{prefix}.1.{group.reader}"]
        assert set(range(group.count)) - set(result.kept_units) == removed, group.kind
        assert result.pruned == len(removed)


LAYOUT = {  # family: attention rows, attention reader, heads x rows per head, MLP rows, MLP reader
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", "mlp.down_proj",
              ("mlp.gate_proj", "mlp.up_proj")),
    "opt": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj", "fc2", ("fc1",)),
}


@pytest.mark.parametrize("family,taylor", [("llama", "param_first"), ("llama", "param_second"), ("llama", "param_mix"),
                                           ("llama", "vectorize"), ("opt", "param_mix"), ("opt", "vectorize")])
def test_llm_pruner_removes_the_units_of_lowest_taylor_importance_from_explicit_gradients(family, taylor):
    """LLM-Pruner (block-wise, no recovery): W·g, W·F·W, W·g - ½W·F·W per weight (g: gradient of the mean loss
    over the windows, F: mean of each window's squared gradient), Σ|s| (vectorize: |Σ s|) per channel, summed over
    a unit's q / k / v rows and o_proj columns (a KV group), gate / up rows and down column (a neuron)."""
    ids = random_ids(n=4, seqlen=10)
    model = random_model(family)  # llama: 4 query heads in 2 KV groups; opt: 4 heads; head_dim 8, 64 neurons
    reference = copy.deepcopy(model)
    prefix = models.adapter_for(reference).blocks_prefix()
    # passes of 3 windows (engine.grad_windows) for the opt cases: the gradients add up over passes before scoring
    settings = EngineSettings(progress=False, batch_size=2, grad_windows=3 if family == "opt" else 0)
    results = build_pruner({"name": "llm_pruner", "taylor": taylor}).prune(
        model, models.adapter_for(model), Pattern("structured", 0.5), ids, settings)

    def loss_of(batch):
        logits = reference(input_ids=batch).logits[:, :-1].double()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    params = dict(reference.named_parameters())
    grad = dict(zip(params, torch.autograd.grad(loss_of(ids), list(params.values()), allow_unused=True), strict=True))
    fisher = {k: 0 for k in params}
    for w in range(ids.shape[0]):
        per = torch.autograd.grad(loss_of(ids[w : w + 1]), list(params.values()), allow_unused=True)
        fisher = {k: fisher[k] + (0 if g is None else g.double() ** 2 / ids.shape[0]) for k, g in zip(params, per, strict=True)}
    for index in range(2):
        def channels(linear, axis, index=index):
            key = f"{prefix}.{index}.{linear}.weight"
            W, g, F = params[key].detach().double(), grad[key].double(), fisher[key]
            s = {"param_first": W * g, "vectorize": W * g, "param_second": W * F * W, "param_mix": W * g - 0.5 * W * F * W}[taylor]
            return s.sum(1 - axis).abs() if taylor == "vectorize" else s.abs().sum(1 - axis)

        qkv, attention_reader, mlp_reader, mlp_rows = LAYOUT[family]
        q, k, v = (channels(name, 0) for name in qkv)
        o = channels(attention_reader, 1)
        units = 2 if family == "llama" else 4  # KV groups own their query heads' rows
        groups = (q + o).view(units, -1).sum(1) + k.view(units, -1).sum(1) + v.view(units, -1).sum(1)
        neurons = sum(channels(name, 0) for name in mlp_rows) + channels(mlp_reader, 1)
        for reader, expected in ((attention_reader, groups), (mlp_reader, neurons)):
            result = results[f"{prefix}.{index}.{reader}"]
            removed = set(range(expected.numel())) - set(result.kept_units)
            assert removed == set(torch.argsort(expected)[: expected.numel() // 2].tolist()), (index, reader)
