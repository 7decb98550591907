"""The adapter interface: the one place that knows an architecture (docs/architecture.md §2.1).

Pruners and evaluators talk to a model only through an :class:`Adapter`: its blocks, how to call a
block alone, the prunable linears grouped by shared input, where each group's input is observed,
and the structural units (heads, KV groups, MLP neurons, Mamba channels) with the rows and columns
they own.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """Where the input of a group of linears is observed during a block's forward.

    ``module`` is hooked (path relative to the block). ``where`` is ``"input"`` (the first positional
    argument of its forward) or ``"output"``; ``narrow`` optionally keeps ``[start, start+length)`` of
    the last dimension. The default tap of a group is the input of its first module; an adapter
    overrides it where the installed forward bypasses the module (e.g. Mamba's ``dt_proj``).
    """

    module: str
    where: str = "input"
    narrow: tuple[int, int] | None = None

    def select(self, args: tuple, output) -> torch.Tensor:
        x = args[0] if self.where == "input" else output
        if isinstance(x, tuple):
            x = x[0]
        if self.narrow is not None:
            x = x.narrow(-1, self.narrow[0], self.narrow[1])
        return x


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input: one set of statistics (one Hessian) serves all."""

    names: tuple[str, ...]
    tap: Tap
    # a mixture-of-experts expert's linears: the router may send them no calibration token (models/moe.py)
    routed: bool = False


@dataclass
class UnitGroup:
    """A family of structural units of one block and the slices of parameters each unit owns.

    ``owned[param_path] = (axis, index)`` where ``index`` has shape ``[count, width]``: unit ``u``
    owns ``param.index_select(axis, index[u])``. Axis 0 of a linear weight is its output rows,
    axis 1 its input columns. Removing unit ``u`` means deleting those slices everywhere.

    ``reader`` is the linear whose input columns carry the units' outputs (o_proj / out_proj, down_proj
    / fc2, Mamba's out_proj): where structured methods score units and compensate their removal
    (docs/methods.md §4.1, §3.7). ``refines`` names the group this one is a finer alternative of (query
    heads inside KV groups): a structured method uses one or the other, never both. ``attention``: the units are
    attention heads (or KV groups): what ``sparsity=heads`` removes.
    """

    kind: str
    count: int
    owned: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    reader: str = ""
    refines: str | None = None
    attention: bool = False

    def reader_columns(self) -> torch.Tensor:
        """``[count, width]`` input columns of ``reader`` owned by each unit."""
        axis, index = self.owned[f"{self.reader}.weight"]
        assert axis == 1, "a unit group's reader owns input columns"
        return index

    def params_per_unit(self, block: nn.Module) -> int:
        total = 0
        for path, (axis, index) in self.owned.items():
            param = block.get_parameter(path)
            other = param.numel() // param.shape[axis]
            total += index.shape[1] * other
        return total


def _contiguous(count: int, width: int, offset: int = 0) -> torch.Tensor:
    """Index ``[count, width]``: unit u owns ``offset + [u*width, (u+1)*width)``."""
    return offset + torch.arange(count * width).view(count, width)


class Adapter(abc.ABC):
    """Base class; one subclass per model family (registered in :mod:`models.registry`). The abstract methods and
    the class attributes ``family`` and ``model_types`` are required: a family missing one fails when its class is
    defined (``model_types`` / ``family``) or first instantiated (a method), not in the middle of a run."""

    family: ClassVar[str]
    unit_scope: ClassVar[str] = "attention+MLP"  # what the removable units make up, in words
    model_types: ClassVar[tuple[str, ...]]  # HF ``config.model_type`` values this adapter handles
    has_units: ClassVar[bool] = True  # False: no structural units (structured sparsity refused before work)
    modality: ClassVar[str] = "text"  # what the model generates: "text" (a tokenizer's tokens) or "image" (VQ tokens)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, kind in (("family", str), ("model_types", tuple)):
            if not isinstance(getattr(cls, name, None), kind):
                raise TypeError(f"adapter {cls.__name__}: class attribute '{name}' ({kind.__name__}) is required")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -----------------------------------------------------------------------------
    @abc.abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer / mixer blocks, in order."""

    @abc.abstractmethod
    def pre_block_modules(self) -> list[nn.Module]:
        """Modules that run before block 0 (embeddings, positions, rotary): moved to the device for capture."""

    @abc.abstractmethod
    def post_block_modules(self) -> list[nn.Module]:
        """Modules that run after the last block, in order, ending with the LM head."""

    @abc.abstractmethod
    def linear_groups(self, block: nn.Module) -> list[LinearGroup]:
        """Prunable linears of a block, grouped by shared input, in forward order."""

    def untouched_linears(self, block: nn.Module) -> tuple[str, ...]:
        """Linears of a block that no method prunes, by the family's rule (in no linear group; e.g. Qwen2-MoE's
        shared expert): with :meth:`linear_groups`, every linear of the block is accounted for. Default: none."""
        return ()

    def applied_weights(self, block: nn.Module) -> tuple[str, ...]:
        """Prunable linears that the installed forward applies by their weight (``weight @ x``, features along
        dim -2) instead of calling the module, so that a hook on the module never fires: the gradient taps read
        their outputs off that product (:mod:`pruners.taps`). Default: none."""
        return ()

    def query_key(self, block: nn.Module) -> tuple[str, str]:
        """The linears whose outputs are the attention queries and keys (before any rotary embedding), for
        :meth:`attention_probabilities`. Families without attention raise."""
        raise NotImplementedError(f"model family '{self.family}' has no attention probabilities")

    def attention_probabilities(self, block: nn.Module, q: torch.Tensor, k: torch.Tensor, kwargs: dict
                                ) -> torch.Tensor:
        """``[batch, query heads, seqlen, seqlen]`` causal attention probabilities (fp32) from the outputs of
        :meth:`query_key` on a batch of unpadded windows (``kwargs``: what the block was called with)."""
        raise NotImplementedError(f"model family '{self.family}' has no attention probabilities")

    @abc.abstractmethod
    def unit_groups(self, block: nn.Module) -> list[UnitGroup]:
        """Structural units of a block (heads / KV groups, MLP neurons, Mamba inner channels)."""

    def native_state(self, state: dict) -> dict:
        """``state`` (a model state dict) with every tensor as the family's checkpoints store it (written by
        ``save_pruned`` and the lm-eval command-line path); default: as it is. GPT-2 transposes its projections, which
        PruneLab holds as ``nn.Linear`` and its checkpoints as ``Conv1D``."""
        return state

    def from_native_state(self, state: dict) -> dict:
        """The inverse of :meth:`native_state` (a checkpoint's tensors as this model's modules hold them)."""
        return state

    # --- derived helpers (architecture-independent) ----------------------------------------------
    def prunable_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for group in self.linear_groups(block) for name in group.names}

    def prunable_parameter_names(self) -> list[str]:
        """Full parameter names (as in ``model.named_parameters``) of every prunable weight."""
        prefix = self.blocks_prefix()
        return [
            f"{prefix}.{i}.{name}.weight"
            for i, block in enumerate(self.blocks())
            for name in self.prunable_linears(block)
        ]

    def blocks_prefix(self) -> str:
        blocks = self.blocks()
        for name, module in self.model.named_modules():
            if module is blocks:
                return name
        raise RuntimeError("blocks are not a submodule of the model")

    def block_kind(self, block: nn.Module):
        """What decides the kwargs a block receives from the model (its mask, its rotary embeddings), where blocks
        differ in it (e.g. Gemma's ``"sliding_attention"`` / ``"full_attention"`` layers); default: all alike."""
        return None

    def block_kwargs(self, block: nn.Module, kwargs: dict) -> dict:
        """The captured kwargs that ``block`` receives: of its kind, where they were captured by kind
        (:class:`models.blocks.PerKind`)."""
        from .blocks import PerKind

        return kwargs[self.block_kind(block)] if isinstance(kwargs, PerKind) else kwargs

    def call_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run one block alone with the kwargs captured for it (transformers 4 returns tuples, 5 tensors)."""
        out = block(hidden, **self.block_kwargs(block, kwargs))
        return out[0] if isinstance(out, tuple) else out

    # --- structured removal (docs/methods.md §1.4) ------------------------------------------------
    def unit_group(self, block: nn.Module, kind: str) -> UnitGroup:
        for group in self.unit_groups(block):
            if group.kind == kind:
                return group
        raise ValueError(f"{self.family} blocks have no '{kind}' units "
                         f"(they have: {', '.join(g.kind for g in self.unit_groups(block))})")

    def structure_groups(self, block: nn.Module, fine: bool = False, attention_only: bool = False
                         ) -> list[UnitGroup]:
        """Unit groups that together partition a block's structures: the coarse groups, or with ``fine`` their finer
        alternatives wherever the family has them (query heads instead of whole KV groups, Mamba-2 heads instead of
        whole B/C groups); ``attention_only``: the attention groups alone (``sparsity=heads``; ValueError for a
        family without)."""
        groups = self.unit_groups(block)
        chosen = {g.refines for g in groups if g.refines} if fine else set()
        groups = [g for g in groups if (g.refines is None and g.kind not in chosen) or (fine and g.refines)]
        if attention_only:
            groups = [g for g in groups if g.attention]
            if not groups:
                raise ValueError(f"sparsity=heads: model family '{self.family}' has no attention heads")
        return groups

    def unit_parameters(self, scope: str = "all") -> int:
        """Parameters owned by removable units, what a structured ``ratio`` counts (``scope``, as
        :attr:`pruners.masks.Pattern.unit_scope`: ``"all"``: :attr:`unit_scope`; ``"attention"``: the attention units'
        alone, what a ``heads`` ratio counts; ``"experts"``: the MoE layers' experts with their router rows)."""
        if scope not in ("all", "attention", "experts"):
            raise ValueError(f"unit scope '{scope}' is not one of: all, attention, experts")
        if scope == "experts":
            return sum(self.expert_parameters(block) for block in self.blocks())
        return sum(g.count * g.params_per_unit(block) for block in self.blocks()
                   for g in self.structure_groups(block, attention_only=scope == "attention"))

    def block_counts(self, block: nn.Module) -> dict[str, int]:
        """Units of every kind this block has now (after any removal; MoE layers: ``expert`` too)."""
        counts = {g.kind: g.count for g in self.unit_groups(block)}
        if self.expert_count(block):
            counts["expert"] = self.expert_count(block)
        return counts

    # --- mixture-of-experts layers (sparsity=experts; models/moe.py) ------------------------------------------
    def expert_count(self, block: nn.Module) -> int:
        """How many experts the block's MoE layer has now; 0: no MoE layer (every block of a dense family)."""
        return 0

    def expert_layout(self) -> tuple[int, int]:
        """``(experts per MoE layer, experts each token is routed to)``; ValueError: the family has no experts."""
        raise ValueError(f"{self.family} models have no mixture-of-experts layers")

    def expert_parameters(self, block: nn.Module) -> int:
        """Parameters of the block's experts and their router rows (what an ``experts`` ratio counts)."""
        return 0

    def moe_paths(self, block: nn.Module) -> tuple[str, list[str]] | None:
        """``(router, [expert 0's output module, ...])``, paths relative to the block, of its MoE layer; None: none.
        The router returns ``(logits [tokens, experts], applied weights [tokens, k], expert indices [tokens, k])``
        (transformers 5); expert ``e``'s output module sees the tokens routed to it, in ascending token order."""
        return None

    def remove_experts(self, block: nn.Module, keep) -> None:
        """Delete every expert of the block's MoE layer not in ``keep`` (indices), with its router row."""
        raise NotImplementedError(f"model family '{self.family}' has no experts")

    def check_removal(self, block: nn.Module, group: UnitGroup, keep: torch.Tensor) -> None:
        """Raise ValueError if keeping only ``keep`` of ``group`` leaves an invalid block (family rules)."""
        if keep.numel() == 0:
            raise ValueError(f"removing every {group.kind} of a block is not supported (keep at least one)")

    def remove_units(self, block: nn.Module, kind: str, keep) -> None:
        """Physically delete every unit of ``kind`` not in ``keep`` (indices): the owned slices of every
        parameter are cut out, linears / convolutions get their new sizes, then the family updates the
        block's own size attributes (:meth:`resized`)."""
        group = self.unit_group(block, kind)
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        if keep.numel() and (keep.min() < 0 or keep.max() >= group.count or keep.unique().numel() != keep.numel()):
            raise ValueError(f"keep indices for {kind} must be distinct and in [0, {group.count})")
        self.check_removal(block, group, keep)
        if keep.numel() == group.count:
            return
        for path, (axis, index) in group.owned.items():
            param = block.get_parameter(path)
            # the complement of the removed slices, in the parameter's own order (Mamba's in_proj: x rows, then gate
            # rows); what no unit owns stays (Mamba-2's B / C channels when heads go)
            removed = torch.ones(group.count, dtype=torch.bool)
            removed[keep] = False
            stays = torch.ones(param.shape[axis], dtype=torch.bool)
            stays[index[removed].reshape(-1)] = False
            kept = stays.nonzero().flatten().to(param.device)
            module_path, _, name = path.rpartition(".")
            module = block.get_submodule(module_path) if module_path else block
            setattr(module, name, nn.Parameter(param.data.index_select(axis, kept).contiguous(),
                                               requires_grad=param.requires_grad))
        for module in block.modules():
            _sync_sizes(module)
        self.resized(block, kind, int(keep.numel()))

    def unread_units(self, block: nn.Module, group: UnitGroup) -> torch.Tensor:
        """``[count]`` bool: units that nothing reads, every input column they own in a linear being zero (a family
        where a unit also reaches the output another way says so: Mamba-2's heads count in their group's norm).
        Used by :func:`models.shrink.silent_units`."""
        unread = torch.ones(group.count, dtype=torch.bool)
        for path, (axis, index) in group.owned.items():
            param = block.get_parameter(path)
            if axis == 1 and param.dim() == 2:  # a linear reads the units' values through these columns
                cols = param.detach()[:, index.reshape(-1).to(param.device)].view(param.shape[0], *index.shape)
                unread &= cols.eq(0).all(0).all(-1).cpu()
        return unread

    def zero_output_units(self, block: nn.Module, group: UnitGroup) -> torch.Tensor:
        """``[count]`` bool: units whose output is zero whatever the input, by the family's own rules (e.g. an
        MLP neuron whose input row and bias are zero, under an activation with ``act(0) = 0``); here: none.
        Used by :func:`models.shrink.silent_units`."""
        return torch.zeros(group.count, dtype=torch.bool)

    def repair_keep(self, block: nn.Module, group: UnitGroup, keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """A keep mask for ``group`` that the family can realize, as close as possible to ``keep`` (the
        units with the highest ``scores`` win where a rule forces a change); here: ``keep`` as it is."""
        return keep

    def default_keep(self, block: nn.Module, group: UnitGroup, count: int) -> torch.Tensor:
        """Which ``count`` units a reloaded checkpoint keeps (only the shapes matter: weights are loaded after)."""
        return torch.arange(count)

    def restructure(self, block: nn.Module, counts: dict[str, int]) -> None:
        """Shrink a freshly built block to ``counts`` units per kind (the loader of pruned checkpoints)."""
        for kind in [g.kind for g in self.unit_groups(block)]:  # coarse first: a refinement counts inside them
            current = self.unit_group(block, kind)  # as the block is after the removals before it
            if kind in counts and counts[kind] != current.count:
                self.remove_units(block, kind, self.default_keep(block, current, counts[kind]))

    def resized(self, block: nn.Module, kind: str, count: int) -> None:  # noqa: B027 (an optional hook)
        """Family hook: update per-layer size attributes after ``kind`` now has ``count`` units."""

    def config_update(self, blocks: list[dict[str, int]]) -> dict | None:
        """Config fields that make a fresh model of this family have the unit counts ``blocks`` (one dict per block,
        :meth:`block_counts`), or None where its config cannot express them: here, every block alike
        (:meth:`config_for_counts`)."""
        return self.config_for_counts(blocks[0]) if all(c == blocks[0] for c in blocks) else None

    def config_for_counts(self, counts: dict[str, int]) -> dict | None:
        """Config fields that make a fresh model of this family have ``counts`` units in every block,
        or None where the family's config cannot express it (then only the PruneLab loader reloads)."""
        return None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output (final norm, projections, LM head)."""
        for module in self.post_block_modules():
            hidden = module(hidden)
        return hidden


def _sync_sizes(module: nn.Module) -> None:
    """Make a linear's / convolution's size attributes agree with its (cut) parameters."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv1d):
        channels = module.weight.shape[0]
        depthwise = module.groups == module.in_channels
        module.out_channels = channels
        if depthwise:
            module.in_channels = module.groups = channels


def even_keep(keep: torch.Tensor, scores: torch.Tensor, groups: int) -> torch.Tensor:
    """A keep mask over units in ``groups`` equal consecutive groups (query heads of KV groups, Mamba-2 heads of B/C
    groups) in which every group keeps the same number: the total ``keep`` allocates spread evenly (nearest, ties
    keep more; at least one), each group's highest ``scores``."""
    per = keep.numel() // groups
    kept = min(per, max(1, math.floor(int(keep.sum()) / groups + 0.5)))
    best = torch.argsort(scores.view(groups, per).double(), dim=1, descending=True, stable=True)[:, :kept]
    fixed = torch.zeros(groups, per, dtype=torch.bool)
    fixed.scatter_(1, best, True)
    return fixed.view(-1)


def even_first(units: int, groups: int, count: int) -> torch.Tensor:
    """The first ``count / groups`` units of each of ``groups`` equal consecutive groups (a reloaded checkpoint's
    shapes)."""
    per, kept = units // groups, count // groups
    return (torch.arange(groups).unsqueeze(1) * per + torch.arange(kept)).reshape(-1)


def check_even(keep: torch.Tensor, units: int, groups: int, what: str) -> None:
    """ValueError unless the kept unit indices ``keep`` fall equally into ``groups`` equal consecutive groups."""
    per_group = torch.bincount(keep // (units // groups), minlength=groups)
    if len(set(per_group.tolist())) != 1:
        raise ValueError(f"{what}; got {per_group.tolist()}")


def causal_softmax(scores: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Softmax over the last dimension in fp32 with every key after the query masked (unpadded windows), and with
    a sliding ``window``, every key ``window`` or more positions before it (query i reads keys i - window < j <= i,
    as transformers' sliding-window masks)."""
    s = scores.shape[-1]
    masked = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1)
    if window is not None:
        masked |= torch.ones(s, s, dtype=torch.bool, device=scores.device).tril(-window)
    return torch.softmax(scores.float().masked_fill(masked, float("-inf")), dim=-1)


def zero_rows(linear: nn.Linear, index: torch.Tensor) -> torch.Tensor:
    """``[count]`` bool: for each unit's output rows ``index[u]`` of ``linear``, whether they (and their bias
    entries) are all zero, so that the unit's slice of the output is zero for every input."""
    rows = index.to(linear.weight.device)
    zero = linear.weight.detach()[rows.reshape(-1)].view(*rows.shape, -1).eq(0).all(-1).all(-1)
    if linear.bias is not None:
        zero &= linear.bias.detach()[rows].eq(0).all(-1)
    return zero.cpu()


def maps_zero_to_zero(activation) -> bool:
    """``activation(0) == 0`` (ReLU, GELU, SiLU: a zero pre-activation stays zero)."""
    return bool(activation(torch.zeros(1)).eq(0).all())


def add_bias(linear: nn.Linear) -> torch.Tensor:
    """The linear's bias, created as zeros first where it has none (FLAP's bias compensation)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
        linear.prunelab_added_bias = True  # a fresh model of this config has none: the checkpoint says so
    return linear.bias
