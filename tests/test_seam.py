"""The method seam (docs/architecture.md §1): declared needs, EngineSettings, whole-model drivers with
gradient taps, persistent masks; and the existing pruners' results through it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import corpora
import models
from pruners import PRUNERS, Pattern, Pruner, build_pruner, prune_sequential, register
from pruners.base import apply_prune_mask
from pruners.masks import (
    MaskState,
    PackedMask,
    check_masks_against_weights,
    global_prune_masks,
    prune_per_matrix,
    select_prune_mask,
)
from pruners.settings import EngineSettings
from pruners.taps import accumulate_gradient_stats, prunable_modules
from pruners.wanda import Wanda

QUIET = EngineSettings(progress=False)


def random_model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(config)
    elif family == "mamba":
        from transformers import MambaConfig, MambaForCausalLM

        config = MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
                             time_step_rank=4)
        model = MambaForCausalLM(config)
    elif family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32)
        model = OPTForCausalLM(config)
    return model.eval()


def random_ids(n=5, seqlen=12, vocab=64):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


@dataclass
class GradientProbe(Pruner):
    """A toy whole-model method: Taylor score |W * dL/dW| from the gradient taps, kept for inspection."""

    name = "gradient-probe"
    needs_calibration = True
    needs_gradients = True
    scope = "model"
    grads: dict = field(default_factory=dict)
    dtypes: set = field(default_factory=set)

    def prune_model(self, model, adapter, pattern, calib_ids, settings):
        modules = prunable_modules(adapter)

        def on_batch(index, names, activation, grads):
            self.dtypes.add(settings.stats_dtype)
            a = activation.reshape(-1, activation.shape[-1]).to(settings.stats_dtype)
            for name, grad in zip(names, grads, strict=True):
                g = grad.reshape(-1, grad.shape[-1]).to(settings.stats_dtype)
                # dL/dW of a linear: sum_t g_t a_t^T (the taps: gradients of the windows' summed mean losses)
                self.grads[name] = self.grads.get(name, 0) + g.T @ a / calib_ids.shape[0]

        accumulate_gradient_stats(model, adapter, calib_ids, settings, on_batch)
        results = {}
        for name, linear in modules.items():
            weight = linear.weight.data.float()
            score = (weight * self.grads[name].float()).abs()
            results[name] = apply_prune_mask(linear, weight, select_prune_mask(score, pattern, "row"))
        return results


@pytest.mark.parametrize("family", ["llama", "opt", "mamba", "gpt2"])
def test_gradient_taps_equal_explicit_autograd(family):
    model = random_model(family)
    reference = copy.deepcopy(model)
    ids = random_ids()
    probe = GradientProbe()
    with torch.no_grad():  # the drivers run under no_grad: the taps must enable gradients themselves
        results = probe.prune(model, models.adapter_for(model), Pattern("unstructured", 0.5), ids,
                              EngineSettings(batch_size=2, stats_dtype=torch.float64, progress=False))
    # explicit: the mean next-token loss over all windows, one batch, autograd w.r.t. the weights (of the
    # modules the adapter prunes: GPT-2's Conv1D become linears when the adapter meets the model)
    linears = prunable_modules(models.adapter_for(reference))
    logits = reference(input_ids=ids, use_cache=False).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    expected = {name: linear.weight.grad for name, linear in linears.items()}
    assert set(probe.grads) == set(expected) == set(results)
    for name, grad in expected.items():
        torch.testing.assert_close(probe.grads[name].float(), grad, rtol=1e-4, atol=1e-7, msg=name)
    assert probe.dtypes == {torch.float64}  # EngineSettings reached the method
    # nothing left behind: no .grad, requires_grad restored, no hooks
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    masks = MaskState.from_results(results)
    assert len(masks) == len(expected)
    check_masks_against_weights(model, masks)


def test_a_linear_declared_applied_by_weight_is_tapped_when_called_as_a_module_too():
    """Adapter.applied_weights names linears a forward may apply as ``weight @ x`` (transformers 5's Mamba dt_proj);
    where the installed forward calls the module after all (older transformers on the CPU), the taps still read its
    output (through F.linear): here LLaMA's q_proj / down_proj declared so, the gradients as explicit autograd."""
    model = random_model("llama")
    reference = copy.deepcopy(model)
    ids = random_ids()
    adapter = models.adapter_for(model)
    adapter.applied_weights = lambda block: ("self_attn.q_proj", "mlp.down_proj")
    probe = GradientProbe()
    with torch.no_grad():
        probe.prune(model, adapter, Pattern("unstructured", 0.5), ids,
                    EngineSettings(batch_size=2, stats_dtype=torch.float64, progress=False))
    logits = reference(input_ids=ids, use_cache=False).logits[:, :-1].float()
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, linear in prunable_modules(models.adapter_for(reference)).items():
        torch.testing.assert_close(probe.grads[name].float(), linear.weight.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_declared_needs_keep_every_existing_pruner_as_it_was():
    needs = {name: cls.needs_calibration for name, cls in PRUNERS.items()}
    assert needs == {"dense": False, "magnitude": False, "wanda": True, "sparsegpt": True, "apt": True,
                     "numerical": True, "flap": True, "goa": True, "unit_baseline": False, "wanda_sp": True, "llm_pruner": True, "surgeon": True, "kobd": True, "lobd": True,
                     "surgeon_reference": True, "sparsegpt_reference": True, "wanda_reference": True,
                     "expert_drop": True}
    # gradients through the whole model: the Kronecker-factored methods and LLM-Pruner's Taylor importance
    whole_model = {"surgeon", "kobd", "lobd", "surgeon_reference", "llm_pruner"}
    # the layer-wise references run their own sequential drivers: whole-model scope, no gradients
    references = {"sparsegpt_reference", "wanda_reference"}
    assert all(cls.scope == "block" and not cls.needs_gradients for n, cls in PRUNERS.items()
               if n not in whole_model | references)
    assert all(PRUNERS[n].scope == "model" and PRUNERS[n].needs_gradients for n in whole_model)
    assert all(PRUNERS[n].scope == "model" and not PRUNERS[n].needs_gradients for n in references)
    assert {name: cls.propagate for name, cls in PRUNERS.items() if name not in whole_model | references} == {
        "dense": "pruned", "magnitude": "pruned", "wanda": "pruned", "sparsegpt": "pruned", "apt": "pruned",
        "numerical": "dense", "flap": "dense", "goa": "pruned", "unit_baseline": "dense", "wanda_sp": "pruned",
        "expert_drop": "dense"}  # (expert_drop: its default; pruner.sequential=true scores on the pruned layers)


def test_scope_model_without_driver_and_block_gradients_are_refused():
    @dataclass
    class NoDriver(Pruner):
        name = "no-driver"
        scope = "model"

    @dataclass
    class BlockGradients(Pruner):
        name = "block-gradients"
        needs_gradients = True

    model = random_model("llama")
    with pytest.raises(NotImplementedError, match="prune_model"):
        NoDriver().prune(model, models.adapter_for(model), Pattern("unstructured", 0.5), None, QUIET)
    with pytest.raises(ValueError, match="scope 'model'"):
        BlockGradients().check(Pattern("unstructured", 0.5))
    with pytest.raises(ValueError, match="needs calibration"):
        GradientProbe().prune(model, models.adapter_for(model), Pattern("unstructured", 0.5), None, QUIET)


@pytest.mark.parametrize("attributes, message", [
    ({"scope": "model"}, "needs a prune_model"),
    ({}, "needs a prune_group"),
    ({"needs_gradients": True, "prune_group": lambda self, m, s, p: {}}, "needs_gradients needs scope 'model'"),
    ({"scope": "layer"}, "scope 'layer' is not one of"),
    ({"propagate": "both"}, "propagate 'both' is not one of"),
    ({"patterns": ("unstructured", "blocks")}, r"patterns \['blocks'\]"),
])
def test_registering_a_method_without_its_required_members_fails_at_import(attributes, message):
    cls = dataclass(type("Incomplete", (Pruner,), {"name": "incomplete", **attributes}))
    with pytest.raises(TypeError, match=message):
        register(cls)
    assert "incomplete" not in PRUNERS


def test_engine_settings_reach_the_statistic():
    @dataclass
    class DtypeProbe(Wanda):
        name = "dtype-probe"
        seen: list = field(default_factory=list)

        def score(self, weight, stat):
            self.seen.append((stat.mean_sq.dtype, stat.count))
            return super().score(weight, stat)

    ids = random_ids(n=5, seqlen=12)
    for dtype in (torch.float64, torch.float32):
        model = random_model("opt")
        probe = DtypeProbe()
        prune_sequential(model, models.adapter_for(model), probe, Pattern("unstructured", 0.5), ids,
                         EngineSettings(batch_size=2, stats_dtype=dtype, progress=False))
        assert {seen[0] for seen in probe.seen} == {dtype}
        assert {seen[1] for seen in probe.seen} == {5 * 12}  # every token of every (uneven) batch


def test_packed_mask_round_trip():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) < 0.4
    packed = PackedMask.pack(mask)
    assert packed.bits.numel() == (7 * 13 + 7) // 8 and packed.pruned == int(mask.sum())
    assert torch.equal(packed.unpack(), mask)


def test_global_prune_masks_use_one_threshold_over_all_modules():
    scores = {"a": torch.tensor([[0.1, 5.0], [0.2, 6.0]]), "b": torch.tensor([[3.0, 0.3, 4.0, 7.0]])}
    masks = global_prune_masks(scores, 0.5)
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("ratio", [0.0, 0.013, 0.5, 0.77, 1.0])
def test_global_prune_masks_equal_a_stable_sort_of_everything(ratio):
    """The bisection threshold takes exactly what a stable sort of the concatenated fp32 scores takes: ties (many
    zeros, repeated values, -0.0 beside 0.0) in module order then element order; negatives, inf and float64
    inputs, NaN (last, as a sort puts it) included."""
    g = torch.Generator().manual_seed(4)
    scores = {"a": torch.randint(-3, 4, (7, 9), generator=g).double() / 4,
              "b": torch.randn(5, 11, generator=g).abs() * (torch.rand(5, 11, generator=g) < 0.5),
              "c": torch.tensor([[-0.0, 0.0, float("inf"), -float("inf"), 1e-30, -1e-30, float("nan")]]),
              "d": torch.tensor([0.0, -1.0, 1.0]) / 0.0}  # (nan as 0 / 0 makes it: sign bit set)
    flat = torch.cat([v.float().reshape(-1) for v in scores.values()])
    k = int(flat.numel() * ratio)
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[torch.sort(flat, stable=True)[1][:k]] = True
    masks = global_prune_masks(scores, ratio)
    assert torch.equal(torch.cat([masks[n].reshape(-1) for n in scores]), expected)
    assert all(masks[n].shape == scores[n].shape for n in scores)


def test_masks_persist_through_an_update_and_a_second_shot():
    model = random_model("llama")
    adapter = models.adapter_for(model)
    first = MaskState.from_results(build_pruner({"name": "magnitude"}).prune(
        model, adapter, Pattern("unstructured", 0.5), None, QUIET))
    assert len(first) == len(prunable_modules(adapter))
    assert all(value == pytest.approx(0.5) for value in first.sparsity().values())
    check_masks_against_weights(model, first)
    torch.manual_seed(2)
    with torch.no_grad():  # an update (a reconstruction step, a shot's weight update) writes dense values
        for linear in prunable_modules(adapter).values():
            linear.weight.copy_(torch.randn_like(linear.weight))
    with pytest.raises(RuntimeError, match="non-zero where the prune mask"):
        check_masks_against_weights(model, first)
    first.enforce(model)
    check_masks_against_weights(model, first)
    for name, linear in prunable_modules(adapter).items():
        assert not bool(linear.weight[first.prune_mask(name)].any()), name
    second = MaskState.from_results(build_pruner({"name": "magnitude"}).prune(
        model, adapter, Pattern("unstructured", 0.7), None, QUIET))
    assert second.contains(first) and not first.contains(second)
    merged = MaskState().merge(first).merge(second)
    assert merged.contains(first) and merged.contains(second) and second.contains(merged)
    assert merged.sparsity() == second.sparsity()
    assert all(value == pytest.approx(0.7, abs=0.01) for value in merged.sparsity().values())
    # a second shot with an unrelated mask: merge keeps the union, so nothing the first removed comes back
    other = MaskState()
    for name in first.names():
        other.register(name, torch.rand(first.masks[name].shape, generator=torch.Generator().manual_seed(3)) < 0.1)
    union = MaskState().merge(first).merge(other)
    assert union.contains(first) and union.contains(other)


@pytest.mark.parametrize("pruner_name", ["magnitude", "wanda", "sparsegpt"])
def test_existing_pruners_through_the_seam(pruner_name):
    from .conftest import load_tiny
    from .test_engine import expected_zeros

    loaded = load_tiny("tiny-llama")
    adapter = loaded.adapter
    dense = {name: linear.weight.detach().clone() for name, linear in prunable_modules(adapter).items()}
    ids = corpora.calibration_windows(loaded.tokenizer, "bundled", 8, 64, seed=0).ids
    pattern = Pattern("unstructured", 0.5)
    results = build_pruner({"name": pruner_name}).prune(loaded.model, adapter, pattern, ids, QUIET)
    masks = MaskState.from_results(results)
    assert masks.names() == list(dense)
    check_masks_against_weights(loaded.model, masks)
    for name, linear in prunable_modules(adapter).items():
        weight = linear.weight.detach()
        mask = masks.prune_mask(name)
        assert int(mask.sum()) == results[name].pruned == expected_zeros(pruner_name, pattern, weight), name
        if pruner_name == "magnitude":  # no calibration, no update: exactly the lowest |W| of the dense matrix
            assert torch.equal(mask, prune_per_matrix(dense[name].float().abs(), 0.5)), name
            assert torch.equal(weight, dense[name].masked_fill(mask, 0)), name
        elif pruner_name == "wanda":  # no update: kept weights untouched
            assert torch.equal(weight, dense[name].masked_fill(mask, 0)), name
        else:
            assert torch.equal(weight == 0, mask), name
