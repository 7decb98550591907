"""OPT (``OPTForCausalLM``): pre-LN decoder, ReLU MLP, learned positions, biases everywhere."""

from __future__ import annotations

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


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)

    @property
    def _decoder(self):
        return self.model.model.decoder

    def blocks(self):
        return self._decoder.layers

    def pre_block_modules(self):
        d = self._decoder
        return [m for m in (d.embed_tokens, d.embed_positions, d.project_in) if m is not None]

    def post_block_modules(self):
        d = self._decoder
        return [m for m in (d.final_layer_norm, d.project_out) if m is not None] + [self.model.lm_head]

    def linear_groups(self, block):
        return [
            LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), Tap("self_attn.q_proj")),
            LinearGroup(("self_attn.out_proj",), Tap("self_attn.out_proj")),
            LinearGroup(("fc1",), Tap("fc1")),
            LinearGroup(("fc2",), Tap("fc2")),
        ]

    def query_key(self, block):
        return "self_attn.q_proj", "self_attn.k_proj"

    def attention_probabilities(self, block, q, k, kwargs):
        attn = block.self_attn
        head_dim = attn.head_dim
        b, s, _ = q.shape
        heads = q.shape[-1] // head_dim
        q = q.float().view(b, s, heads, head_dim).transpose(1, 2)
        k = k.float().view(b, s, heads, head_dim).transpose(1, 2)
        return causal_softmax(q @ k.transpose(-1, -2) * attn.scaling)

    def unit_groups(self, block):
        attn = block.self_attn
        head_dim = attn.head_dim
        heads = attn.q_proj.out_features // head_dim  # as the block is now (after any head removal)
        rows = _contiguous(heads, head_dim)
        head_owned = {}
        for proj in ("q_proj", "k_proj", "v_proj"):
            head_owned[f"self_attn.{proj}.weight"] = (0, rows)
            if getattr(attn, proj).bias is not None:
                head_owned[f"self_attn.{proj}.bias"] = (0, rows)
        head_owned["self_attn.out_proj.weight"] = (1, rows)
        ffn = block.fc1.out_features
        neurons = _contiguous(ffn, 1)
        neuron_owned = {"fc1.weight": (0, neurons), "fc2.weight": (1, neurons)}
        if block.fc1.bias is not None:
            neuron_owned["fc1.bias"] = (0, neurons)
        return [UnitGroup("attention_head", heads, head_owned, reader="self_attn.out_proj", attention=True),
                UnitGroup("mlp_neuron", ffn, neuron_owned, reader="fc2")]

    def zero_output_units(self, block, group):
        """A head whose value rows (and biases) are zero puts out zero (its softmax mixes zeros); a neuron whose
        fc1 row and bias are zero, under an activation with act(0) = 0."""
        if group.kind == "attention_head":
            return zero_rows(block.self_attn.v_proj, group.owned["self_attn.v_proj.weight"][1])
        if group.kind == "mlp_neuron" and maps_zero_to_zero(block.activation_fn):
            return zero_rows(block.fc1, group.owned["fc1.weight"][1])
        return super().zero_output_units(block, group)

    def resized(self, block, kind, count):
        if kind == "attention_head":  # OPTAttention reshapes with num_heads
            block.self_attn.num_heads = count

    def config_for_counts(self, counts):
        # OPTConfig derives head_dim = hidden_size / num_attention_heads: fewer heads are not expressible
        if counts["attention_head"] != self.config.num_attention_heads:
            return None
        return {"ffn_dim": counts["mlp_neuron"]}
