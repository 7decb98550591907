"""The adapter of LlamaGen image generators (:mod:`models.llamagen`; docs/imagegen.md §1).

Blocks are gpt-fast style: a fused ``attention.wqkv`` (rows: every query head, then every key head, then every value
head), ``attention.wo``, and a SwiGLU ``feed_forward`` (``w2(silu(w1 x) * w3 x)``). Structural units: key / value
groups (a KV head with the query heads that read it; one head each in LlamaGen's multi-head models) and MLP
neurons. Head counts are read off the weights by the model, so a block with units removed needs no attribute
updated; the rotary table is per head dimension, which removal never changes.
"""

from __future__ import annotations

import math

import torch

from . import llamagen  # noqa: F401 (registers model_type 'llamagen' with transformers' Auto classes)
from .base import Adapter, LinearGroup, Tap, UnitGroup, _contiguous, causal_softmax, zero_rows
from .llamagen import apply_rope


class LlamaGenAdapter(Adapter):
    family = "llamagen"
    model_types = ("llamagen",)
    modality = "image"

    def blocks(self):
        return self.model.layers

    def pre_block_modules(self):
        return [self.model.cls_embedding, self.model.tok_embeddings]

    def post_block_modules(self):
        return [self.model.norm, self.model.output]

    def linear_groups(self, block):
        return [
            LinearGroup(("attention.wqkv",), Tap("attention.wqkv")),
            LinearGroup(("attention.wo",), Tap("attention.wo")),
            LinearGroup(("feed_forward.w1", "feed_forward.w3"), Tap("feed_forward.w1")),
            LinearGroup(("feed_forward.w2",), Tap("feed_forward.w2")),
        ]

    def unit_groups(self, block):
        attn = block.attention
        heads, kv_heads = attn.heads()
        d = attn.head_dim
        rep = heads // kv_heads
        q_rows = _contiguous(kv_heads, rep * d)  # group g: its rep query heads
        k_rows = _contiguous(kv_heads, d, offset=heads * d)
        v_rows = _contiguous(kv_heads, d, offset=(heads + kv_heads) * d)
        group = {"attention.wqkv.weight": (0, torch.cat([q_rows, k_rows, v_rows], dim=1)),
                 "attention.wo.weight": (1, q_rows)}
        inter = block.feed_forward.w1.out_features
        neurons = _contiguous(inter, 1)
        mlp = {"feed_forward.w1.weight": (0, neurons), "feed_forward.w3.weight": (0, neurons),
               "feed_forward.w2.weight": (1, neurons)}
        return [UnitGroup("kv_group", kv_heads, group, reader="attention.wo", attention=True),
                UnitGroup("mlp_neuron", inter, mlp, reader="feed_forward.w2")]

    def query_key(self, block):
        """The fused ``wqkv`` for both: :meth:`attention_probabilities` splits its output into queries and keys."""
        return "attention.wqkv", "attention.wqkv"

    def attention_probabilities(self, block, q, k, kwargs):
        """Causal attention probabilities from ``wqkv``'s output (``q``; ``k`` is the same tensor): queries and keys
        split off, rotated by the 2-D rotary table the block was called with, scaled by ``1 / sqrt(head_dim)``."""
        attn = block.attention
        heads, kv_heads = attn.heads()
        d = attn.head_dim
        b, s, _ = q.shape
        queries, keys, _ = q.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        freqs = kwargs["freqs_cis"].float()
        queries = apply_rope(queries.reshape(b, s, heads, d), freqs).transpose(1, 2)
        keys = apply_rope(keys.reshape(b, s, kv_heads, d), freqs).transpose(1, 2)
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # (each query head reads its group's key)
        return causal_softmax(queries @ keys.transpose(-1, -2) / math.sqrt(d))

    def zero_output_units(self, block, group):
        """A KV group whose value rows are zero puts out zero; a neuron whose ``w3`` (up) row or ``w1`` (gate) row is
        zero (silu(0) = 0)."""
        if group.kind == "kv_group":
            attn = block.attention
            heads, kv_heads = attn.heads()
            d = attn.head_dim
            return zero_rows(attn.wqkv, _contiguous(kv_heads, d, offset=(heads + kv_heads) * d))
        if group.kind == "mlp_neuron":
            rows = group.owned["feed_forward.w1.weight"][1]
            return zero_rows(block.feed_forward.w3, rows) | zero_rows(block.feed_forward.w1, rows)
        return super().zero_output_units(block, group)

    def config_for_counts(self, counts):
        rep = self.config.n_head // self.config.n_kv_head
        kv = counts["kv_group"]
        return {"n_head": kv * rep, "n_kv_head": kv, "head_dim": self.config.head_dim,
                "intermediate_size": counts["mlp_neuron"]}
