"""Saving and reloading structurally pruned models (docs/methods.md §1.4; docs/architecture.md §2.3).

After heads / neurons / Mamba channels are removed, blocks differ in size, which a Hugging Face config
cannot describe. :func:`save_pruned` writes the usual ``save_pretrained`` folder plus
``prunelab_structure.json``: the units each block kept and the biases pruning added (FLAP's
compensation). :func:`load_pruned` builds the model from the config, shrinks every block to those
counts through the adapter, and loads the weights strictly; :func:`models.load` does this by itself
for any folder that holds the structure file, so ``model=local model.path=<folder>`` just works.

Where every block kept the same counts, no bias was added and the family's config can express the
sizes (LLaMA: heads, KV heads, head_dim, intermediate_size; OPT: ffn_dim when no head was removed), the
saved config.json carries the new sizes too and plain ``AutoModelForCausalLM.from_pretrained`` reloads it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .base import Adapter, add_bias
from .registry import adapter_for

STRUCTURE_FILE = "prunelab_structure.json"
FORMAT = "prunelab-structure/1"


def structure_of(adapter: Adapter) -> dict:
    """What a reloaded model must look like: per-block unit counts and the linears given a bias."""
    prefix = adapter.blocks_prefix()
    added = [f"{prefix}.{i}.{name}" for i, block in enumerate(adapter.blocks())
             for name, module in block.named_modules() if getattr(module, "prunelab_added_bias", False)]
    blocks = [adapter.block_counts(block) for block in adapter.blocks()]
    config_update = adapter.config_update(blocks) if not added else None
    return {"format": FORMAT, "model_type": adapter.config.model_type, "family": adapter.family,
            "blocks": blocks, "added_biases": added, "plain_from_pretrained": config_update is not None,
            "config_update": config_update}


def save_pruned(model, tokenizer, directory: str | Path, adapter: Adapter | None = None) -> dict:
    """``save_pretrained`` (+ tokenizer) and the structure file; returns the structure written."""
    directory = Path(directory)
    adapter = adapter or adapter_for(model)
    with _dequantized(model):  # the tensors as the family's checkpoints store them (GPT-2: Conv1D layout)
        model.save_pretrained(directory, state_dict=adapter.native_state(model.state_dict()))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return write_structure(directory, adapter)


def write_structure(directory: str | Path, adapter: Adapter) -> dict:
    """The structure file of a pruned checkpoint in ``directory`` (and, where the config can say the new counts, its
    ``config.json`` updated); returns the structure. ``save_pruned`` and an onloaded prune's checkpoint call it."""
    directory = Path(directory)
    structure = structure_of(adapter)
    if structure["config_update"]:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config.update(structure["config_update"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, indent=2) + "\n")
    return structure


@contextlib.contextmanager
def _dequantized(model):
    """A model loaded from a GGUF file holds plain dequantized tensors, yet transformers keeps its GGUF
    quantizer and refuses to ``save_pretrained`` it: save it as the ordinary fp checkpoint it is."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        yield
        return
    config = model.config
    had_config = hasattr(config, "quantization_config")
    saved_config = getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if had_config:
        del config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = saved_config


def is_pruned_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STRUCTURE_FILE).is_file()


def read_structure(path: str | Path) -> dict | None:
    """The structure file of a pruned checkpoint folder (:func:`structure_of`), None for any other checkpoint."""
    return json.loads((Path(path) / STRUCTURE_FILE).read_text()) if is_pruned_checkpoint(path) else None


def _state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


def loaded_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the key renames transformers applies when it loads a checkpoint of ``model``'s family (and
    reverts when it saves one: GPT-NeoX's ``lm_head`` is stored as ``embed_out``), for the keys the model does not
    have as they are (docs/adding-a-family.md, section 5). Other weight conversions are not applied."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:  # (a transformers without conversion mappings saves the names as they are)
        return state
    renames = [rule for rule in get_model_conversion_mapping(model) if isinstance(rule, WeightRenaming)]
    expected, out = set(model.state_dict()), {}
    for key, value in state.items():
        if key not in expected:
            for rule in renames:  # (transformers' own matching: globs, scope prefixes, name boundaries)
                renamed = rule.rename_source_key(key)[0]
                if renamed != key and renamed in expected:
                    key = renamed
                    break
        out[key] = value
    return out


def load_pruned(directory: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None,
                trust_remote_code: bool = False):
    """The model a :func:`save_pruned` folder holds, block sizes and all (weights loaded strictly)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    structure = read_structure(directory)
    if structure.get("format") != FORMAT:
        raise ValueError(f"{directory / STRUCTURE_FILE}: unknown format {structure.get('format')!r} (expected {FORMAT})")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with no_init_weights():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    adapter = adapter_for(model)
    if len(structure["blocks"]) != len(adapter.blocks()):
        raise ValueError(f"{directory}: the structure file lists {len(structure['blocks'])} blocks, the config "
                         f"{len(adapter.blocks())}")
    for block, counts in zip(adapter.blocks(), structure["blocks"], strict=True):
        adapter.restructure(block, counts)
    for name in structure["added_biases"]:
        add_bias(model.get_submodule(name))
    state = _state_dict(directory)
    missing, unexpected = model.load_state_dict(loaded_names(model, adapter.from_native_state(state)), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # a list (v4) or {tied: source} (v5)
    still_missing = [k for k in missing if k not in tied]
    if still_missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the structure (missing {still_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    model.tie_weights()
    model.eval()
    return model, structure
