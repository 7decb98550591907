"""LLM-Pruner's Taylor importance without the recovery fine-tuning (Ma, Fang, Wang; NeurIPS'23; the baseline rows
"LLM-Pruner Vector / Element1 / Element2" of the GOA tables; docs/methods.md §7.8).

One forward + backward pass over the calibration windows on the dense model (the gradient taps,
:mod:`pruners.taps`) gives every prunable linear's weight gradient ``g`` of the mean next-token loss and, for the
second-order terms, ``F = (1/N) Σ_e g_e²``, the squared gradients of each window's own loss (the diagonal Fisher
standing in for the Hessian). Per weight (``taylor``, the reference's ``--taylor``)::

    param_first  (Element1): s = W · g
    param_second:            s = W · F · W
    param_mix    (Element2): s = W · g - ½ W · F · W
    vectorize    (Vector):   s = W · g, summed over each channel before the absolute value

A channel (a linear's output row or input column) scores ``Σ |s|`` over its weights (``vectorize``: ``|Σ s|``); a
unit (head / KV group, MLP neuron, Mamba channel) sums its channels over every linear weight it owns (the q / k / v
rows and o_proj columns of a head, gate / up rows and the down column of a neuron: the reference's "sum" group
reduction); the lowest ``round(ratio · count)`` units of every module are removed (the reference's block-wise mode),
with no compensation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModuleResult, register
from .masks import Pattern
from .settings import EngineSettings
from .structured import StructuredPruner, top_units
from .taps import accumulate_gradient_stats

TAYLOR = ("param_first", "param_second", "param_mix", "vectorize")


def taylor_salience(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, taylor: str) -> torch.Tensor:
    """Per-weight salience (module docstring): ``W g`` (first order), ``W F W`` (second), ``W g - ½ W F W`` (mix)."""
    if taylor in ("param_first", "vectorize"):
        return weight * grad
    if taylor == "param_second":
        return weight * fisher * weight
    if taylor == "param_mix":
        return weight * grad - 0.5 * weight * fisher * weight
    raise ValueError(f"pruner.taylor='{taylor}' is not one of: {', '.join(TAYLOR)}")


def channel_importance(salience: torch.Tensor, axis: int, taylor: str) -> torch.Tensor:
    """Per channel along ``axis`` (0: output rows, 1: input columns): ``Σ |s|``, or ``|Σ s|`` for ``vectorize``."""
    other = 1 - axis
    return salience.sum(other).abs() if taylor == "vectorize" else salience.abs().sum(other)


@register
@dataclass
class LLMPruner(StructuredPruner):
    """``pruner=llm_pruner`` (module docstring)."""

    name = "llm_pruner"
    needs_gradients = True
    scope = "model"
    keeps_statistics = False
    walks_blocks = False  # (the whole model's backward)
    resumes = False
    taylor: str = "param_first"  # param_first (Element1) | param_mix (Element2) | param_second | vectorize (Vector)
    allocation: str = "uniform"  # uniform (each module: ratio of its units; block-wise) | global (one ranking)
    attention_unit: str = "kv_group"  # kv_group (whole KV groups under GQA, plain heads otherwise) | query_head
    min_units: int = 1  # units of each kind every block keeps
    rounding: str = "nearest"  # round(ratio * count) units per module, as the reference | floor: int(ratio * count)
    blocks: list | None = None  # [start, stop) of the blocks pruned (the reference's LLaMA scripts: [4, 30)); null = all

    def check(self, pattern):
        super().check(pattern)
        if self.taylor not in TAYLOR:
            raise ValueError(f"pruner.taylor='{self.taylor}' is not one of: {', '.join(TAYLOR)}")

    def unit_importance(self, block, group, grads: dict, fishers: dict) -> torch.Tensor:
        """``[count]``: the sum over the linear weights the units own of their channels' importance."""
        total = torch.zeros(group.count, dtype=torch.float64)
        for path, (axis, index) in group.owned.items():
            module = path.rpartition(".")[0]
            if not path.endswith(".weight") or module not in grads:  # biases, Mamba's conv / A_log / D [I]
                continue
            weight = block.get_parameter(path).detach().double().cpu()
            salience = taylor_salience(weight, grads[module], fishers.get(module), self.taylor)
            channels = channel_importance(salience, axis, self.taylor)
            total += channels[index].sum(dim=1)
        return total

    @torch.no_grad()
    def prune(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings | None = None,
              ratios=None) -> dict[str, ModuleResult]:
        settings = self.start(pattern, calib_ids, settings, ratios)
        n, seqlen = calib_ids.shape
        second = self.taylor in ("param_second", "param_mix")
        prefix, blocks = adapter.blocks_prefix(), adapter.blocks()
        grads: dict = {}
        fishers: dict = {}
        scores, params, protected = {}, {}, {}

        def on_batch(index, names, activation, out_grads):
            if not self.prunes_block(index):
                return
            # [windows, seqlen, features]: some families flatten the tokens before a linear (OPT's fc1 / fc2)
            a = activation.to(settings.stats_dtype).reshape(-1, seqlen, activation.shape[-1])
            for name, g in zip(names, out_grads, strict=True):
                g = g.to(settings.stats_dtype).reshape(-1, seqlen, g.shape[-1])
                key = name[len(f"{prefix}.{index}.") :]
                # the taps' gradients are those of the windows' summed mean losses: dL/dW of the mean loss over the n
                # windows is Σ_t g_t a_t^T / n; a window's own gradient is its share (for the squared terms)
                if second:
                    per_window = torch.einsum("bto,bti->boi", g, a)
                    grads[key] = grads.get(key, 0) + per_window.sum(0) / n
                    fishers[key] = fishers.get(key, 0) + per_window.pow(2).sum(0) / n
                    del per_window
                else:
                    grads[key] = grads.get(key, 0) + g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1]) / n

        per_pass = settings.grad_windows or n
        passes, seen, pending = -(-n // per_pass), {}, {}

        def on_block(index):
            # a block's gradients of one pass (engine.grad_windows windows) leave the device; its units are scored
            # once the last pass has added its share (|W g| is not additive over passes)
            if not self.prunes_block(index):
                return
            store = pending.setdefault(index, ({}, {}))
            for source, target in ((grads, store[0]), (fishers, store[1])):
                for key, value in source.items():
                    target[key] = target.get(key, 0) + value.double().cpu()
                source.clear()
            seen[index] = seen.get(index, 0) + 1
            if seen[index] < passes:
                return
            block_grads, block_fishers = pending.pop(index)
            block = blocks[index]
            for group in self.groups(adapter, block):
                key = (index, group.kind)
                scores[key] = self.unit_importance(block, group, block_grads, block_fishers)
                params[key] = group.params_per_unit(block)
                protected[key] = top_units(scores[key], self.min_units)

        accumulate_gradient_stats(model, adapter, calib_ids, settings, on_batch, on_block)
        keep = self.allocate(scores, params, pattern, protected)
        keep = {key: adapter.repair_keep(blocks[key[0]], adapter.unit_group(blocks[key[0]], key[1]), mask, scores[key])
                for key, mask in keep.items()}
        return self.apply(model, adapter, keep, {}, calib_ids, settings)  # (no compensation: removal only)
