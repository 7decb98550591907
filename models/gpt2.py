"""GPT-2 (``GPT2LMHeadModel``): pre-LN decoder, GELU MLP, learned positions, biases everywhere, tied LM head.

Its linears are transformers' ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]``, the transpose of
``nn.Linear``'s ``[out, in]``, and one fused ``c_attn`` puts out queries, keys and values side by side
(``[q | k | v]``, each ``n_embd`` wide, head ``h`` at ``[h·d, (h+1)·d)`` of each third).

The adapter turns every block's ``Conv1D`` into the ``nn.Linear`` that computes the same function (weight
transposed) as soon as it meets the model, so that every method, mask and statistic reads ``[out, in]`` weights
as it does for the other families; :meth:`GPT2Adapter.native_state` transposes them back in the state dict a
checkpoint is written from (and :meth:`GPT2Adapter.from_native_state` when one is read), so a saved model is an
ordinary GPT-2 checkpoint and no module is swapped after the first meeting (docs/architecture.md §2.1).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    Adapter,
    LinearGroup,
    Tap,
    UnitGroup,
    _contiguous,
    causal_softmax,
    maps_zero_to_zero,
    zero_rows,
)

_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a transformers ``Conv1D`` computes: weight ``[in, out]`` -> ``[out, in]``
    (same dtype and device; a new weight tensor, the bias's storage shared: the ``Conv1D`` is dropped after)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(conv.weight.data.t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.data, requires_grad=conv.bias.requires_grad)
    return linear


def _replace(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent), name, module)


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def __init__(self, model):
        super().__init__(model)
        if getattr(model.config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=true) is not a causal LM PruneLab prunes")
        self._to_linear()

    def _to_linear(self) -> None:
        for block in self.blocks():
            for path in _PROJECTIONS:
                module = block.get_submodule(path)
                if not isinstance(module, nn.Linear):
                    _replace(block, path, conv1d_as_linear(module))

    def _projection_weights(self) -> set[str]:
        prefix = self.blocks_prefix()
        return {f"{prefix}.{i}.{path}.weight" for i in range(len(self.blocks())) for path in _PROJECTIONS}

    def native_state(self, state):
        """GPT-2 checkpoints store the projections as ``Conv1D`` weights ``[in, out]``: transposed here."""
        names = self._projection_weights()
        return {k: (v.t().contiguous() if k in names else v) for k, v in state.items()}

    def from_native_state(self, state):
        return self.native_state(state)  # (a transpose is its own inverse)

    @property
    def _transformer(self):
        return self.model.transformer

    def blocks(self):
        return self._transformer.h

    def pre_block_modules(self):
        t = self._transformer
        return [t.wte, t.wpe]

    def post_block_modules(self):
        return [self._transformer.ln_f, self.model.lm_head]

    def linear_groups(self, block):
        return [
            LinearGroup(("attn.c_attn",), Tap("attn.c_attn")),
            LinearGroup(("attn.c_proj",), Tap("attn.c_proj")),
            LinearGroup(("mlp.c_fc",), Tap("mlp.c_fc")),
            LinearGroup(("mlp.c_proj",), Tap("mlp.c_proj")),
        ]

    def _heads(self, block) -> tuple[int, int]:
        """(heads, head dim) of ``block`` as it is now (after any head removal)."""
        attn = block.attn
        return attn.c_attn.out_features // (3 * attn.head_dim), attn.head_dim

    def query_key(self, block):
        # one fused projection: both are its output, attention_probabilities takes the thirds
        return "attn.c_attn", "attn.c_attn"

    def attention_probabilities(self, block, q, k, kwargs):
        heads, head_dim = self._heads(block)
        width = heads * head_dim
        b, s, _ = q.shape
        q = q[..., :width].float().reshape(b, s, heads, head_dim).transpose(1, 2)
        k = k[..., width : 2 * width].float().reshape(b, s, heads, head_dim).transpose(1, 2)
        return causal_softmax(q @ k.transpose(-1, -2) * block.attn.scaling)

    def unit_groups(self, block):
        heads, head_dim = self._heads(block)
        width = heads * head_dim
        # head h owns its query, key and value rows of the fused c_attn, and its columns of c_proj
        rows = _contiguous(heads, head_dim)
        fused = torch.cat([rows, rows + width, rows + 2 * width], dim=1)
        head_owned = {"attn.c_attn.weight": (0, fused), "attn.c_attn.bias": (0, fused), "attn.c_proj.weight": (1, rows)}
        inner = block.mlp.c_fc.out_features
        neurons = _contiguous(inner, 1)
        neuron_owned = {"mlp.c_fc.weight": (0, neurons), "mlp.c_fc.bias": (0, neurons), "mlp.c_proj.weight": (1, neurons)}
        return [UnitGroup("attention_head", heads, head_owned, reader="attn.c_proj", attention=True),
                UnitGroup("mlp_neuron", inner, neuron_owned, reader="mlp.c_proj")]

    def zero_output_units(self, block, group):
        """A head whose value rows and biases are zero puts out zero; a neuron whose c_fc row and bias are zero,
        under an activation with act(0) = 0 (GPT-2's GELU)."""
        if group.kind == "attention_head":
            heads, head_dim = self._heads(block)
            values = _contiguous(heads, head_dim, offset=2 * heads * head_dim)
            return zero_rows(block.attn.c_attn, values)
        if group.kind == "mlp_neuron" and maps_zero_to_zero(block.mlp.act):
            return zero_rows(block.mlp.c_fc, group.owned["mlp.c_fc.weight"][1])
        return super().zero_output_units(block, group)

    def resized(self, block, kind, count):
        if kind == "attention_head":  # GPT2Attention splits c_attn's output at split_size
            block.attn.num_heads = count
            block.attn.split_size = count * block.attn.head_dim

    def config_for_counts(self, counts):
        # GPT2Config derives head_dim = n_embd / n_head: fewer heads are not expressible
        if counts["attention_head"] != self.config.n_head:
            return None
        return {"n_inner": counts["mlp_neuron"]}
