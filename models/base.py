"""The adapter interface: the one place that knows an architecture (DESIGN.md, "Model adapters").

Pruners and evaluators talk to a model only through an :class:`Adapter`: its blocks, how to call a
block alone, the prunable linears grouped by shared input, where each group's input is observed,
and the structural units (heads, KV groups, MLP neurons, Mamba channels) with the rows and columns
they own.
"""

from __future__ import annotations

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


@dataclass
class UnitGroup:
    """A family of structural units of one block and the slices of parameters each unit owns.

    ``owned[param_path] = (axis, index)`` where ``index`` has shape ``[count, width]``: unit ``u``
    owns ``param.index_select(axis, index[u])``. Axis 0 of a linear weight is its output rows,
    axis 1 its input columns. Removing unit ``u`` means deleting those slices everywhere.
    """

    kind: str
    count: int
    owned: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)

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


class Adapter:
    """Base class; one subclass per model family (registered in :mod:`models.registry`)."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF ``config.model_type`` values this adapter handles

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- structure -----------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def pre_block_modules(self) -> list[nn.Module]:
        """Modules that run before block 0 (embeddings, positions, rotary): moved to the device for capture."""
        raise NotImplementedError

    def post_block_modules(self) -> list[nn.Module]:
        """Modules that run after the last block, in order, ending with the LM head."""
        raise NotImplementedError

    def linear_groups(self, block: nn.Module) -> list[LinearGroup]:
        """Prunable linears of a block, grouped by shared input, in forward order."""
        raise NotImplementedError

    def unit_groups(self, block: nn.Module) -> list[UnitGroup]:
        """Structural units of a block (heads / KV groups, MLP neurons, Mamba inner channels)."""
        raise NotImplementedError

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

    def call_block(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run one block alone with the kwargs captured at block 0 (transformers 4 returns tuples, 5 tensors)."""
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output (final norm, projections, LM head)."""
        for module in self.post_block_modules():
            hidden = module(hidden)
        return hidden
