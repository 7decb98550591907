"""Mamba-2 (``Mamba2ForCausalLM``; docs/architecture.md §2.1): each block is ``x + mixer(norm(x))``; the mixer's
linears are ``in_proj`` (d -> the gate z, the x / B / C channels of the convolution, and one dt per head) and
``out_proj`` (d_inner -> d), both called as modules on the path that runs on a CPU or without the fused kernels
(transformers' ``torch_forward``; in eval mode the fused training kernel is not used). ``conv1d``, ``dt_bias``,
``A_log``, ``D`` and the gated norm are per channel / per head and are not pruned.

Unstructured and N:M sparsity only. Heads are not structural units yet: the gated RMSNorm normalises over groups
of ``d_inner / n_groups`` channels, so removing a head's channels changes the mean square the other heads of its
group are divided by; removal would not equal zeroing (the contract every family keeps) without a per-layer epsilon
that a Mamba-2 config cannot store. Structured sparsity on Mamba-2 is refused before work.
"""

from __future__ import annotations

from .base import Adapter, LinearGroup, Tap


class Mamba2Adapter(Adapter):
    family = "mamba2"
    unit_scope = "mixer"
    model_types = ("mamba2",)
    has_units = False

    def blocks(self):
        return self.model.backbone.layers

    def pre_block_modules(self):
        return [self.model.backbone.embeddings]

    def post_block_modules(self):
        return [self.model.backbone.norm_f, self.model.lm_head]

    def linear_groups(self, block):
        return [LinearGroup(("mixer.in_proj",), Tap("mixer.in_proj")),
                LinearGroup(("mixer.out_proj",), Tap("mixer.out_proj"))]

    def unit_groups(self, block):
        return []
