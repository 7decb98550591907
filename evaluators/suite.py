"""The evaluation suite of a run (docs/architecture.md §3): perplexity on each protocol, zero-shot tasks through
lm-eval, and generation speed, as the ``eval`` / ``speed`` config groups ask; every metric with its provenance."""

from __future__ import annotations

import time

from omegaconf import OmegaConf

from .ppl import perplexity, protocol_windows
from .speed import measure_image_speed, measure_speed


def evaluate(eval_cfg, loaded, protocols, seqlen: int, device: str, zeroshot_tasks, task_dict, timings: dict,
             tag: str = "", progress: bool = True, out_dir=None) -> dict:
    """``{"ppl": {"<protocol>@<seqlen>": {"value", "protocol"}}, "zeroshot": ..., "image": ...}`` for ``loaded`` (a
    :class:`models.LoadedModel`); each phase's seconds go to ``timings`` under ``<tag>eval/<key>``.
    ``task_dict``: lm-eval's loaded tasks (:func:`evaluators.zeroshot.load_tasks`) for the in-memory backend.
    ``out_dir``: the run's folder, for files beside the record (an image generator's sample grid)."""
    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    metrics: dict = {"ppl": {}}
    t = time.perf_counter()
    for protocol in protocols:
        ids, provenance = protocol_windows(tokenizer, protocol, seqlen, eval_cfg.ppl.get("dataset_root"),
                                           eval_cfg.ppl.get("max_windows"))
        key = f"{protocol.name}@{seqlen}"
        value = perplexity(model, adapter, ids, device, int(eval_cfg.ppl.batch_size), eval_cfg.ppl.mode,
                           desc=f"{tag}ppl {key}", progress=progress)
        metrics["ppl"][key] = {"value": value, "protocol": provenance}
        timings[f"{tag}eval/{key}"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
    if "image" in eval_cfg:  # an image generator's samples (runners/validate.py: only for image generators)
        from . import image

        metrics["image"] = image.evaluate(eval_cfg.image, loaded, device, out_dir, progress)
        timings[f"{tag}eval/image"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
    if zeroshot_tasks:
        from . import zeroshot  # lm-eval is imported only when it is used

        zs = eval_cfg.zeroshot
        options = {"batch_size": zs.batch_size, "limit": zs.get("limit"), "num_fewshot": int(zs.num_fewshot),
                   "max_length": seqlen}
        if zs.get("backend", "memory") == "cli":  # lm-eval's own command on the model saved to a temporary folder
            from models.onload import store_of

            store = store_of(model)  # (an onloaded model: lm-eval reads the checkpoint its blocks are read from)
            metrics["zeroshot"] = zeroshot.evaluate_zeroshot_cli(model, tokenizer, zeroshot_tasks, device,
                                                                 include_path=zs.get("include_path"),
                                                                 native_state=adapter.native_state,
                                                                 checkpoint=store.source if store.onloaded else None,
                                                                 **options)
        else:
            metrics["zeroshot"] = zeroshot.evaluate_zeroshot(model, tokenizer, task_dict, device, **options)
        timings[f"{tag}eval/zeroshot"] = round(time.perf_counter() - t, 3)
    return metrics


def zeroshot_tasks(eval_cfg, tasks):
    """lm-eval's task objects for ``tasks`` (None without tasks); ValueError for a task that cannot be loaded."""
    if not tasks:
        return None
    from .zeroshot import load_tasks

    zs = eval_cfg.zeroshot
    return load_tasks(tasks, zs.get("include_path"), int(zs.num_fewshot))


def speed(speed_cfg, model, device: str, seed: int) -> dict:
    """The speed at ``speed.batch_size``; for a list of batch sizes, at the first, with every size's measurement
    under ``by_batch_size`` (``{"1": ..., "8": ...}``)."""
    from models import adapter_for

    sp = speed_cfg
    sizes = [int(b) for b in sp.batch_size] if OmegaConf.is_list(sp.batch_size) else [int(sp.batch_size)]
    if adapter_for(model).modality == "image":  # images per second (prompt_len / new_tokens do not apply)
        runs = {str(b): measure_image_speed(model, device, b, int(sp.repeats), int(sp.warmup), seed=seed,
                                            threads=sp.get("threads")) for b in sizes}
    else:
        runs = {str(b): measure_speed(model, device, b, int(sp.prompt_len), int(sp.new_tokens), int(sp.repeats),
                                      int(sp.warmup), seed=seed, threads=sp.get("threads")) for b in sizes}
    first = dict(runs[str(sizes[0])])
    if len(runs) > 1:
        first["by_batch_size"] = runs
    return first
