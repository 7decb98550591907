"""Block execution and placement, shared by pruning, perplexity, speed and zero-shot (docs/architecture.md §1).

- :func:`capture_block_inputs`: embed once and record what block 0 receives (hidden states and
  whatever kwargs the installed transformers passes: attention mask, position ids, rotary
  embeddings, cache position...), batch by batch; where blocks differ in kind (Gemma's sliding-window
  and global attention layers get different masks and rotary embeddings), the kwargs of each kind
  (:class:`PerKind`, resolved by :meth:`models.base.Adapter.call_block`).
- :func:`run_block`: call one block alone on those inputs (through the adapter).
- :func:`run_blocks`: every block in order, one at a time on the device (sequential placement).
- :func:`on_device`: the whole model on the device for a ``with`` body, moved back afterwards.
- :class:`KeptBatches`: the calibration batches kept in host memory or in files instead of on the device
  (``engine.activations``), each brought to the device for its forward.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import Adapter


class _Caught(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for the first block of a kind when blocks differ in kind: records the kwargs it receives and
    passes the hidden states on unchanged (or stops the forward, as the last one needed)."""

    def __init__(self, block: nn.Module, seen: dict, kind, stop: bool):
        super().__init__()
        self.block, self.seen, self.kind, self.stop = block, seen, kind, stop

    def forward(self, hidden, *args, **kwargs):
        self.seen[self.kind] = (hidden, args, kwargs)
        if self.stop:
            raise _Caught(hidden, args, kwargs)
        return hidden

    def __getattr__(self, name):  # models may read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


class _Passthrough(_Recorder):
    """Stands in for a block between two recorders: nothing to record, the hidden states pass on."""

    def forward(self, hidden, *args, **kwargs):
        return hidden


class PerKind(dict):
    """The kwargs of a model whose blocks differ in kind, by kind (:meth:`models.base.Adapter.block_kind`)."""


ACTIVATIONS = ("device", "host", "disk")


class KeptBatches:
    """Hidden-state batches kept off the compute device (``engine.activations``; docs/architecture.md §2.5): in host
    memory (``host``), or one file each in a temporary folder under ``directory`` read back memory-mapped
    (``disk``), each moved to ``device`` when read. Appended in order, read by index or in order, like the list of
    device tensors it stands in for; the folder goes with the object (or at exit)."""

    def __init__(self, device, directory: str | None = None):
        self.device, self.directory = device, directory
        self._items: list[torch.Tensor | str] = []
        self._folder = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self._folder = tempfile.mkdtemp(dir=directory, prefix="prunelab-activations-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._folder, True)

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        if self._folder is None:
            self._items.append(tensor)
            return
        path = os.path.join(self._folder, f"{len(self._items)}.pt")
        torch.save(tensor.contiguous(), path)
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        value = self._items[index]
        if isinstance(value, str):
            value = torch.load(value, mmap=True, weights_only=True)
        return value.to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def on_host(self) -> Iterator[torch.Tensor]:
        """The batches where they are kept, without the move to the device (files: memory-mapped)."""
        for value in self._items:
            yield torch.load(value, mmap=True, weights_only=True) if isinstance(value, str) else value

    def new(self) -> KeptBatches:
        """An empty store of the same kind (a block's outputs)."""
        return KeptBatches(self.device, self.directory)


def kept_batches(activations: str, device, directory: str | None = None) -> list | KeptBatches:
    """An empty store for hidden-state batches: a plain list of device tensors (``device``), or a
    :class:`KeptBatches` in host memory (``host``) or in files under ``directory`` (``disk``)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"engine.activations={activations} is not one of: {', '.join(ACTIVATIONS)}")
    if activations == "device":
        return []
    if activations == "disk" and directory is None:
        raise ValueError("engine.activations=disk needs engine.offload_dir (the folder the batches are written to)")
    return KeptBatches(device, directory if activations == "disk" else None)


def _new_like(batches) -> list | KeptBatches:
    return batches.new() if isinstance(batches, KeptBatches) else []


@dataclass
class BlockInputs:
    """Hidden states entering the current block, in batches, and the kwargs each batch size needs."""

    batches: list[torch.Tensor] | KeptBatches
    kwargs_by_batch_size: dict[int, dict] = field(default_factory=dict)

    def kwargs(self, hidden: torch.Tensor) -> dict:
        return self.kwargs_by_batch_size[hidden.shape[0]]


def _off_device(modules, device) -> None:
    if str(device) != "cpu":
        for module in modules:
            module.to("cpu")


def _named(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> dict:
    """Positional arguments after the hidden states (GPT-2 passes its cache and mask so) as the keyword arguments
    they bind to in the block's forward, so that a block can be called again with ``block(hidden, **kwargs)``."""
    signature = inspect.signature(block.forward)
    try:
        bound = signature.bind(hidden, *args, **kwargs)
    except TypeError as error:
        raise RuntimeError(f"block 0 received positional arguments its forward does not name: {error}") from None
    named = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            raise RuntimeError(f"block 0 received positional arguments its forward does not name ({name})")
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif index:  # (the first is the hidden states)
            named[name] = value
    return named


@torch.no_grad()
def capture_block_inputs(model, adapter: Adapter, ids: torch.Tensor, device, batch_size: int,
                         activations: str = "device", directory: str | None = None) -> BlockInputs:
    """Run the embeddings on ``device`` and capture what block 0 receives, batch by batch (and, where blocks differ
    in kind, what the first block of every kind receives: :class:`PerKind` kwargs); the hidden states kept where
    ``activations`` says (:func:`kept_batches`)."""
    blocks = adapter.blocks()
    pre = adapter.pre_block_modules()
    for module in pre:
        module.to(device)
    first_of: dict = {}  # kind -> index of its first block
    for index, block in enumerate(blocks):
        first_of.setdefault(adapter.block_kind(block), index)
    last = max(first_of.values())
    kind_at = {index: kind for kind, index in first_of.items()}
    originals = [blocks[i] for i in range(last + 1)]
    seen: dict = {}
    for index, original in enumerate(originals):
        if index in kind_at:
            blocks[index] = _Recorder(original, seen, kind_at[index], stop=index == last)
        else:
            blocks[index] = _Passthrough(original, seen, None, stop=False)
    captured = BlockInputs(kept_batches(activations, device, directory))
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            seen.clear()
            try:
                model(input_ids=batch, use_cache=False)
            except _Caught:
                pass
            by_kind = {}
            for kind, (hidden, args, kwargs) in seen.items():
                block = originals[first_of[kind]]
                by_kind[kind] = _named(block, hidden, args, kwargs) if args else kwargs
            hidden = seen[kind_at[0]][0]
            captured.batches.append(hidden)
            # windows are fixed-length and unpadded, so kwargs depend only on the batch size
            captured.kwargs_by_batch_size.setdefault(
                hidden.shape[0], by_kind[kind_at[0]] if len(by_kind) == 1 else PerKind(by_kind))
    finally:
        for index, original in enumerate(originals):
            blocks[index] = original
        _off_device(pre, device)
    return captured


@torch.no_grad()
def run_block(adapter: Adapter, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """One block's outputs for every batch of ``inputs`` (the block already on the inputs' device), kept where the
    inputs are (:class:`KeptBatches`: each output leaves the device as soon as it is computed)."""
    outputs = _new_like(inputs.batches)
    for h in inputs.batches:
        outputs.append(adapter.call_block(block, h, inputs.kwargs(h)))
    return outputs


@torch.no_grad()
def run_blocks(adapter: Adapter, inputs: BlockInputs, device, progress: bool = True, desc: str = "blocks"
               ) -> list[torch.Tensor]:
    """The last block's outputs: every block in order, each moved to ``device`` for its turn only."""
    from .onload import store_of

    batches, store = inputs.batches, store_of(adapter.model)
    for index, block in enumerate(tqdm(adapter.blocks(), desc=desc, unit="block", disable=not progress)):
        store.fetch(index, block)  # (an onloaded model's block, read for its turn)
        block.to(device)
        batches = run_block(adapter, block, BlockInputs(batches, inputs.kwargs_by_batch_size))
        _off_device([block], device)
        store.release(index, block)
    return batches


@contextmanager
def on_device(modules: nn.Module | list[nn.Module], device) -> Iterator[None]:
    """Move ``modules`` to ``device`` for the body and back to where their parameters were."""
    modules = modules if isinstance(modules, list) else [modules]
    homes = [next(m.parameters()).device if any(True for _ in m.parameters()) else None for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            if home is not None:
                module.to(home)
