"""Expert pruning for mixture-of-experts models (docs/methods.md §13): ``sparsity=experts`` removes ``ratio`` of every
MoE layer's experts, each with its router row, ranked by a saliency measured on the calibration tokens.

Criteria (``pruner.criterion``), per expert ``e`` of a layer, over the calibration tokens ``X_e`` the router sends to
it (its top-k), with ``p_e(x)`` the router's softmax probability of ``e`` over all experts and ``f_e(x)`` the expert's
output before the router's weighting:

- ``reap`` (default; Lasby et al. 2025, "REAP the Experts"): ``S_e = mean_{x in X_e} p_e(x) ||f_e(x)||_2``;
- ``frequency``: ``|X_e|``, how often the router picks ``e``;
- ``routing_weight``: ``sum_{x in X_e} p_e(x)``;
- ``ean``: ``sum_{x in X_e} ||f_e(x)||_2`` (expert activation norm);
- ``random``: uniform scores (``pruner.seed`` and the layer index), the baseline of the expert-pruning papers.

An expert no calibration token reaches scores 0 on every data criterion and goes first. ``p_e`` is the softmax over all
experts, divided by the token's top-k sum where ``pruner.renormalize`` says (``auto``: where the model's config has
``norm_topk_prob`` set, as the reference's ``main.py``). As the reference, ``int(ratio * experts)`` experts go
from each layer (``pruner.rounding=floor``; ``nearest``: ``round``). Statistics come from the dense model (one pass, as the reference
observer) unless ``sequential=true`` (each layer scored on the outputs of the layers already pruned). Removal is exact:
a pruned model routes as the dense one with the removed experts' router logits at ``-inf`` (models/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ModuleResult, Pruner, register
from .engine import walk_blocks
from .resume import resume_walk
from .settings import EngineSettings
from .structured import ROUNDINGS, units_to_remove

CRITERIA = ("reap", "frequency", "routing_weight", "ean", "random")
RENORMALIZE = ("auto", "true", "false")


class ExpertSaliency:
    """Running sums, per expert of one MoE layer, over the calibration tokens routed to it (docs/methods.md §13)."""

    def __init__(self, experts: int, renormalize: bool = False):
        self.renormalize = renormalize
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.prob = torch.zeros(experts, dtype=torch.float64)
        self.norm = torch.zeros(experts, dtype=torch.float64)
        self.weighted_norm = torch.zeros(experts, dtype=torch.float64)
        self._probs = self._indices = None

    def routed(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """A batch's router output: softmax probabilities over all experts (``renormalize``: divided by each token's
        top-k sum) and the top-k choices."""
        self._indices = indices.detach()
        self._probs = router_probabilities(logits.detach(), self._indices, self.renormalize)
        if self.count.device != logits.device:  # (the sums stay where the block runs: no sync per expert)
            for name in ("count", "prob", "norm", "weighted_norm"):
                setattr(self, name, getattr(self, name).to(logits.device))

    def expert_output(self, expert: int, output: torch.Tensor) -> None:
        """Expert ``expert``'s outputs on the tokens routed to it (ascending token order, as the experts run)."""
        token = torch.where(self._indices == expert)[0]
        norms = output.detach().double().reshape(token.numel(), -1).norm(dim=-1)
        prob = self._probs[token, expert]
        self.count[expert] += token.numel()
        self.prob[expert] += prob.sum()
        self.norm[expert] += norms.sum()
        self.weighted_norm[expert] += (prob * norms).sum()

    def scores(self, criterion: str, seed: int = 0) -> torch.Tensor:
        """Higher = keep, on the CPU (``random``: uniform draws from ``seed``)."""
        if criterion == "random":
            return torch.rand(self.count.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        count = self.count.cpu()
        if criterion == "reap":
            return torch.where(count > 0, self.weighted_norm.cpu() / count.clamp(min=1), 0.0)
        return {"frequency": count, "routing_weight": self.prob, "ean": self.norm}[criterion].cpu()


def router_probabilities(logits: torch.Tensor, indices: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """``p(x) = softmax(logits)`` in fp64 over all experts, or (``renormalize``) ``p(x) / sum_{j in top-k(x)} p_j(x)``,
    the reference's ``renormalize_router_weights`` (docs/methods.md §13)."""
    probs = torch.softmax(logits.double(), dim=-1)
    if renormalize:
        probs = probs / probs.gather(-1, indices.long()).sum(-1, keepdim=True)
    return probs


def observe_experts(adapter, block, saliency: dict, renormalize: bool = False) -> list:
    """Hooks that feed ``saliency[0]`` (a fresh :class:`ExpertSaliency`) from ``block``'s router and experts."""
    paths = adapter.moe_paths(block)
    if paths is None:
        return []
    router, outputs = paths
    saliency[0] = stat = ExpertSaliency(len(outputs), renormalize)
    handles = [block.get_submodule(router).register_forward_hook(lambda m, a, out: stat.routed(out[0], out[2]))]
    for e, path in enumerate(outputs):
        handles.append(block.get_submodule(path).register_forward_hook(
            lambda m, a, out, e=e: stat.expert_output(e, out)))
    return handles


def experts_removed(ratio: float, count: int, top_k: int, rounding: str = "floor") -> int:
    """Experts a layer of ``count`` loses at ``ratio``: ``int(ratio * count)`` (``floor``, the reference) or
    ``round(ratio * count)``; ValueError where that leaves fewer than the ``top_k`` each token is routed to (checked
    before any work: runners/validate.py)."""
    remove = units_to_remove(ratio, count, rounding)
    if count - remove < top_k:
        raise ValueError(f"sparsity.ratio={ratio} removes {remove} of {count} experts per layer, leaving fewer than "
                         f"the {top_k} each token is routed to")
    return remove


def experts_to_keep(scores: torch.Tensor, ratio: float, top_k: int, rounding: str = "floor") -> torch.Tensor:
    """Indices (ascending) of the experts kept: the :func:`experts_removed` lowest-scoring go (stable ties: the
    higher index goes first)."""
    count = scores.numel()
    remove = experts_removed(ratio, count, top_k, rounding)
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[: count - remove].sort().values


@register
@dataclass
class ExpertDrop(Pruner):
    name = "expert_drop"
    patterns: ClassVar[tuple[str, ...]] = ("experts",)
    needs_calibration: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("moe",)
    propagate: ClassVar[str] = "dense"  # the default; sequential=true: scored on the pruned layers' outputs
    walks_blocks: ClassVar[bool] = True  # one pass over the blocks, each pruned in its turn: onloading works
    resumes: ClassVar[bool] = True  # each done block kept (its experts), a killed prune goes on after it
    criterion: str = "reap"
    renormalize: str = "auto"
    rounding: str = "floor"
    sequential: bool = False
    seed: int = 0  # criterion=random only

    def check(self, pattern):
        super().check(pattern)
        for key, value, choices in (("criterion", self.criterion, CRITERIA),
                                    ("renormalize", self.renormalize, RENORMALIZE),
                                    ("rounding", self.rounding, ROUNDINGS)):
            if value not in choices:
                raise ValueError(f"pruner.{key}='{value}' is not one of: {', '.join(choices)}")

    def renormalizes(self, config) -> bool:
        """Whether ``p_e`` is divided by the token's top-k sum (``auto``: the config's ``norm_topk_prob``)."""
        if self.renormalize == "auto":
            return bool(getattr(config, "norm_topk_prob", False))
        return self.renormalize == "true"

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
        renormalize = self.renormalizes(adapter.config)
        prefix = adapter.blocks_prefix()
        # keep each done block; go on after the last one kept (engine.resume, pruners/resume.py)
        start, batches, results, after_block = resume_walk(model, adapter, settings)
        blocks = walk_blocks(model, adapter, calib_ids, lambda b: {}, None, settings,
                             "pruned" if self.sequential else "dense", desc=f"{self.name} ({self.criterion})",
                             observe=lambda b: observe_experts(adapter, b, saliency, renormalize), start=start,
                             start_batches=batches, after_block=after_block)
        for index, block, _ in blocks:
            stat = saliency.pop(0, None)
            if stat is None:  # (a dense layer: Qwen3-MoE's mlp_only_layers)
                continue
            scores = stat.scores(self.criterion, self.seed + index)
            keep = experts_to_keep(scores, pattern.ratio, adapter.expert_layout()[1], self.rounding)
            adapter.remove_experts(block, keep)
            results[f"{prefix}.{index}.{adapter.moe_paths(block)[0]}"] = ModuleResult(
                pruned=scores.numel() - keep.numel(), total=scores.numel(), unit_kind="expert",
                kept_units=keep.tolist())
        return results
