"""Expert pruning for mixture-of-experts models (docs/methods.md §13): ``sparsity=experts`` removes ``ratio`` of every
MoE layer's experts, each with its router row, ranked by a saliency measured on the calibration tokens.

Criteria (``pruner.criterion``), per expert ``e`` of a layer, over the calibration tokens ``X_e`` the router sends to
it (its top-k), with ``p_e(x)`` the router's softmax probability of ``e`` over all experts and ``f_e(x)`` the expert's
output before the router's weighting:

- ``reap`` (default; Lasby et al. 2025, "REAP the Experts"): ``S_e = mean_{x in X_e} p_e(x) ||f_e(x)||_2``;
- ``frequency``: ``|X_e|``, how often the router picks ``e``;
- ``routing_weight``: ``sum_{x in X_e} p_e(x)``;
- ``ean``: ``sum_{x in X_e} ||f_e(x)||_2`` (expert activation norm).

An expert no calibration token reaches scores 0 on every criterion and goes first. ``p_e`` is the full softmax as in
the REAP reference (``renormalize_router_weights=False``), not the weight the model applies after its top-k
renormalisation. Statistics come from the dense model (one pass, as the reference observer) unless
``sequential=true`` (each layer scored on the outputs of the layers already pruned). Removal is exact: a pruned
model routes as the dense one with the removed experts' router logits at ``-inf`` (models/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ModuleResult, Pruner, register
from .engine import walk_blocks
from .settings import EngineSettings
from .structured import units_to_remove

CRITERIA = ("reap", "frequency", "routing_weight", "ean")


class ExpertSaliency:
    """Running sums, per expert of one MoE layer, over the calibration tokens routed to it (docs/methods.md §13)."""

    def __init__(self, experts: int):
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.prob = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)
        self.weighted_norm = torch.zeros(experts, dtype=torch.float64)
        self._probs = self._indices = None

    def routed(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """A batch's router output: softmax probabilities over all experts and the top-k choices."""
        self._probs = torch.softmax(logits.detach().double(), dim=-1)
        self._indices = indices.detach()

    def expert_output(self, expert: int, output: torch.Tensor) -> None:
        """Expert ``expert``'s outputs on the tokens routed to it (ascending token order, as the experts run)."""
        token = torch.where(self._indices == expert)[0]
        norms = output.detach().double().reshape(token.numel(), -1).norm(dim=-1)
        prob = self._probs[token, expert]
        self.count[expert] += token.numel()
        self.prob[expert] += prob.sum().cpu()
        self.norm[expert] += norms.sum().cpu()
        self.weighted_norm[expert] += (prob * norms).sum().cpu()

    def scores(self, criterion: str) -> torch.Tensor:
        """Higher = keep."""
        if criterion == "reap":
            return torch.where(self.count > 0, self.weighted_norm / self.count.clamp(min=1), 0.0)
        return {"frequency": self.count, "routing_weight": self.prob, "ean": self.norm}[criterion]


def observe_experts(adapter, block, saliency: dict) -> list:
    """Hooks that feed ``saliency[0]`` (a fresh :class:`ExpertSaliency`) from ``block``'s router and experts."""
    paths = adapter.moe_paths(block)
    if paths is None:
        return []
    router, outputs = paths
    saliency[0] = stat = ExpertSaliency(len(outputs))
    handles = [block.get_submodule(router).register_forward_hook(lambda m, a, out: stat.routed(out[0], out[2]))]
    for e, path in enumerate(outputs):
        handles.append(block.get_submodule(path).register_forward_hook(
            lambda m, a, out, e=e: stat.expert_output(e, out)))
    return handles


def experts_removed(ratio: float, count: int, top_k: int) -> int:
    """Experts a layer of ``count`` loses at ``ratio``: ``round(ratio * count)``; ValueError where that leaves fewer
    than the ``top_k`` each token is routed to (checked before any work: runners/validate.py)."""
    remove = units_to_remove(ratio, count)
    if count - remove < top_k:
        raise ValueError(f"sparsity.ratio={ratio} removes {remove} of {count} experts per layer, leaving fewer than "
                         f"the {top_k} each token is routed to")
    return remove


def experts_to_keep(scores: torch.Tensor, ratio: float, top_k: int) -> torch.Tensor:
    """Indices (ascending) of the experts kept: the :func:`experts_removed` lowest-scoring go (stable ties: the
    higher index goes first)."""
    count = scores.numel()
    remove = experts_removed(ratio, count, top_k)
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[: count - remove].sort().values


@register
@dataclass
class ExpertDrop(Pruner):
    name = "expert_drop"
    patterns: ClassVar[tuple[str, ...]] = ("experts",)
    needs_calibration: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("moe",)
    criterion: str = "reap"
    sequential: bool = False

    def check(self, pattern):
        super().check(pattern)
        if self.criterion not in CRITERIA:
            raise ValueError(f"pruner.criterion='{self.criterion}' is not one of: {', '.join(CRITERIA)}")

    @torch.no_grad()
    def prune(self, model, adapter, pattern, calib_ids, settings: EngineSettings | None = None, ratios=None
              ) -> dict[str, ModuleResult]:
        if ratios is not None:
            raise ValueError(f"pruner '{self.name}' removes whole experts: sparsity.allocation must be uniform")
        self.check(pattern)
        if calib_ids is None:
            raise ValueError(f"pruner '{self.name}' needs calibration data")
        settings = settings or EngineSettings()
        saliency: dict = {}
        results: dict[str, ModuleResult] = {}
        prefix = adapter.blocks_prefix()
        blocks = walk_blocks(model, adapter, calib_ids, lambda b: {}, None, settings,
                             "pruned" if self.sequential else "dense", desc=f"{self.name} ({self.criterion})",
                             observe=lambda b: observe_experts(adapter, b, saliency))
        for index, block, _ in blocks:
            stat = saliency.pop(0, None)
            if stat is None:  # (a dense layer: Qwen3-MoE's mlp_only_layers)
                continue
            scores = stat.scores(self.criterion)
            keep = experts_to_keep(scores, pattern.ratio, adapter.expert_layout()[1])
            adapter.remove_experts(block, keep)
            results[f"{prefix}.{index}.{adapter.moe_paths(block)[0]}"] = ModuleResult(
                pruned=scores.numel() - keep.numel(), total=scores.numel(), unit_kind="expert",
                kept_units=keep.tolist())
        return results
