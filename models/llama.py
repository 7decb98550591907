"""LLaMA-style decoders (LLaMA 1/2/3, Mistral, and other ``*ForCausalLM`` with the same layout).

RMSNorm, rotary positions (position embeddings computed once by the model and passed to every
layer), SwiGLU MLP ``down(silu(gate x) * up x)``, grouped-query attention: ``num_key_value_heads``
KV heads, each shared by ``num_attention_heads / num_key_value_heads`` query heads.
"""

from __future__ import annotations

import torch

from .base import Adapter, LinearGroup, Tap, UnitGroup, _contiguous


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral")

    def blocks(self):
        return self.model.model.layers

    def pre_block_modules(self):
        inner = self.model.model
        return [inner.embed_tokens] + ([inner.rotary_emb] if hasattr(inner, "rotary_emb") else [])

    def post_block_modules(self):
        return [self.model.model.norm, self.model.lm_head]

    def linear_groups(self, block):
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), Tap("self_attn.q_proj")),
            LinearGroup(("self_attn.o_proj",), Tap("self_attn.o_proj")),
            LinearGroup(("mlp.gate_proj", "mlp.up_proj"), Tap("mlp.gate_proj")),
            LinearGroup(("mlp.down_proj",), Tap("mlp.down_proj")),
        ]

    def head_layout(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        cfg = self.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv_heads, head_dim

    def unit_groups(self, block):
        heads, kv_heads, head_dim = self.head_layout()
        rep = heads // kv_heads
        attn = block.self_attn
        q_rows = _contiguous(heads, head_dim)  # query head h
        kv_rows = _contiguous(kv_heads, head_dim)  # kv head g
        # a KV group owns its KV head and the `rep` query heads that read it
        group_q_rows = q_rows.view(kv_heads, rep * head_dim)

        def with_bias(owned: dict, proj: str, index: torch.Tensor) -> None:
            owned[f"self_attn.{proj}.weight"] = (0, index)
            if getattr(attn, proj).bias is not None:
                owned[f"self_attn.{proj}.bias"] = (0, index)

        kv_owned: dict = {}
        with_bias(kv_owned, "q_proj", group_q_rows)
        with_bias(kv_owned, "k_proj", kv_rows)
        with_bias(kv_owned, "v_proj", kv_rows)
        kv_owned["self_attn.o_proj.weight"] = (1, group_q_rows)
        groups = [UnitGroup("kv_group", kv_heads, kv_owned)]
        if rep > 1:
            # query heads inside their groups (removal must keep every group non-empty; structured issue)
            q_owned: dict = {}
            with_bias(q_owned, "q_proj", q_rows)
            q_owned["self_attn.o_proj.weight"] = (1, q_rows)
            groups.append(UnitGroup("query_head", heads, q_owned))
        inter = block.mlp.gate_proj.out_features
        neurons = _contiguous(inter, 1)
        groups.append(UnitGroup("mlp_neuron", inter, {
            "mlp.gate_proj.weight": (0, neurons), "mlp.up_proj.weight": (0, neurons), "mlp.down_proj.weight": (1, neurons),
        }))
        return groups
