"""Whole-model taps: forward activations and loss gradients of selected modules (docs/architecture.md §1).

The block engine (:mod:`pruners.engine`) only runs forwards, one block at a time. Whole-model methods
(``scope = "model"``, e.g. LLM Surgeon's Kronecker-factored curvature ``A = E[a a^T]``, ``G = E[g g^T]``)
need the gradient of the language-model loss with respect to each pruned linear's output, next to the
linear's input. :func:`accumulate_gradient_stats` runs forward + backward over the calibration windows
and hands each (input activation, output gradient) pair to a callback; it leaves no hooks, no
``.grad`` and no changed ``requires_grad`` behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

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
    """The whole model on ``device`` for the duration (whole-model methods), back on the host after."""
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
def frozen_parameters(model: nn.Module):
    """``requires_grad = False`` on every parameter (no weight gradients are built), restored after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


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


OnBatch = Callable[[str, torch.Tensor, torch.Tensor], None]


def accumulate_gradient_stats(model: nn.Module, modules: dict[str, nn.Module], calib_ids: torch.Tensor,
                              settings: EngineSettings | None, on_batch: OnBatch, fisher_samples: int = 0,
                              seed: int = 0) -> float:
    """Forward + backward over the calibration windows; per batch and selected module, call
    ``on_batch(name, input_activation, output_grad)``.

    The loss is the mean next-token cross-entropy over **all** calibration tokens (fp32); a batch
    contributes its share, so the gradients handed out sum over batches to the gradient of that mean
    (e.g. ``sum_batches grad^T @ input`` is ``d loss / d W`` of a linear). ``input_activation`` is the
    module's first positional input and ``output_grad`` the gradient w.r.t. its output, both
    ``[batch, seqlen, features]`` and detached. A module called several times per forward is reported
    once per call. The model must already be on ``settings.device`` (:func:`model_on_device`).
    ``fisher_samples > 0``: the labels are drawn from the model instead (:func:`sampled_label_loss_sum`, a
    generator seeded with ``seed``).
    Works under an outer ``torch.no_grad()``; parameters get no ``.grad`` and keep their
    ``requires_grad``. Returns the mean loss.
    """
    settings = settings or EngineSettings()
    n, seqlen = calib_ids.shape
    total_tokens = n * (seqlen - 1)
    if total_tokens <= 0:
        raise ValueError("gradient taps need calibration windows of at least 2 tokens")
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def tap(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if not out.requires_grad:
                raise RuntimeError(f"gradient tap on {name}: its output is not connected to the loss graph")
            captured.append((name, args[0].detach(), out))
        return hook

    def track(module, args, out):  # parameters are frozen: the graph starts at the embeddings' output
        if isinstance(out, torch.Tensor) and not out.requires_grad:
            out.requires_grad_(True)

    loss_total = 0.0
    handles = []
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad(), frozen_parameters(model):
        try:
            handles.append(model.get_input_embeddings().register_forward_hook(track))
            handles += [module.register_forward_hook(tap(name)) for name, module in modules.items()]
            for batch in calibration_batches(calib_ids, settings.batch_size):
                batch = batch.to(settings.device)
                logits = model(input_ids=batch, use_cache=False).logits
                if fisher_samples:
                    loss = sampled_label_loss_sum(logits, fisher_samples, generator) / total_tokens
                else:
                    loss = next_token_loss_sum(logits, batch) / total_tokens
                grads = torch.autograd.grad(loss, [out for _, _, out in captured], allow_unused=True)
                for (name, activation, out), grad in zip(captured, grads, strict=True):
                    on_batch(name, activation, torch.zeros_like(out) if grad is None else grad.detach())
                loss_total += float(loss.detach())
                captured.clear()
                del logits, loss, grads
        finally:
            captured.clear()
            for handle in handles:
                handle.remove()
    return loss_total
