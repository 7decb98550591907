"""Layer-wise onloading (``model.onload=true``; docs/architecture.md §2.4): a model whose blocks stay on the ``meta``
device, materialised one at a time from the checkpoint's safetensors shards when their turn comes, and written out
(pruned) to a checkpoint folder shard by shard before the next one is read, so that neither host nor device memory
ever holds the whole model.

- :func:`load_onloaded`: the model built with no block for real (its embeddings, final norm, LM head, rotary module:
  loaded by ``from_pretrained`` from the same shards) and every block on ``meta``; a :class:`ShardedBlocks` store
  attached to it.
- :class:`BlockStore`: what the engine, perplexity and the accounting call around a block's turn: ``fetch`` (make it
  real) and ``release`` (write it where a target is set, unless the pass only read it, then back to ``meta``). The default store (a model loaded
  whole) does nothing.
- :func:`each_block`: every block, materialised in turn (read-only passes: accounting, mask checks).

Peak host memory ~ embeddings + head + two blocks + the calibration activations (the block being pruned, the
next one's tensors as they are read); device memory ~ one block, its statistics and the activations.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .base import Adapter

INDEX = "model.safetensors.index.json"


class BlockStore:
    """Blocks held in the model (host memory): nothing to fetch or release."""

    onloaded = False

    def fetch(self, index: int, block: nn.Module) -> None:
        pass

    def release(self, index: int, block: nn.Module, write: bool = True) -> None:
        pass


IN_MEMORY = BlockStore()


def store_of(model) -> BlockStore:
    return getattr(model, "prunelab_blocks", IN_MEMORY)


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a safetensors checkpoint folder (sharded with an index, or one file)."""
    index = folder / INDEX
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"engine.onload=true: {folder} has no model.safetensors(.index.json): onloading reads "
                         f"safetensors checkpoints only")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


class ShardedBlocks(BlockStore):
    """Blocks read from the safetensors shards of ``source`` (memory-mapped, one block's tensors at a time) and, with
    ``target``, written there (one shard per block) when released."""

    onloaded = True

    def __init__(self, source: Path, prefix: str, target: Path | None = None, read_prefix: str | None = None,
                 base_prefix: str = "model", adapter: Adapter | None = None):
        self.source, self.prefix, self.target = Path(source), prefix, Path(target) if target else None
        # the family's checkpoint layout (MoE experts fused, GPT-2's Conv1D transposed): read and written as the
        # family's checkpoints hold it (Adapter.from_native_state / native_state, one block's tensors at a time)
        self.adapter = adapter
        self.map = weight_map(self.source)
        # the blocks' names in the source: the model's, or (checkpoints saved from the base model, e.g. the
        # facebook/opt ones: "decoder.layers.<k>") without the base model's prefix
        if read_prefix is None:
            read_prefix = prefix
            stripped = prefix[len(base_prefix) + 1:] if prefix.startswith(f"{base_prefix}.") else None
            if stripped and not any(n.startswith(f"{prefix}.") for n in self.map) and \
                    any(n.startswith(f"{stripped}.") for n in self.map):
                read_prefix = stripped
        self.read_prefix = read_prefix
        self.written: dict[str, str] = {}
        if self.target is not None and self.target.is_dir():  # blocks written before a kill (engine.resume)
            from safetensors import safe_open

            for shard in sorted(self.target.glob("block-*.safetensors")):
                with safe_open(shard, "pt") as f:
                    self.written.update(dict.fromkeys(f.keys(), shard.name))

    def names(self, index: int) -> dict[str, str]:
        start = f"{self.read_prefix}.{index}."
        return {name[len(start):]: shard for name, shard in self.map.items() if name.startswith(start)}

    def fetch(self, index: int, block: nn.Module) -> None:
        from safetensors import safe_open

        if not any(p.is_meta for p in block.parameters()):
            return  # (already real: fetched by an earlier pass that did not release it)
        expected = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        native, by_shard = {}, {}
        for name, shard in self.names(index).items():
            by_shard.setdefault(shard, []).append(name)
        dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), None)
        for shard, names in by_shard.items():
            with safe_open(self.source / shard, "pt") as f:
                for name in names:
                    tensor = f.get_tensor(f"{self.read_prefix}.{index}.{name}")
                    if dtype is not None and tensor.is_floating_point():  # (cast as read: one copy of the block)
                        tensor = tensor.to(dtype)
                    native[f"{self.prefix}.{index}.{name}"] = tensor
        if self.adapter is not None:
            native = self.adapter.from_native_state(native)
        start = f"{self.prefix}.{index}."
        state = {name[len(start):]: tensor for name, tensor in native.items()}
        del native
        state = {name: tensor.to(expected[name].dtype) for name, tensor in state.items() if name in expected}
        missing = sorted(set(dict(block.named_parameters())) - set(state))
        if missing:
            raise ValueError(f"{self.source}: block {index} has no tensor for {', '.join(missing[:4])}")
        block.load_state_dict(state, strict=False, assign=True)

    def release(self, index: int, block: nn.Module, write: bool = True) -> None:
        """Write ``block`` out (where a target is set and ``write``: False for a pass that did not change it), then
        back to ``meta``."""
        if self.target is not None and write:
            from safetensors.torch import save_file

            self.target.mkdir(parents=True, exist_ok=True)
            shard = f"block-{index:05d}.safetensors"
            state = {f"{self.prefix}.{index}.{k}": v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            if self.adapter is not None:  # (as save_pretrained writes it: e.g. Mixtral's w1 / w3 / w2 per expert)
                state = {k: v.contiguous() for k, v in self._checkpoint_names(self.adapter.native_state(state)).items()}
            save_file(state, self.target / f"{shard}.tmp", metadata={"format": "pt"})
            (self.target / f"{shard}.tmp").replace(self.target / shard)
            self.written.update(dict.fromkeys(state, shard))
        block.to("meta")
        _return_freed_memory()

    def _checkpoint_names(self, state: dict) -> dict:
        """``state`` under the names ``save_pretrained`` would write (transformers' own reverse conversion)."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.adapter.model, state)

    def finish(self, model, tokenizer=None) -> None:
        """Complete the target folder: the weights outside the blocks, the index, config and tokenizer."""
        from safetensors.torch import save_file

        rest = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                if not k.startswith(f"{self.prefix}.") and not v.is_meta}
        tied = getattr(model.config, "tie_word_embeddings", False)
        if tied:  # (as save_pretrained: the tied head is the embedding)
            rest = {k: v for k, v in rest.items() if not k.endswith("lm_head.weight")}
        save_file(rest, self.target / "rest.safetensors", metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {**dict.fromkeys(rest, "rest.safetensors"), **self.written}}
        (self.target / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.save_pretrained(self.target)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.target)


def _return_freed_memory() -> None:
    """Hand the freed block back to the OS. glibc raises its mmap threshold after large frees, so block-sized tensors
    freed and allocated again come from the heap, which it keeps: without a trim a run's resident memory grows by a
    block per block (measured on SmolLM2-135M: +480 MB, the whole model, over 30 blocks)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # (not glibc: nothing to do)
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def load_onloaded(path: str | Path, dtype: torch.dtype, attn_implementation: str | None, adapter_cls,
                  hf_kwargs: dict | None = None):
    """The model of the checkpoint folder ``path`` with every block on ``meta`` and a :class:`ShardedBlocks` store
    reading them from ``path``'s shards; the modules outside the blocks loaded for real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_kwargs = hf_kwargs or {}
    path = Path(path)
    if not path.is_dir():  # (a hub id: its snapshot folder, the weights downloaded unless the hub is offline)
        import os

        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        path = Path(snapshot_download(str(path), revision=hf_kwargs.get("revision"), local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    weight_map(path)  # (safetensors only: one line before any work)
    config = AutoConfig.from_pretrained(path, **hf_kwargs)
    blocks_count = config.num_hidden_layers
    bare = copy.deepcopy(config)
    bare.num_hidden_layers = 0
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # (every block's tensors are "unexpected" for a model of no block)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=bare, dtype=dtype,
                                                           attn_implementation=attn_implementation,
                                                           output_loading_info=True, **hf_kwargs)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                        trust_remote_code=hf_kwargs.get("trust_remote_code", False))
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        raise ValueError(f"model.path={path}: no tensor for {', '.join(sorted(info['missing_keys'])[:4])}")
    adapter = adapter_cls(model)
    adapter.blocks().extend(adapter_cls(skeleton).blocks())
    model.config.num_hidden_layers = blocks_count
    for block in adapter.blocks():
        for name, buffer in block.named_buffers():
            if buffer.is_meta and name.rsplit(".", 1)[-1] in _non_persistent(block):
                raise ValueError(f"engine.onload=true: {type(block).__name__} holds a buffer that is not in the "
                                 f"checkpoint ({name}): this family cannot be onloaded")
    model.prunelab_blocks = ShardedBlocks(path, adapter.blocks_prefix(), base_prefix=model.base_model_prefix,
                                          adapter=adapter)
    return model


def _non_persistent(module: nn.Module) -> set[str]:
    return {name for m in module.modules() for name in m._non_persistent_buffers_set}


def each_block(adapter: Adapter, start: int = 0, after=None) -> Iterator[tuple[int, nn.Module]]:
    """``(index, block)`` for every block from ``start``, materialised for its turn (onloaded models) and released
    after it; then ``after(index, block)`` (a resumable prune keeps it done: pruners/resume.py)."""
    store = store_of(adapter.model)
    for index, block in enumerate(adapter.blocks()):
        if index < start:
            continue
        store.fetch(index, block)
        try:
            yield index, block
        finally:
            store.release(index, block)
        if after is not None:
            after(index, block)
