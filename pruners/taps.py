"""Gradient taps: forward activations and loss gradients of every prunable linear, block by block
(docs/architecture.md §1.3).

The block engine (:mod:`pruners.engine`) only runs forwards. Whole-model methods (``scope = "model"``, e.g. the
LLM Surgeon's Kronecker-factored curvature ``A = E[a a^T]``, ``G = E[g g^T]``) also need the gradient of the
language-model loss with respect to each linear's output. :func:`accumulate_gradient_stats` gets it without
ever holding the whole model's autograd graph, nor (on a GPU) the whole model on the device:

1. forward, one block at a time on the device, storing only each block's input (host memory, or files under
   ``engine.offload_dir``);
2. the head (final norm, LM head) and the loss, giving the gradient w.r.t. the last block's output;
3. backward, last block first: each block is run again on its stored input with gradients on (recomputation),
   the linears' inputs and output gradients are handed to a callback, and the gradient w.r.t. the block's input
   goes on to the block before. After a block's last batch the callback is told that the block is complete, so
   its statistics can leave the device.

Blocks and the head run in float32 at least (a float16 / bfloat16 model's blocks are borrowed in float32 for the
pass, so small loss gradients do not underflow; the embeddings run in the model's dtype). Peak device memory:
one block in float32, its statistics, the hidden states and the gradients w.r.t. one block's outputs for the
windows of one pass, and one batch's activations; peak host memory adds the stored block inputs
(``blocks x windows x seqlen x hidden x 4`` bytes; ``engine.grad_windows`` bounds the windows per pass).
The result equals one backward through the whole model (tests/test_seam.py, tests/test_surgeon.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from models.blocks import capture_block_inputs

from .settings import EngineSettings


def calibration_batches(calib_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The calibration windows ``[n, seqlen]`` in batches of ``batch_size`` (the last one may be smaller)."""
    for start in range(0, calib_ids.shape[0], batch_size):
        yield calib_ids[start : start + batch_size]


def prunable_modules(adapter) -> dict[str, nn.Linear]:
    """Every prunable linear of the model, keyed by full module name (the keys of a method's results)."""
    prefix = adapter.blocks_prefix()
    return {f"{prefix}.{index}.{name}": linear for index, block in enumerate(adapter.blocks())
            for name, linear in adapter.prunable_linears(block).items()}


@contextmanager
def model_on_device(model: nn.Module, device):
    """The whole model on ``device`` for the duration, back on the host after (code that needs the whole model
    at once, as the LLM Surgeon reference code run by ``pruner=surgeon_reference``)."""
    moved = str(device) != "cpu"
    if moved:
        model.to(device)
    try:
        yield model
    finally:
        if moved:
            model.to("cpu")
            torch.cuda.empty_cache()


@contextmanager
def borrowed(modules: list[nn.Module], device, dtype: torch.dtype | None = None):
    """Every parameter and buffer of ``modules`` as a copy on ``device`` (floating ones in ``dtype``) for the
    body; afterwards each gets its original tensor back, untouched (read-only use: nothing is copied back).
    Tied parameters stay tied. A tensor already on ``device`` in ``dtype`` is not copied."""
    saved = []
    seen = set()
    try:
        for module in modules:
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for key, tensor in store.items():
                        if tensor is None or id(tensor) in seen:
                            continue
                        seen.add(id(tensor))
                        data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
                        target = dtype if dtype is not None and data.is_floating_point() else data.dtype
                        moved = data.to(device=device, dtype=target)
                        if moved is data:
                            continue
                        saved.append((store, key, tensor, data))
                        if isinstance(tensor, nn.Parameter):
                            tensor.data = moved
                        else:
                            store[key] = moved
        yield
    finally:  # (also after a failed borrow: whatever was swapped goes back)
        for store, key, tensor, data in saved:
            if isinstance(tensor, nn.Parameter):
                tensor.data = data
            else:
                store[key] = data


def _cast(value, dtype: torch.dtype):
    """Floating tensors of a block's kwargs (masks, rotary embeddings) in ``dtype``; the rest as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):  # (a dict's own type kept: models.blocks.PerKind)
        return type(value)({k: _cast(v, dtype) for k, v in value.items()})
    return value


class Offload:
    """Where tensors wait while they are not needed on the device: host memory, or (``directory``) one file each
    in a temporary folder under it, read back memory-mapped. :meth:`put` returns a handle for :meth:`get`;
    :meth:`add` accumulates into a stored tensor. Use as a context manager: the files go at exit."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._count = 0
        self.tensors: dict[str, torch.Tensor | str] = {}

    def __enter__(self):
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(dir=self.directory, prefix="prunelab-offload-")
        return self

    def __exit__(self, *exc):
        self.tensors.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def put(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        tensor = tensor.detach().to(dtype or tensor.dtype)
        if self._tmp is None:
            self.tensors[key] = tensor.to("cpu")
            return
        self._count += 1
        path = os.path.join(self._tmp.name, f"{self._count}.pt")
        torch.save(tensor.cpu(), path)
        self.tensors[key] = path

    def get(self, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        value = self.tensors[key]
        if isinstance(value, str):
            value = torch.load(value, mmap=True, weights_only=True)
        return value.to(device=device, dtype=dtype or value.dtype)

    def add(self, key: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """``stored + tensor`` (in float32 at least), stored in ``dtype``; a new key is stored as it is."""
        if key in self.tensors:
            total = self.get(key, tensor.device, torch.promote_types(tensor.dtype, torch.float32)) + tensor
            self.pop(key)
            tensor = total
        self.put(key, tensor, dtype)

    def pop(self, key: str) -> None:
        value = self.tensors.pop(key, None)
        if isinstance(value, str):
            os.remove(value)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors


def next_token_loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the next-token cross-entropy, in fp32 (labels: the input shifted by one)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def sampled_label_loss_sum(logits: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """The next-token cross-entropy summed over tokens with labels drawn from the model's own predictive
    distribution (``samples`` draws per token, their losses averaged: the reference's ``--fisher_samples``), so
    that ``g g^T`` estimates the true Fisher rather than the empirical one (docs/methods.md §5.1)."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    probs = torch.softmax(logits.detach(), dim=-1).cpu()
    labels = torch.multinomial(probs, samples, generator=generator).to(logits.device)  # (distinct, as the reference)
    return torch.stack([F.cross_entropy(logits, labels[:, k], reduction="sum") for k in range(samples)]).mean(0)


OnBatch = Callable[[int, tuple[str, ...], torch.Tensor, list[torch.Tensor]], None]


class _WeightProducts(TorchFunctionMode):
    """Records ``weight @ x`` for the weights of linears the forward applies without calling them
    (:meth:`models.base.Adapter.applied_weights`), as those linears' outputs, features moved last."""

    def __init__(self, weights: dict[int, str], captured: dict):
        super().__init__()
        self.weights, self.captured = weights, captured

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and args and id(args[0]) in self.weights:  # weight @ x: features at -2
            self._record(self.weights[id(args[0])], out, transposed=True)
        elif func is F.linear and len(args) > 1 and id(args[1]) in self.weights:  # a module call after all
            self._record(self.weights[id(args[1])], out, transposed=False)  # (older transformers' Mamba on CPU)
        return out

    def _record(self, name: str, out: torch.Tensor, transposed: bool) -> None:
        self.captured.setdefault(("output", name), []).append(out)
        self.captured[("transposed", name)] = transposed


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _group_hooks(block: nn.Module, adapter, prefix: str, captured: dict) -> list:
    """Hooks that record, per linear group, the group's input (its adapter tap) and each linear's output."""
    handles = []
    applied = set(adapter.applied_weights(block))
    for group in adapter.linear_groups(block):
        names = tuple(f"{prefix}{name}" for name in group.names)
        tap = group.tap

        def record_input(value, names=names):
            captured.setdefault(("input", names), []).append(value.detach())

        target = block.get_submodule(tap.module)
        if tap.where == "input":
            handles.append(target.register_forward_pre_hook(lambda m, args, t=tap, f=record_input: f(t.select(args, None))))
        else:
            handles.append(target.register_forward_hook(lambda m, args, out, t=tap, f=record_input: f(t.select(args, out))))
        for short, full in zip(group.names, names, strict=True):
            def record_output(module, args, out, full=full):
                out = out[0] if isinstance(out, tuple) else out
                if not out.requires_grad:
                    raise RuntimeError(f"gradient tap on {full}: its output is not connected to the loss graph")
                captured.setdefault(("output", full), []).append(out)
            if short not in applied:
                handles.append(block.get_submodule(short).register_forward_hook(record_output))
    return handles


def accumulate_gradient_stats(model: nn.Module, adapter, calib_ids: torch.Tensor, settings: EngineSettings | None,
                              on_batch: OnBatch, on_block: Callable[[int], None] | None = None,
                              fisher_samples: int = 0, seed: int = 0) -> float:
    """Forward + backward over the calibration windows, block by block (module docstring); per block (last
    first), batch and linear group, ``on_batch(index, names, activation, grads)``: the group's input
    ``[batch, seqlen, d_in]`` and each linear's output gradient (``names``: full module names, in order), detached;
    after a block's last batch of a pass, ``on_block(index)``.

    The gradients are those of the **sum over windows of each window's mean next-token loss** (fp32): a window's
    share is the gradient of its own mean loss, as the reference computes it one sequence at a time (so ``Σ g a^T``
    over every call is ``n`` times ``d loss / d W`` of the mean loss over ``n`` windows). ``fisher_samples > 0``:
    the labels are drawn from the model (:func:`sampled_label_loss_sum`, a generator seeded with ``seed``).
    ``settings.grad_windows`` windows go through each pass (0: all in one); ``settings.offload_dir`` stores the
    block inputs in files there. Works under an outer ``torch.no_grad()``; the model stays where it is (on the
    host: each block is borrowed onto ``settings.device``), parameters get no ``.grad``, no hook is left behind.
    Every linear must run exactly once per forward. Returns the mean loss over all tokens.
    """
    settings = settings or EngineSettings()
    if model.training:
        raise RuntimeError("gradient taps recompute each block's forward: the model must be in eval mode (dropout)")
    n, seqlen = calib_ids.shape
    if seqlen < 2:
        raise ValueError("gradient taps need calibration windows of at least 2 tokens")
    device = settings.device
    blocks = adapter.blocks()
    prefix = adapter.blocks_prefix()
    model_dtype = next(model.parameters()).dtype
    compute = torch.promote_types(model_dtype, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    per_pass = settings.grad_windows or n
    loss_total = 0.0
    with torch.enable_grad(), Offload(settings.offload_dir) as stored:
        for start in range(0, n, per_pass):
            ids = calib_ids[start : start + per_pass]
            with torch.no_grad():
                inputs = capture_block_inputs(model, adapter, ids, device, settings.batch_size)
                kwargs = {size: _cast(kw, compute) for size, kw in inputs.kwargs_by_batch_size.items()}
                hidden = [h.to(compute) for h in inputs.batches]
                del inputs
                for index, block in enumerate(blocks):  # 1. forward, keeping each block's input
                    with borrowed([block], device, compute):
                        for b, h in enumerate(hidden):
                            stored.put(f"{index}/{b}", h)
                        hidden = [adapter.call_block(block, h, kwargs[h.shape[0]]) for h in hidden]
            grads = []
            batch_ids = list(calibration_batches(ids, settings.batch_size))
            with borrowed(adapter.post_block_modules(), device, compute):  # 2. the loss at the head
                for h, batch in zip(hidden, batch_ids, strict=True):
                    h = h.detach().requires_grad_(True)
                    logits = adapter.head(h)
                    if fisher_samples:
                        loss = sampled_label_loss_sum(logits, fisher_samples, generator)
                    else:
                        loss = next_token_loss_sum(logits, batch.to(logits.device))
                    loss = loss / (seqlen - 1)  # the sum of the windows' mean losses
                    grads.append(torch.autograd.grad(loss, h)[0])
                    loss_total += float(loss.detach()) / n
                    del logits, loss
            del hidden
            for index in reversed(range(len(blocks))):  # 3. backward, block by block, recomputing each forward
                block = blocks[index]
                captured: dict = {}
                products = _WeightProducts({id(block.get_submodule(name).weight): f"{prefix}.{index}.{name}"
                                            for name in adapter.applied_weights(block)}, captured)
                with borrowed([block], device, compute), _frozen(block), products:
                    handles = _group_hooks(block, adapter, f"{prefix}.{index}.", captured)
                    try:
                        for b in range(len(grads)):
                            h = stored.get(f"{index}/{b}", device).requires_grad_(True)
                            stored.pop(f"{index}/{b}")
                            grads[b] = _block_backward(adapter, block, index, prefix, h, kwargs[h.shape[0]], grads[b],
                                                       captured, on_batch)
                            del h
                    finally:
                        captured.clear()
                        for handle in handles:
                            handle.remove()
                if on_block is not None:
                    on_block(index)
            del grads
    return loss_total


def _block_backward(adapter, block: nn.Module, index: int, prefix: str, h: torch.Tensor, kwargs: dict,
                    grad_out: torch.Tensor, captured: dict, on_batch: OnBatch) -> torch.Tensor:
    """One batch through one block again with gradients on: hands each group's input and its linears' output
    gradients to ``on_batch`` and returns the gradient w.r.t. the block input (what the block before needs).
    (A function of its own, so that nothing of this batch outlives it.)"""
    captured.clear()
    out = adapter.call_block(block, h, kwargs)
    groups = adapter.linear_groups(block)
    outputs = []
    for group in groups:
        for name in group.names:
            calls = captured.get(("output", f"{prefix}.{index}.{name}"), [])
            if len(calls) != 1:
                raise RuntimeError(f"gradient taps: {prefix}.{index}.{name} ran {len(calls)} times in one forward "
                                   "(expected once)")
            outputs.append(calls[0])
    found = torch.autograd.grad(out, [h, *outputs], grad_outputs=grad_out, allow_unused=True)
    grad_in = torch.zeros_like(h) if found[0] is None else found[0].detach()
    position = 1
    for group in groups:
        names = tuple(f"{prefix}.{index}.{name}" for name in group.names)
        group_grads = []
        for name, output in zip(names, outputs[position - 1 : position - 1 + len(names)], strict=True):
            grad = found[position]
            position += 1
            grad = torch.zeros_like(output) if grad is None else grad.detach()
            group_grads.append(grad.transpose(-1, -2) if captured.get(("transposed", name)) else grad)
        on_batch(index, names, captured[("input", names)][0], group_grads)
    captured.clear()
    return grad_in


@contextmanager
def _frozen(module: nn.Module):
    """``requires_grad = False`` on every parameter (no weight gradients are built), restored after."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
