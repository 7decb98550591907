"""Adapter lookup by the checkpoint's declared ``model_type`` (never by its name or path)."""

from __future__ import annotations

from .base import Adapter
from .gemma import GemmaAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .llamagen_adapter import LlamaGenAdapter
from .mamba import MambaAdapter
from .mamba2 import Mamba2Adapter
from .moe import MoEAdapter
from .opt import OPTAdapter
from .phi3 import Phi3Adapter

ADAPTERS: tuple[type[Adapter], ...] = (OPTAdapter, LlamaAdapter, MambaAdapter, GPT2Adapter, LlamaGenAdapter,
                                       Phi3Adapter, GemmaAdapter, MoEAdapter, Mamba2Adapter)


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not supported (supported: {', '.join(supported_model_types())})"
    )


def adapter_for(model) -> Adapter:
    return adapter_class(model.config.model_type)(model)
