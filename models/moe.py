"""Mixture-of-experts decoders with LLaMA's attention: Mixtral (``mixtral``), Qwen3-MoE (``qwen3_moe``) and Qwen2-MoE
(``qwen2_moe``: q/k/v biases, a shared expert beside the routed ones) (docs/architecture.md §2.1).

transformers 5 holds a layer's experts fused, as 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``,
``experts.down_proj`` ``[E, H, I]``), which no linear hook sees. When the adapter first meets the model it turns
each layer's experts into :class:`ExpertLinears`: one ``gate_proj`` / ``up_proj`` / ``down_proj`` ``nn.Linear``
per expert computing the same function (routing unchanged), so every method prunes an expert's linears like any
other, with statistics from the tokens the router sends to that expert (the hooks fire on those tokens only).
:meth:`MoEAdapter.native_state` writes them back fused, so a saved model is an ordinary checkpoint.

The router (a parameter of its own module, not a linear) stays dense, and so do Qwen2-MoE's shared expert and its
gate (:meth:`MoEAdapter.untouched_linears`). An expert that saw no calibration token has no statistics: its linears are
pruned by weight magnitude at the same pattern (per row: Wanda's choice with equal input norms) and listed in the
record (``sparsity.uncalibrated_modules``). Structural units: the attention's KV groups / query heads (as LLaMA);
experts' neurons are not units yet. Whole experts go with ``sparsity=experts`` (:meth:`MoEAdapter.remove_experts`:
the expert's linears and its router row; docs/methods.md §13): removing an expert is exactly routing as if its router
logit were ``-inf`` (both the Mixtral / ``norm_topk_prob`` renormalisation over the top-k and Qwen3-MoE's plain
softmax see the same probabilities over the experts left). Qwen3-MoE layers listed in ``mlp_only_layers`` (or off
the ``decoder_sparse_step``) keep a dense SwiGLU MLP, handled as LLaMA's.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LinearGroup, Tap
from .llama import LlamaAdapter


class ExpertLinears(nn.ModuleList):
    """A layer's experts as ``[i].gate_proj / up_proj / down_proj`` linears; ``forward`` as transformers' fused
    experts: each expert on the tokens routed to it, weighted by the router, summed."""

    def __init__(self, fused: nn.Module):
        experts = []
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            expert = nn.Module()
            for name, weight in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]),
                                 ("down_proj", down[e])):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
                linear.weight = nn.Parameter(weight.clone(), requires_grad=fused.gate_up_proj.requires_grad)
                setattr(expert, name, linear)
            experts.append(expert)
        super().__init__(experts)
        self._act = (fused.act_fn,)  # (held outside the module tree: the list's entries are the experts only)

    def keep(self, indices: list[int]) -> None:
        """Keep only the experts ``indices`` (ascending), renumbered ``0..len-1`` in that order."""
        kept = [self[i] for i in indices]
        self._modules.clear()
        for j, expert in enumerate(kept):
            self._modules[str(j)] = expert

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, position = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = expert.down_proj(self._act[0](expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, position, None]).to(out.dtype))
        return out


class MoEAdapter(LlamaAdapter):
    family = "moe"
    model_types = ("mixtral", "qwen3_moe", "qwen2_moe")

    def __init__(self, model):
        super().__init__(model)
        for block in self.blocks():
            experts = getattr(block.mlp, "experts", None)
            if experts is not None and not isinstance(experts, ExpertLinears):  # (a meta skeleton too: onloading)
                block.mlp.experts = ExpertLinears(experts)

    @staticmethod
    def _experts(block) -> ExpertLinears | None:
        experts = getattr(block.mlp, "experts", None)
        return experts if isinstance(experts, ExpertLinears) else None

    def linear_groups(self, block):
        experts = self._experts(block)
        if experts is None:  # a dense MLP layer (Qwen3-MoE's mlp_only_layers)
            return super().linear_groups(block)
        groups = super().linear_groups(block)[:2]  # q/k/v, o
        for e in range(len(experts)):
            p = f"mlp.experts.{e}"
            groups += [LinearGroup((f"{p}.gate_proj", f"{p}.up_proj"), Tap(f"{p}.gate_proj"), routed=True),
                       LinearGroup((f"{p}.down_proj",), Tap(f"{p}.down_proj"), routed=True)]
        return groups

    def untouched_linears(self, block):
        """Qwen2-MoE's shared expert (an MLP every token goes through) and its sigmoid gate stay dense (the issue's
        default; docs/methods.md §13)."""
        if self._experts(block) is None or not hasattr(block.mlp, "shared_expert"):
            return ()
        return ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                "mlp.shared_expert_gate")

    def unit_groups(self, block):
        """A MoE layer's units: its attention's (experts' neurons are not units yet; whole experts go with
        :meth:`remove_experts`, ``sparsity=experts``)."""
        return super().unit_groups(block) if self._experts(block) is None else self.attention_unit_groups(block)

    def expert_count(self, block):
        experts = self._experts(block)
        return 0 if experts is None else len(experts)

    def expert_parameters(self, block):
        experts = self._experts(block)
        if experts is None:
            return 0
        return sum(p.numel() for p in experts.parameters()) + block.mlp.gate.weight.numel()

    def expert_layout(self) -> tuple[int, int]:
        """``(experts per MoE layer, experts each token is routed to)`` from the config (a meta model too)."""
        count = getattr(self.config, "num_local_experts", None) or self.config.num_experts
        return int(count), int(self.config.num_experts_per_tok)

    def moe_paths(self, block):
        experts = self._experts(block)
        if experts is None:
            return None
        return "mlp.gate", [f"mlp.experts.{e}.down_proj" for e in range(len(experts))]

    def remove_experts(self, block, keep):
        experts = self._experts(block)
        keep = sorted({int(i) for i in torch.as_tensor(keep).flatten().tolist()})
        if experts is None:
            raise ValueError("this block has no MoE layer")
        if keep and (keep[0] < 0 or keep[-1] >= len(experts)):
            raise ValueError(f"expert indices must be in [0, {len(experts)})")
        gate = block.mlp.gate
        if len(keep) < gate.top_k:
            raise ValueError(f"keeping {len(keep)} experts of a layer that routes every token to {gate.top_k} "
                             f"is not possible")
        if len(keep) == len(experts):
            return
        index = torch.tensor(keep, device=gate.weight.device)
        for name, param in list(gate.named_parameters(recurse=False)):  # the router's rows (a bias too, if any)
            setattr(gate, name, nn.Parameter(param.data.index_select(0, index).contiguous(),
                                             requires_grad=param.requires_grad))
        gate.num_experts = len(keep)
        experts.keep(keep)
        counts = {self.expert_count(b) for b in self.blocks() if self._experts(b) is not None}
        if len(counts) == 1:  # every MoE layer alike again: the config says so (the load-balancing loss reads it)
            setattr(self.config, self._expert_field(), counts.pop())

    def _expert_field(self) -> str:
        return "num_local_experts" if hasattr(self.config, "num_local_experts") else "num_experts"

    def restructure(self, block, counts):
        counts = dict(counts)
        experts = counts.pop("expert", None)
        if experts is not None and experts != self.expert_count(block):
            self.remove_experts(block, range(experts))  # (only the count matters: the weights are loaded after)
        super().restructure(block, counts)

    def config_for_counts(self, counts):
        fields = super().config_for_counts(counts)
        if fields is not None and "expert" in counts:
            fields[self._expert_field()] = counts["expert"]
        return fields

    def config_update(self, blocks):
        """As every family's, with Qwen3-MoE's dense layers (``mlp_only_layers``) beside its MoE layers: the config
        expresses one count of MLP neurons for the dense layers, one of experts for the MoE layers, and one attention
        layout for all."""
        moe = [c for c in blocks if "expert" in c]
        dense = [c for c in blocks if "expert" not in c]
        if not moe or not dense:
            return super().config_update(blocks)
        if any(c != moe[0] for c in moe) or any(c != dense[0] for c in dense):
            return None
        attention = {k: v for k, v in moe[0].items() if k != "expert"}
        if {k: v for k, v in dense[0].items() if k != "mlp_neuron"} != attention:
            return None
        return self.config_for_counts({**dense[0], "expert": moe[0]["expert"]})

    def _fused_names(self) -> dict[str, tuple[int, int]]:
        prefix = self.blocks_prefix()
        return {f"{prefix}.{i}.mlp.experts": (i, len(self._experts(b))) for i, b in enumerate(self.blocks())
                if self._experts(b) is not None}

    def native_state(self, state):
        """The experts fused back, as transformers' checkpoints hold them."""
        out = dict(state)
        for path, (_, count) in self._fused_names().items():
            if f"{path}.0.gate_proj.weight" not in out:  # (a part of the model: one onloaded block)
                continue
            gate = [out.pop(f"{path}.{e}.gate_proj.weight") for e in range(count)]
            up = [out.pop(f"{path}.{e}.up_proj.weight") for e in range(count)]
            down = [out.pop(f"{path}.{e}.down_proj.weight") for e in range(count)]
            out[f"{path}.gate_up_proj"] = torch.stack([torch.cat([g, u], 0) for g, u in zip(gate, up, strict=True)])
            out[f"{path}.down_proj"] = torch.stack(down)
        return out

    def from_native_state(self, state):
        """A checkpoint's tensors as this model holds them: experts fused (transformers 5 in memory), or per expert as
        ``save_pretrained`` writes them (Qwen3-MoE: our names; Mixtral: its original ``block_sparse_moe.experts.<e>
        .w1 / w3 / w2`` for gate / up / down, and ``block_sparse_moe.gate``)."""
        legacy = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        out = {}
        for name, tensor in state.items():
            parts = name.split(".")
            if "block_sparse_moe" in parts:
                at = parts.index("block_sparse_moe")
                parts[at] = "mlp"
                if len(parts) > at + 3 and parts[at + 1] == "experts" and parts[at + 3] in legacy:
                    parts[at + 3] = legacy[parts[at + 3]]
            out[".".join(parts)] = tensor
        for path, (_, count) in self._fused_names().items():
            if f"{path}.gate_up_proj" not in out:
                continue
            gate_up, down = out.pop(f"{path}.gate_up_proj"), out.pop(f"{path}.down_proj")
            inter = gate_up.shape[1] // 2
            for e in range(count):
                out[f"{path}.{e}.gate_proj.weight"] = gate_up[e, :inter]
                out[f"{path}.{e}.up_proj.weight"] = gate_up[e, inter:]
                out[f"{path}.{e}.down_proj.weight"] = down[e]
        return out

