"""Mamba-2 (``Mamba2ForCausalLM``; docs/architecture.md §2.1): each block is ``x + mixer(norm(x))``; the mixer's
linears are ``in_proj`` (d -> the gate z, the x / B / C channels of the convolution, and one dt per head) and
``out_proj`` (d_inner -> d), both called as modules on the path that runs on a CPU or without the fused kernels
(transformers' ``torch_forward``; in eval mode the fused training kernel is not used). ``conv1d``, ``dt_bias``,
``A_log``, ``D`` and the gated norm are per channel / per head and are not pruned by the unstructured methods.

Structural units (docs/methods.md §1.4), the analogue of GQA's: a **B/C group** (``mamba2_group``: its B and C
state channels and the heads that read them) and, inside the groups, **heads** (``mamba2_head``: ``head_dim``
channels of z, x, the convolution, the gated norm and ``out_proj``'s columns, with its dt row, ``dt_bias``,
``A_log`` and ``D``). The default unit is the group, heads with ``pruner.attention_unit=query_head``; where a model
has one group (most Mamba-2 checkpoints), the heads are the units.

The gated RMSNorm normalises over each group's ``G`` channels: a removed head no longer counts in its group's mean
square. A zeroed head (z rows zero: ``silu(0) = 0``) adds nothing to the sum but still counts in ``G``, so removing
``k`` channels of every group and then

    eps' = eps · G / (G - k),   w' = w · sqrt(G / (G - k))

gives the same outputs as zeroing them: ``rsqrt(s / G + eps) = sqrt(G / G') · rsqrt(s / G' + eps')``. Every group
loses the same number of heads (the norm has one eps), as query heads per KV group under GQA. Older transformers
(4.57 and 5.0 checked; 5.25 normalises per group) normalise over all ``d_inner`` channels whatever ``n_groups`` (a
norm without ``group_size``): there ``G`` is ``d_inner``, a removed B/C group counts in it as a removed head does,
and neither is silent while its gate rows are not zero (:func:`whole_width_norm`). The eps is a
per-layer attribute the Mamba-2 config cannot store: a pruned Mamba-2 reloads through ``models.load_pruned``, which
recomputes it from the config's eps and the kept counts.
"""

from __future__ import annotations

import math

import torch

from .base import (
    Adapter,
    LinearGroup,
    Tap,
    UnitGroup,
    _contiguous,
    check_even,
    even_first,
    even_keep,
    zero_rows,
)


def whole_width_norm(mixer) -> bool:
    """The mixer's gated norm normalises over all of its channels (older transformers, 4.57 and 5.0 among them: no
    ``group_size``), not over each B/C group's."""
    return not hasattr(mixer.norm, "group_size")


class Mamba2Adapter(Adapter):
    family = "mamba2"
    unit_scope = "mixer"
    model_types = ("mamba2",)

    def blocks(self):
        return self.model.backbone.layers

    def pre_block_modules(self):
        return [self.model.backbone.embeddings]

    def post_block_modules(self):
        return [self.model.backbone.norm_f, self.model.lm_head]

    def linear_groups(self, block):
        return [LinearGroup(("mixer.in_proj",), Tap("mixer.in_proj")),
                LinearGroup(("mixer.out_proj",), Tap("mixer.out_proj"))]

    # --- structure ---------------------------------------------------------------------------------------------
    @staticmethod
    def layout(block) -> tuple[int, int, int, int]:
        """``(heads, head_dim, groups, state_size)`` of the block as it is now."""
        mixer = block.mixer
        return mixer.dt_bias.shape[0], mixer.head_dim, mixer.n_groups, mixer.ssm_state_size

    def unit_groups(self, block):
        heads, P, groups, N = self.layout(block)
        d_inner = heads * P
        channels = _contiguous(heads, P)  # head h's channels of z, x, the norm, out_proj's input
        dt = 2 * d_inner + 2 * groups * N + torch.arange(heads)[:, None]  # in_proj rows: z | x | B | C | dt
        own = torch.arange(heads)[:, None]
        head_in = torch.cat([channels, channels + d_inner, dt], dim=1)
        head_owned = {"mixer.in_proj.weight": (0, head_in), "mixer.conv1d.weight": (0, channels),
                      "mixer.dt_bias": (0, own), "mixer.A_log": (0, own), "mixer.D": (0, own),
                      "mixer.norm.weight": (0, channels), "mixer.out_proj.weight": (1, channels)}
        self._with_biases(block, head_owned, head_in, channels)
        if self.config.n_groups == 1:  # one B/C group: the heads are the units (a model with more keeps the group
            # units when a block is down to one)
            return [UnitGroup("mamba2_head", heads, head_owned, reader="mixer.out_proj")]
        per = heads // groups
        state = _contiguous(groups, N)
        bc_conv = torch.cat([state + d_inner, state + d_inner + groups * N], dim=1)  # conv channels: x | B | C
        group_in = torch.cat([head_in.view(groups, per * head_in.shape[1]), bc_conv + d_inner], dim=1)
        group_conv = torch.cat([channels.view(groups, per * P), bc_conv], dim=1)
        group_owned = {path: (axis, index.reshape(groups, -1)) for path, (axis, index) in head_owned.items()}
        group_owned["mixer.in_proj.weight"] = (0, group_in)
        group_owned["mixer.conv1d.weight"] = (0, group_conv)
        self._with_biases(block, group_owned, group_in, group_conv)
        return [UnitGroup("mamba2_group", groups, group_owned, reader="mixer.out_proj"),
                UnitGroup("mamba2_head", heads, head_owned, reader="mixer.out_proj", refines="mamba2_group")]

    @staticmethod
    def _with_biases(block, owned: dict, in_rows: torch.Tensor, conv: torch.Tensor) -> None:
        if block.mixer.in_proj.bias is not None:
            owned["mixer.in_proj.bias"] = (0, in_rows)
        if block.mixer.conv1d.bias is not None:
            owned["mixer.conv1d.bias"] = (0, conv)

    def unread_units(self, block, group):
        """A head whose ``out_proj`` columns are zero still counts in its group's norm: only a zero output (below)
        makes it silent. A whole group is normalised alone: unread is enough (not under a whole-width norm, where
        its channels count in every channel's mean square)."""
        if group.kind == "mamba2_head" or whole_width_norm(block.mixer):
            return torch.zeros(group.count, dtype=torch.bool)
        return super().unread_units(block, group)

    def zero_output_units(self, block, group):
        """Units whose gate rows z (and biases) are zero: ``y · silu(0) = 0`` before the norm, whatever the input."""
        heads, P, groups, _ = self.layout(block)
        z_rows = _contiguous(group.count, heads * P // group.count)
        return zero_rows(block.mixer.in_proj, z_rows)

    def check_removal(self, block, group, keep):
        super().check_removal(block, group, keep)
        if group.kind == "mamba2_head":
            heads, _, groups, _ = self.layout(block)
            check_even(keep, heads, groups, "Mamba-2 heads kept per B/C group must be equal (the gated norm has one "
                                            "eps per layer)")

    def repair_keep(self, block, group, keep, scores):
        return even_keep(keep, scores, self.layout(block)[2]) if group.kind == "mamba2_head" else keep

    def default_keep(self, block, group, count):
        if group.kind == "mamba2_head":  # the first count / groups heads of every group
            heads, _, groups, _ = self.layout(block)
            return even_first(heads, groups, count)
        return super().default_keep(block, group, count)

    def resized(self, block, kind, count):
        mixer = block.mixer
        heads, P, _, N = self.layout(block)
        groups = (mixer.conv1d.weight.shape[0] - heads * P) // (2 * N)
        whole = whole_width_norm(mixer)  # (the channels one mean square spans: a group's, or all of them)
        before = mixer.intermediate_size if whole else mixer.norm.group_size
        after = heads * P if whole else heads * P // groups
        mixer.num_heads, mixer.n_groups, mixer.intermediate_size = heads, groups, heads * P
        mixer.conv_dim = mixer.conv1d.weight.shape[0]
        if after != before:  # the norm's mean over fewer channels: eps' and w' keep every output (docstring)
            mixer.norm.weight.data.mul_(math.sqrt(before / after))
            first = int(self.config.expand * self.config.hidden_size) // (1 if whole else self.config.n_groups)
            mixer.norm.variance_epsilon = self.config.layer_norm_epsilon * first / after
            if not whole:
                mixer.norm.group_size = after
