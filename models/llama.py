"""LLaMA-style decoders (LLaMA 1/2/3, Mistral, Qwen2 / Qwen2.5, and other ``*ForCausalLM`` with the same layout).

RMSNorm, rotary positions (position embeddings computed once by the model and passed to every
layer), SwiGLU MLP ``down(silu(gate x) * up x)``, grouped-query attention: ``num_key_value_heads``
KV heads, each shared by ``num_attention_heads / num_key_value_heads`` query heads.
"""

from __future__ import annotations

import torch

from .base import (
    Adapter,
    LinearGroup,
    Tap,
    UnitGroup,
    _contiguous,
    causal_softmax,
    check_even,
    even_first,
    even_keep,
    maps_zero_to_zero,
    zero_rows,
)


class LlamaAdapter(Adapter):
    family = "llama"
    # Qwen2 / Qwen2.5: LLaMA's layout with q/k/v biases; Qwen3: with q_norm / k_norm over each head's dimensions
    # (one weight shared by every head: nothing to cut when heads go)
    model_types = ("llama", "mistral", "qwen2", "qwen3")

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

    def head_layout(self, block=None) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim): of ``block`` as it is now (after any head removal),
        or of the config."""
        if block is not None:
            attn = block.self_attn
            head_dim = attn.head_dim
            return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim
        cfg = self.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return heads, kv_heads, head_dim

    def unit_groups(self, block):
        groups = self.attention_unit_groups(block)
        inter = block.mlp.gate_proj.out_features
        neurons = _contiguous(inter, 1)
        owned = {"mlp.gate_proj.weight": (0, neurons), "mlp.up_proj.weight": (0, neurons),
                 "mlp.down_proj.weight": (1, neurons)}
        for proj in ("gate_proj", "up_proj"):
            if getattr(block.mlp, proj).bias is not None:
                owned[f"mlp.{proj}.bias"] = (0, neurons)
        groups.append(UnitGroup("mlp_neuron", inter, owned, reader="mlp.down_proj"))
        return groups

    def attention_unit_groups(self, block):
        """KV groups (and, under GQA, query heads inside them)."""
        heads, kv_heads, head_dim = self.head_layout(block)
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
        groups = [UnitGroup("kv_group", kv_heads, kv_owned, reader="self_attn.o_proj", attention=True)]
        if rep > 1 or self.head_layout()[0] > self.head_layout()[1]:  # GQA (also once pruned to one per group)
            # query heads inside their groups: every group must keep the same number (check_removal)
            q_owned: dict = {}
            with_bias(q_owned, "q_proj", q_rows)
            q_owned["self_attn.o_proj.weight"] = (1, q_rows)
            groups.append(UnitGroup("query_head", heads, q_owned, reader="self_attn.o_proj", refines="kv_group",
                                    attention=True))
        return groups

    def block_kind(self, block):
        """The attention's layer type where the config mixes them (``config.layer_types``: Qwen2's, Gemma's
        sliding-window and full attention layers receive different masks); from the config where the attention does
        not say (Qwen2-MoE)."""
        attn = block.self_attn
        if hasattr(attn, "layer_type"):
            return attn.layer_type
        types, index = getattr(self.config, "layer_types", None), getattr(attn, "layer_idx", None)
        if types is not None and index is not None and len(set(types)) > 1:
            return types[index]
        return None

    def query_key(self, block):
        return "self_attn.q_proj", "self_attn.k_proj"

    def attention_window(self, block) -> int | None:
        """The layer's sliding window: its own (Qwen2, Gemma), else none where the config's ``layer_types`` make it a
        full-attention layer (Qwen2-MoE sets a window on its sliding layers only), else the model's (Mistral: every
        layer); 0 or None: no window."""
        attn = block.self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window or None
        types, index = getattr(self.config, "layer_types", None), getattr(attn, "layer_idx", None)
        if types is not None and index is not None and types[index] != "sliding_attention":
            return None
        return getattr(self.config, "sliding_window", None) or None

    def attention_probabilities(self, block, q, k, kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        kwargs = self.block_kwargs(block, kwargs)
        heads, kv_heads, head_dim = self.head_layout(block)
        b, s, _ = q.shape
        q = q.view(b, s, heads, head_dim)
        k = k.view(b, s, kv_heads, head_dim)
        attn = block.self_attn
        if hasattr(attn, "q_norm"):  # Qwen3: an RMSNorm over each head's dimensions (shared by the heads)
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())  # (fp32: JS compares rows)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (each query head reads its group's key)
        scores = q @ k.transpose(-1, -2) * attn.scaling
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap is not None:  # Gemma-2: cap * tanh(scores / cap)
            scores = torch.tanh(scores / cap) * cap
        return causal_softmax(scores, self.attention_window(block))

    def zero_output_units(self, block, group):
        """A KV group whose value rows (and biases) are zero puts out zero in every query head that reads it; a
        neuron whose up row is zero, or whose gate row is zero under an activation with act(0) = 0."""
        if group.kind == "kv_group":
            return zero_rows(block.self_attn.v_proj, group.owned["self_attn.v_proj.weight"][1])
        if group.kind == "mlp_neuron":
            rows = group.owned["mlp.up_proj.weight"][1]
            zero = zero_rows(block.mlp.up_proj, rows)
            if maps_zero_to_zero(block.mlp.act_fn):
                zero |= zero_rows(block.mlp.gate_proj, group.owned["mlp.gate_proj.weight"][1])
            return zero
        return super().zero_output_units(block, group)

    def check_removal(self, block, group, keep):
        super().check_removal(block, group, keep)
        if group.kind == "query_head":
            heads, kv_heads, _ = self.head_layout(block)
            check_even(keep, heads, kv_heads, "query heads kept per KV group must be equal (repeat_kv shares each KV "
                                              "head with the same number of query heads)")

    def repair_keep(self, block, group, keep, scores):
        if group.kind != "query_head":
            return keep
        return even_keep(keep, scores, self.head_layout(block)[1])  # the allocated total, spread evenly

    def default_keep(self, block, group, count):
        if group.kind == "query_head":  # the first count / kv_heads query heads of every group
            heads, kv_heads, _ = self.head_layout(block)
            return even_first(heads, kv_heads, count)
        return super().default_keep(block, group, count)

    def resized(self, block, kind, count):
        if kind == "query_head":
            heads, kv_heads, _ = self.head_layout(block)
            block.self_attn.num_key_value_groups = heads // kv_heads
        elif kind == "mlp_neuron":
            block.mlp.intermediate_size = count

    def config_for_counts(self, counts):
        kv_heads = counts["kv_group"]
        heads = counts.get("query_head", kv_heads)  # no query_head group: one query head per KV head
        fields = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": self.head_layout()[2]}
        if "mlp_neuron" in counts:  # (MoE layers: no MLP neurons as units)
            fields["intermediate_size"] = counts["mlp_neuron"]
        return fields
