"""Gemma (``gemma``), Gemma-2 (``gemma2``) and Gemma-3's text models (``gemma3_text``: Gemma-3 1B, and the language
model of the larger ones saved alone): LLaMA's linears and units (q/k/v/o, GeGLU ``down(gelu(gate x) * up x)``,
grouped-query attention), with what the adapter must know on top (docs/architecture.md §2.1):

- embeddings scaled by sqrt(hidden) (inside the model's forward or its embedding: captured with block 0's input);
- pre- and post-norms around attention and MLP (over the hidden size: unaffected when heads or neurons go);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and (Gemma-2) soft-capped, ``cap * tanh(s / cap)``;
  final logits soft-capped too (:meth:`GemmaAdapter.head`);
- local (sliding-window) and global attention layers, which the model gives different masks and (Gemma-3)
  different rotary embeddings: blocks differ in kind (:meth:`LlamaAdapter.block_kind`), and each kind's kwargs are
  captured (:func:`models.blocks.capture_block_inputs`);
- Gemma-3's per-head ``q_norm`` / ``k_norm`` (one weight shared by every head: nothing to cut when heads go).
"""

from __future__ import annotations

import torch

from .llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")

    def pre_block_modules(self):
        inner = self.model.model
        rotary = [getattr(inner, name) for name in ("rotary_emb", "rotary_emb_local") if hasattr(inner, name)]
        return [inner.embed_tokens] + rotary

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head, and (Gemma-2) the final soft-cap ``cap * tanh(logits / cap)``, as the model's forward."""
        logits = super().head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap
