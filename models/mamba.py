"""Mamba v1 (``MambaForCausalLM``): each block is ``x + mixer(norm(x))``.

The mixer's linears: ``in_proj`` (d -> 2*d_inner: x and gate z), ``x_proj`` (d_inner -> dt_rank +
2*d_state), ``dt_proj`` (dt_rank -> d_inner, bias added inside the scan) and ``out_proj`` (d_inner
-> d). ``conv1d`` (depthwise), ``A_log`` and ``D`` are per-channel and are not pruned.

Statistics are taken on the path that runs: transformers applies ``dt_proj.weight`` functionally
(``dt_proj.weight @ time_step``), so a hook on ``dt_proj`` never fires; its input is the first
``dt_rank`` features of ``x_proj``'s output, which is where we tap it, and the gradient taps read its
output off that product (``applied_weights``). The fused CUDA kernels
(mamba_ssm) likewise take weights directly; taps on in_proj / x_proj / out_proj see the real inputs.
"""

from __future__ import annotations

import torch

from .base import Adapter, LinearGroup, Tap, UnitGroup, _contiguous


class MambaAdapter(Adapter):
    family = "mamba"
    unit_scope = "mixer"
    model_types = ("mamba",)

    def blocks(self):
        return self.model.backbone.layers

    def pre_block_modules(self):
        return [self.model.backbone.embeddings]

    def post_block_modules(self):
        return [self.model.backbone.norm_f, self.model.lm_head]

    def linear_groups(self, block):
        dt_rank = block.mixer.dt_proj.in_features
        return [
            LinearGroup(("mixer.in_proj",), Tap("mixer.in_proj")),
            LinearGroup(("mixer.x_proj",), Tap("mixer.x_proj")),
            LinearGroup(("mixer.dt_proj",), Tap("mixer.x_proj", where="output", narrow=(0, dt_rank))),
            LinearGroup(("mixer.out_proj",), Tap("mixer.out_proj")),
        ]

    def applied_weights(self, block):
        return ("mixer.dt_proj",)  # time_step = dt_proj.weight @ time_step^T (the bias is added inside the scan)

    def unit_groups(self, block):
        mixer = block.mixer
        d_inner = mixer.out_proj.in_features
        ch = _contiguous(d_inner, 1)
        both_halves = torch.cat([ch, ch + d_inner], dim=1)  # x half and gate half of in_proj
        owned = {
            "mixer.in_proj.weight": (0, both_halves),
            "mixer.conv1d.weight": (0, ch),
            "mixer.x_proj.weight": (1, ch),
            "mixer.dt_proj.weight": (0, ch),
            "mixer.A_log": (0, ch),
            "mixer.D": (0, ch),
            "mixer.out_proj.weight": (1, ch),
        }
        for path, index in (("mixer.in_proj.bias", both_halves), ("mixer.conv1d.bias", ch), ("mixer.dt_proj.bias", ch)):
            module, _, name = path.rpartition(".")
            if getattr(block.get_submodule(module), name, None) is not None:
                owned[path] = (0, index)
        return [UnitGroup("mamba_channel", d_inner, owned, reader="mixer.out_proj")]

    def resized(self, block, kind, count):
        block.mixer.intermediate_size = count
    # config_for_counts: MambaConfig derives intermediate_size = int(expand * hidden_size) (expand an int),
    # so a pruned Mamba reloads through models.load_pruned only
