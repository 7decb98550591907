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

from .test_families import ids, mixtral, qwen3_moe

QUIET = EngineSettings(progress=False, batch_size=2)


@pytest.fixture(params=["mixtral", "qwen3_moe"])
def moe(request):
    torch.manual_seed(0)
    return {"mixtral": mixtral, "qwen3_moe": qwen3_moe}[request.param]().eval()


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
