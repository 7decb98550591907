"""Mixture-of-experts layers (models/moe.py) on small random Mixtral / Qwen3-MoE configs: the per-expert linears
compute what transformers' fused experts compute, each expert's statistics come from exactly the tokens the router
sends it, and an expert no calibration token reaches is pruned by magnitude per row and listed in the record."""

from __future__ import annotations

import pytest
import torch

from models import adapter_for
from models.moe import ExpertLinears
from pruners import Pattern, build_pruner, prune_sequential, walk_blocks
from pruners.accounting import account
from pruners.allocation import Allocation
from pruners.masks import select_prune_mask
from pruners.settings import EngineSettings
from pruners.stats import Hessian

from .test_families import ids, mixtral, qwen2_moe, qwen3_moe

QUIET = EngineSettings(progress=False, batch_size=2)


@pytest.fixture(params=["mixtral", "qwen3_moe", "qwen2_moe"])
def moe(request):
    torch.manual_seed(0)
    return {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe}[request.param]().eval()


def test_per_expert_linears_compute_what_the_fused_experts_compute(moe):
    with torch.no_grad():
        fused = moe(input_ids=ids(2)).logits
        adapter = adapter_for(moe)
        assert any(isinstance(getattr(b.mlp, "experts", None), ExpertLinears) for b in adapter.blocks())
        torch.testing.assert_close(moe(input_ids=ids(2)).logits, fused, atol=1e-5, rtol=1e-5)
        fused_again = adapter.native_state(moe.state_dict())
    assert not any(".experts.0." in k for k in fused_again) and any(k.endswith("experts.gate_up_proj") for k in fused_again)


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(moe):
    adapter = adapter_for(moe)
    routed = {}

    def taps_of(block):
        if not hasattr(block.mlp, "experts"):
            return {}
        handle = block.mlp.gate.register_forward_hook(
            lambda m, args, out: routed.setdefault(id(block), []).append(out[2]))
        taps_of.handles.append(handle)
        return {g: (g.tap, block.get_submodule(g.names[0]).in_features) for g in adapter.linear_groups(block)
                if g.routed}

    taps_of.handles = []
    checked = 0
    with torch.no_grad():
        for _, block, stats in walk_blocks(moe, adapter, ids(4), taps_of, Hessian, QUIET):
            for handle in taps_of.handles:
                handle.remove()
            taps_of.handles.clear()
            if not stats:
                continue
            chosen = torch.cat(routed[id(block)])
            for group, stat in stats.items():
                expert = int(group.names[0].split(".")[2])
                assert stat.count == int((chosen == expert).sum()), group.names
                checked += 1
    layers = sum(isinstance(getattr(b.mlp, "experts", None), ExpertLinears) for b in adapter.blocks())
    assert checked == 8 * layers  # 4 experts x (gate/up, down) per MoE layer


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_reported(moe, caplog):
    """One window of one token: top-2 routing reaches exactly 2 of the 4 experts of each MoE layer."""
    adapter = adapter_for(moe)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    with torch.no_grad():
        results = prune_sequential(moe, adapter, build_pruner({"name": "sparsegpt"}), Pattern("unstructured", 0.5),
                                   ids(1, 1), QUIET)
    layers = [i for i, b in enumerate(adapter.blocks()) if isinstance(getattr(b.mlp, "experts", None), ExpertLinears)]
    for i in layers:
        flagged = {n.split(".")[5] for n, r in results.items() if r.uncalibrated and f"layers.{i}." in n}
        assert len(flagged) == 2, flagged  # (experts 2 of 4: 3 linears each)
        for e in flagged:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
                expected = select_prune_mask(before[name].abs(), Pattern("unstructured", 0.5), "row")
                assert torch.equal(moe.get_parameter(name) == 0, expected)
                assert torch.equal(moe.get_parameter(name)[~expected], before[name][~expected])  # (no update)
    assert "saw no calibration token: pruned by magnitude per row" in caplog.text
    _, sparsity = account(moe, adapter, Pattern("unstructured", 0.5), Allocation(), True, None, results, None)
    assert len(sparsity["uncalibrated_modules"]) == 6 * len(layers)
    assert sparsity["overall"] == pytest.approx(0.5, abs=1e-3)


# --- whole experts (sparsity=experts, pruner=expert_drop; pruners/expert_drop.py) -----------------------------------


def _route_around(model, adapter, removed: dict):
    """Hooks that make each router answer as if the experts ``removed[block index]`` had logit -inf (the test's own
    routing: softmax over all experts, top-k, renormalised where the family does)."""
    normalise = getattr(model.config, "norm_topk_prob", True)  # (Mixtral always renormalises)
    handles = []
    for index, block in enumerate(adapter.blocks()):
        if index not in removed:
            continue

        def hook(module, args, out, gone=removed[index]):
            logits = out[0].masked_fill(torch.isin(torch.arange(out[0].shape[-1]), torch.tensor(gone)), float("-inf"))
            top, chosen = torch.topk(torch.softmax(logits.float(), -1), module.top_k, dim=-1)
            if normalise:
                top = top / top.sum(-1, keepdim=True)
            return logits, top.to(out[1].dtype), chosen

        handles.append(block.mlp.gate.register_forward_hook(hook))
    return handles


def test_removing_experts_routes_as_if_their_logits_were_minus_infinity_and_reloads_equal(moe, tmp_path):
    """Removal with the router's rows is exact (logits and KV-cached generation), with a different expert count per
    layer (Mixtral: 2 and 3 of 4 kept; Qwen3-MoE: its one MoE layer, beside a dense one), and the pruned checkpoint
    reloads equal."""
    from models import checkpoint

    adapter = adapter_for(moe)
    moe_blocks = [i for i, b in enumerate(adapter.blocks()) if adapter.expert_count(b)]
    removed = {i: [1, 3][: 2 - n] for n, i in enumerate(moe_blocks)} if len(moe_blocks) > 1 else {moe_blocks[0]: [0, 2]}
    prompt = ids(1, 6)
    with torch.no_grad():
        handles = _route_around(moe, adapter, removed)
        expected = moe(input_ids=ids(2)).logits
        expected_tokens = moe.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for handle in handles:
            handle.remove()
        assert not torch.allclose(moe(input_ids=ids(2)).logits, expected)  # (the removal changes the model)
        for i, gone in removed.items():
            adapter.remove_experts(adapter.blocks()[i], [e for e in range(4) if e not in gone])
        torch.testing.assert_close(moe(input_ids=ids(2)).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(moe.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), expected_tokens)
    counts = [adapter.block_counts(b).get("expert") for b in adapter.blocks()]
    assert counts == ([2, 3] if len(moe_blocks) > 1 else [None, 2])
    assert [adapter.blocks()[i].mlp.gate.weight.shape[0] for i in moe_blocks] == [c for c in counts if c]
    structure = checkpoint.save_pruned(moe, None, tmp_path, adapter)
    reloaded, _ = checkpoint.load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids(2)).logits, moe(input_ids=ids(2)).logits)
    # one count in every MoE layer (Qwen3-MoE: beside its dense layer): the config says it, in memory and on disk
    assert structure["plain_from_pretrained"] == (len(moe_blocks) == 1)
    if len(moe_blocks) == 1:
        from transformers import AutoModelForCausalLM

        assert moe.config.num_experts == 2
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids(2)).logits, moe(input_ids=ids(2)).logits)
    with pytest.raises(ValueError, match="keeping 1 experts of a layer that routes every token to 2"):
        adapter.remove_experts(adapter.blocks()[moe_blocks[-1]], [0])


@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_saliency_equals_a_token_by_token_computation(moe, renormalize):
    """REAP, frequency, routing weight and EAN from the hooks equal a direct loop over every token and its top-k
    experts: the router's softmax probability (renormalised: divided by the token's top-k sum) times the norm of the
    expert's own output on that token."""
    from models.shrink import shrink_silent_units
    from pruners.expert_drop import ExpertSaliency, observe_experts

    adapter = adapter_for(moe)
    index = next(i for i, b in enumerate(adapter.blocks()) if adapter.expert_count(b))
    block = adapter.blocks()[index]
    inputs = []
    saliency: dict = {}
    handles = observe_experts(adapter, block, saliency, renormalize)
    handles.append(block.mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
    with torch.no_grad():
        moe(input_ids=ids(3))
        for handle in handles:
            handle.remove()
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        probs = torch.softmax(torch.nn.functional.linear(x, block.mlp.gate.weight).double(), -1)
        chosen = torch.topk(probs, block.mlp.gate.top_k, dim=-1).indices
        expected = ExpertSaliency(4)
        for t in range(x.shape[0]):
            if renormalize:
                probs[t] /= probs[t, chosen[t]].sum()
            for e in chosen[t].tolist():
                expert = block.mlp.experts[e]
                y = expert.down_proj(torch.nn.functional.silu(expert.gate_proj(x[t])) * expert.up_proj(x[t]))
                norm = y.double().norm()
                expected.count[e] += 1
                expected.prob[e] += probs[t, e]
                expected.norm[e] += norm
                expected.weighted_norm[e] += probs[t, e] * norm
    assert int(saliency[0].count.sum()) == x.shape[0] * 2
    for criterion in ("reap", "frequency", "routing_weight", "ean"):
        torch.testing.assert_close(saliency[0].scores(criterion), expected.scores(criterion), rtol=1e-5, atol=1e-7)
    # (the rows + columns methods' shrink step walks the unit groups, not the experts: nothing silent, nothing cut)
    before = [adapter.block_counts(b) for b in adapter.blocks()]
    assert [{k: v["kept"] for k, v in b.items()} for b in shrink_silent_units(moe, adapter)["blocks"]] == before


def test_expert_drop_through_the_runner_and_what_it_refuses(tmp_path):
    """pruner=expert_drop sparsity=experts from a local Mixtral folder: half of every layer's experts go, the lowest
    REAP scores, recorded as units; refused before work: a family without experts, a ratio leaving fewer experts than
    each token is routed to, a pruner that cannot remove experts (every other one)."""
    from transformers import AutoTokenizer

    from models.loading import TINY_DIR
    from runners.run import execute
    from runners.validate import ConfigError, validate

    from .conftest import compose

    torch.manual_seed(0)
    folder = tmp_path / "mixtral"
    model = mixtral()
    model.save_pretrained(folder, state_dict=adapter_for(model).native_state(model.state_dict()))
    AutoTokenizer.from_pretrained(TINY_DIR / "tiny-llama").save_pretrained(folder)
    common = ["model=local", f"model.path={folder}", "model.seqlen=64", "calib.nsamples=4", "eval.ppl.max_windows=2",
              f"output_root={tmp_path / 'out'}", "wandb.mode=disabled", "progress=false", "speed.mode=never"]
    record = execute(compose(*common, "pruner=expert_drop", "sparsity=experts", "sparsity.ratio=0.5", "save_model=true"))
    structure = record["structure"]
    assert record["pattern"]["label"] == "50% experts" and structure["unit_scope"] == "experts"
    assert [b["expert"]["kept"] for b in structure["blocks"]] == [2, 2]
    assert all(len(b["expert"]["kept_units"]) == 2 for b in structure["blocks"])
    assert structure["removed_fraction"] == pytest.approx(0.5)
    assert structure["parameters_before"] - structure["parameters_after"] == 2 * 2 * (3 * 64 * 128 + 64)
    with pytest.raises(ConfigError, match="sparsity.ratio=0.75 removes 3 of 4 experts per layer, leaving fewer than"):
        validate(compose(*common, "pruner=expert_drop", "sparsity=experts", "sparsity.ratio=0.75"))
    pruned = [f"model.path={tmp_path / 'out' / 'default' / record['run_id'] / 'model'}", *common[2:]]
    with pytest.raises(ConfigError, match="removes 1 of 2 experts per layer"):  # (its layers' counts now)
        validate(compose("model=local", *pruned, "pruner=expert_drop", "sparsity=experts", "sparsity.ratio=0.5"))
    with pytest.raises(ConfigError, match="pruner 'flap' does not support sparsity kind 'experts'"):
        validate(compose(*common, "pruner=flap", "sparsity=experts"))
    validate(compose("model=tiny-llama", "pruner=dense", "sparsity=experts"))  # (the dense baseline: any pattern)
    with pytest.raises(ConfigError, match="pruner 'expert_drop' drives moe models, not llama"):
        validate(compose("model=tiny-llama", "pruner=expert_drop", "sparsity=experts"))
