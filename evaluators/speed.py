"""Inference speed and memory of a (pruned) model: prefill and decode latency / throughput (docs/evaluation.md §3).

Every number is tagged with the device, dtype, threads and shapes it was taken with; the median of
``repeats`` timed runs after ``warmup`` untimed ones:

- **prefill**: one forward over ``batch_size x prompt_len`` tokens with the KV cache on (``use_cache=True``),
  as the first step of generation; latency in ms, throughput in tokens/s;
- **decode**: greedy generation of ``new_tokens`` after that prompt with the cache; per-token latency is
  ``(t(generate new_tokens) - t(generate 1)) / (new_tokens - 1)`` so that the prefill is not counted;
  throughput = ``batch_size / per-token latency`` (tokens/s across the batch);
- **memory**: parameter bytes, and on CUDA the peak allocated during generation.

Family-independent: it only uses ``model(...)`` and ``model.generate(...)``.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.blocks import on_device


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _median_seconds(fn, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def measure_speed(model, device: str = "cpu", batch_size: int = 1, prompt_len: int = 64, new_tokens: int = 32,
                  repeats: int = 5, warmup: int = 1, seed: int = 0, threads: int | None = None) -> dict:
    """Prefill / decode latency and throughput of ``model`` on ``device`` (see the module docstring).
    ``threads`` sets torch's intra-op threads for the measurement only (None: as they are)."""
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_speed(model, device, batch_size, prompt_len, new_tokens, repeats, warmup, seed)
        finally:
            torch.set_num_threads(previous)
    if new_tokens < 2:
        raise ValueError("speed.new_tokens must be >= 2 (the decode time is a difference of two generations)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    # sampling off, no early stop: every run generates exactly the tokens asked for
    kwargs = {"attention_mask": mask, "do_sample": False, "use_cache": True, "pad_token_id": 0,
              "eos_token_id": None}
    with on_device(model, device):
        prefill = _median_seconds(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True), device,
                                  repeats, warmup)

        def generate(n):
            return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        first = _median_seconds(generate(1), device, repeats, warmup)
        full = _median_seconds(generate(new_tokens), device, repeats, warmup)
        peak = (torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
                if str(device).startswith("cuda") else None)
    per_token = decode_seconds_per_token(first, full, new_tokens)
    dtype = next(model.parameters()).dtype
    return {
        "prefill_ms": round(prefill * 1e3, 3),
        "prefill_tokens_per_s": round(batch_size * prompt_len / prefill, 1),
        "decode_ms_per_token": None if per_token is None else round(per_token * 1e3, 3),
        "decode_tokens_per_s": None if per_token is None else round(batch_size / per_token, 1),
        "generate_ms": round(full * 1e3, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_mb": round(parameter_bytes(model) / 2**20, 3),
        "peak_device_mb": None if peak is None else round(peak, 1),
        "setup": {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                  "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                  "warmup": warmup},
    }


@torch.no_grad()
def measure_image_speed(model, device: str = "cpu", batch_size: int = 8, repeats: int = 5, warmup: int = 1,
                        seed: int = 0, threads: int | None = None) -> dict:
    """Class-conditional generation of ``batch_size`` images (every image token, KV-cached, with the model's own
    guidance scale: two sequences per image when it guides) by an image generator (:mod:`models.llamagen`): images
    per second and ms per image, and on CUDA the peak memory allocated while generating."""
    from models.llamagen import class_labels, generate

    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_image_speed(model, device, batch_size, repeats, warmup, seed)
        finally:
            torch.set_num_threads(previous)
    cfg = model.config
    labels = class_labels(cfg.num_classes, batch_size).to(device)
    with on_device(model, device):
        gen = torch.Generator(device=device).manual_seed(seed)
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        seconds = _median_seconds(lambda: generate(model, labels, cfg_scale=cfg.cfg_scale, generator=gen), device,
                                  repeats, warmup)
        peak = (torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
                if str(device).startswith("cuda") else None)
    dtype = next(model.parameters()).dtype
    return {
        "generate_ms": round(seconds * 1e3, 3),
        "ms_per_image": round(seconds * 1e3 / batch_size, 3),
        "images_per_s": round(batch_size / seconds, 3),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_mb": round(parameter_bytes(model) / 2**20, 3),
        "peak_device_mb": None if peak is None else round(peak, 1),
        "setup": {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                  "batch_size": batch_size, "tokens_per_image": cfg.block_size, "cfg_scale": cfg.cfg_scale,
                  "repeats": repeats, "warmup": warmup},
    }


def decode_seconds_per_token(first: float, full: float, new_tokens: int) -> float | None:
    """``(t(generate new_tokens) - t(generate 1)) / (new_tokens - 1)``; None where the longer generation was timed no
    slower than the one-token one (a host too busy to time: no decode time rather than a meaningless one)."""
    return (full - first) / (new_tokens - 1) if full > first else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, None where either is missing."""
    return None if a is None or b is None else round(a / b, 3)


def speedup(dense: dict, pruned: dict) -> dict:
    """Ratios dense / pruned (> 1 = the pruned model is faster / smaller; None: a time not measured)."""
    if "ms_per_image" in dense:  # image generators (measure_image_speed)
        return {"generate": ratio(dense["ms_per_image"], pruned["ms_per_image"]),
                "parameters": ratio(dense["parameters"], pruned["parameters"])}
    return {"prefill": ratio(dense["prefill_ms"], pruned["prefill_ms"]),
            "decode": ratio(dense["decode_ms_per_token"], pruned["decode_ms_per_token"]),
            "parameters": ratio(dense["parameters"], pruned["parameters"])}
