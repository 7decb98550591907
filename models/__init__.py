"""Model families: adapters (architecture knowledge), loading, and the bundled tiny checkpoints."""

from .base import Adapter, LinearGroup, Tap, UnitGroup, add_bias
from .checkpoint import load_pruned, save_pruned
from .loading import LoadedModel, inspect_model, load, resolve_path
from .registry import UnsupportedModelError, adapter_class, adapter_for, supported_model_types

__all__ = [
    "Adapter", "LinearGroup", "Tap", "UnitGroup", "LoadedModel", "inspect_model", "load", "resolve_path",
    "UnsupportedModelError", "adapter_class", "adapter_for", "supported_model_types", "add_bias", "load_pruned",
    "save_pruned",
]
