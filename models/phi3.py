"""Phi-3 (``Phi3ForCausalLM``: Phi-3 / Phi-3.5 mini and medium): LLaMA-like, with a fused ``qkv_proj`` (rows: every
query head, then every key head, then every value head) and a fused ``gate_up_proj`` (rows: the gate of every neuron,
then its up projection; ``down(up * silu(gate))``), so a unit owns non-contiguous rows.

The attention forward reads the query width from ``config.num_attention_heads``, a config every layer shares: a layer
whose heads were removed gets a copy of its own (:meth:`Phi3Adapter.resized`), so layers can differ.
"""

from __future__ import annotations

import copy

import torch

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


class Phi3Adapter(Adapter):
    family = "phi3"
    model_types = ("phi3",)

    def blocks(self):
        return self.model.model.layers

    def pre_block_modules(self):
        inner = self.model.model
        return [inner.embed_tokens, inner.rotary_emb]

    def post_block_modules(self):
        return [self.model.model.norm, self.model.lm_head]

    def linear_groups(self, block):
        return [
            LinearGroup(("self_attn.qkv_proj",), Tap("self_attn.qkv_proj")),
            LinearGroup(("self_attn.o_proj",), Tap("self_attn.o_proj")),
            LinearGroup(("mlp.gate_up_proj",), Tap("mlp.gate_up_proj")),
            LinearGroup(("mlp.down_proj",), Tap("mlp.down_proj")),
        ]

    def head_layout(self, block) -> tuple[int, int, int]:
        """(query heads, key / value heads, head dim) of ``block`` as it is now."""
        attn = block.self_attn
        d = attn.head_dim
        heads = attn.o_proj.in_features // d
        return heads, (attn.qkv_proj.out_features // d - heads) // 2, d

    def unit_groups(self, block):
        heads, kv_heads, d = self.head_layout(block)
        rep = heads // kv_heads
        q_rows = _contiguous(kv_heads, rep * d)  # group g: its rep query heads
        qkv = torch.cat([q_rows, _contiguous(kv_heads, d, heads * d), _contiguous(kv_heads, d, (heads + kv_heads) * d)],
                        dim=1)
        inter = block.mlp.down_proj.in_features
        neurons = _contiguous(inter, 1)
        return [UnitGroup("kv_group", kv_heads, {"self_attn.qkv_proj.weight": (0, qkv), "self_attn.o_proj.weight":
                                                 (1, q_rows)}, reader="self_attn.o_proj", attention=True),
                UnitGroup("mlp_neuron", inter, {"mlp.gate_up_proj.weight": (0, torch.cat([neurons, neurons + inter], 1)),
                                                "mlp.down_proj.weight": (1, neurons)}, reader="mlp.down_proj")]

    def resized(self, block, kind, count):
        if kind == "kv_group":  # the layer's own config: the forward splits qkv at config.num_attention_heads
            heads, kv_heads, _ = self.head_layout(block)
            attn = block.self_attn
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv_heads
            attn.num_key_value_heads, attn.num_key_value_groups = kv_heads, heads // kv_heads

    def query_key(self, block):
        """The fused ``qkv_proj`` for both: :meth:`attention_probabilities` splits its output."""
        return "self_attn.qkv_proj", "self_attn.qkv_proj"

    def attention_probabilities(self, block, q, k, kwargs):
        from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

        heads, kv_heads, d = self.head_layout(block)
        b, s, _ = q.shape
        queries, keys, _ = q.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        queries = queries.reshape(b, s, heads, d).transpose(1, 2)
        keys = keys.reshape(b, s, kv_heads, d).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        queries, keys = apply_rotary_pos_emb(queries, keys, cos.float(), sin.float())  # (partial rotary as Phi-3)
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        return causal_softmax(queries @ keys.transpose(-1, -2) * block.self_attn.scaling)

    def zero_output_units(self, block, group):
        """A KV group whose value rows are zero; a neuron whose up row is zero, or whose gate row is zero under an
        activation with act(0) = 0."""
        if group.kind == "kv_group":
            heads, kv_heads, d = self.head_layout(block)
            return zero_rows(block.self_attn.qkv_proj, _contiguous(kv_heads, d, (heads + kv_heads) * d))
        if group.kind == "mlp_neuron":
            inter = group.count
            zero = zero_rows(block.mlp.gate_up_proj, _contiguous(inter, 1, inter))
            if maps_zero_to_zero(block.mlp.activation_fn):
                zero |= zero_rows(block.mlp.gate_up_proj, _contiguous(inter, 1))
            return zero
        return super().zero_output_units(block, group)

    def config_for_counts(self, counts):
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        d = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        return {"num_attention_heads": counts["kv_group"] * rep, "num_key_value_heads": counts["kv_group"],
                "head_dim": d, "intermediate_size": counts["mlp_neuron"]}
