"""The prune step of a run: calibration windows, the allocation of the sparsity, the method itself.

Everything that decides the pruned weights happens here (given the loaded model and the validated
:class:`~runners.validate.Plan`), so that this file, and not ``runners/run.py`` (which evaluates and
records), is part of the prune fingerprint (``runners/record.py``: ``PRUNE_CODE``, ``prune_id``). A run
whose prune id matches a kept pruned model (``runners/prune_cache.py``) skips this step entirely.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

import corpora
from models.onload import ShardedBlocks, each_block, store_of
from pruners.accounting import account, shrink_section, unit_counts
from pruners.allocation import allocate
from pruners.masks import MaskState, check_masks_against_weights
from pruners.settings import EngineSettings

from .reuse import Reuse, Scoped, code_digest
from .validate import ConfigError, Plan

log = logging.getLogger("prunelab")


@dataclass
class Pruned:
    """What the prune step leaves besides the pruned model: per-module results, the allocation, calibration
    provenance, and the record's sparsity / structure sections (:func:`pruners.accounting.account`)."""

    sparsity: dict
    structure: dict | None  # structured and rowcol runs: parameters and units before / after
    calibration: dict | None
    method_losses: dict  # the method's own loss estimate per module, where it has one
    module_results: dict | None = None  # (None: the pruned weights of an earlier run, runners/prune_cache.py)
    ratios: object | None = None  # pruners.allocation's per-linear ratios (None: uniform, or not pruning)


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # the SparseGPT reference disables TF32: it perturbs Cholesky / solves (docs/methods.md §12)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _timed(timings: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    timings[key] = round(now - start, 3)
    return now


def prune(cfg, plan: Plan, loaded, timings: dict, on_shot=None, run_dir: Path | None = None, prune_id: str = "",
          reuse: Reuse | None = None, identity: dict | None = None) -> Pruned:
    """Prune ``loaded.model`` in place as ``cfg`` / ``plan`` say, then measure what it did; phase times go to
    ``timings`` (``calibration_data``, ``allocation``, ``prune``, ``shrink``). ``on_shot(shot, shots, calibration)``
    (:func:`runners.results.shot_recorder`): called by a multi-shot method after each shot but the last
    (:class:`pruners.settings.EngineSettings`); its evaluation time (``on_shot.eval_s``) is not pruning time.
    ``run_dir`` (a run that writes its record): ``engine.resume`` keeps each pruned block of a layer-wise method in
    ``<run_dir>/partial`` (:mod:`pruners.resume`; the folder goes once the prune is done); an onloaded model
    (``engine.onload``, :mod:`models.onload`) writes its pruned blocks to ``<run_dir>/partial/model``, moved to
    ``<run_dir>/model`` once complete, from which it is read from then on. ``reuse`` (with the run's ``identity``):
    the sweep cache of calibration windows and OWL's outlier ratios (runners/reuse.py)."""
    model, adapter = loaded.model, loaded.adapter
    prunes = plan.pruner.removes_weights
    before = unit_counts(model, adapter, plan.pattern.unit_scope) if prunes and plan.pattern.removes_units else None
    t = time.perf_counter()
    calib_ids, calibration = None, None
    if plan.calibrates:
        nsamples = int(cfg.calib.nsamples) + plan.pruner.extra_windows()
        if cfg.calib.source == "generated":  # an image generator's own samples (docs/imagegen.md §3)
            from corpora.generated import generated_windows

            windows = generated_windows(model, nsamples, plan.calib_seqlen, int(cfg.calib.seed), cfg.calib.generate,
                                        bool(cfg.progress), plan.device)
        else:
            def sample():
                found = corpora.calibration_windows(
                    loaded.tokenizer, cfg.calib.source, nsamples, plan.calib_seqlen, int(cfg.calib.seed),
                    path=cfg.calib.get("path"), dataset_root=cfg.calib.get("dataset_root"))
                return {"ids": found.ids, "provenance": found.provenance}

            if reuse is not None:  # (every sweep point of this model and calibration set: sampled once)
                from .reuse import tokenizer_digest

                parts = {"calib": OmegaConf.to_container(cfg.calib, resolve=True), "nsamples": nsamples,
                         "seqlen": plan.calib_seqlen, "tokenizer": tokenizer_digest(loaded.tokenizer),
                         "data": (identity or {}).get("data", {}).get("calib"),
                         "versions": (identity or {}).get("versions"), "code": code_digest(("corpora/__init__.py",))}
                found = reuse.get_or_compute("calibration_windows", parts, sample)
            else:
                found = sample()
            windows = corpora.Windows(found["ids"], found["provenance"])
        calib_ids, calibration = windows.ids, windows.provenance
        t = _timed(timings, "calibration_data", t)
    settings = EngineSettings.from_config(cfg.engine, plan.device, bool(cfg.progress))
    if on_shot is not None:
        settings = dataclasses.replace(settings, on_shot=lambda shot, shots: on_shot(shot, shots, calibration))
    store = store_of(model)
    if run_dir is not None and cfg.engine.get("resume") and plan.pruner.resumable():
        # (the key names onloading too: kept blocks are in memory files or in the partial checkpoint)
        key = f"{prune_id}{'+onload' if store.onloaded else ''}"
        settings = dataclasses.replace(settings, resume_dir=str(run_dir / "partial"), resume_key=key)
    try:  # a target glob that selects nothing, an OWL sparsity >= 1: bad input, found once the model is known
        cached = None
        if reuse is not None and calibration is not None:  # (the dense model's statistics: shared by the sweep)
            adapter_files = sorted({inspect.getfile(c) for c in type(adapter).__mro__  # (the family's file and the
                                    if c.__module__.startswith("models.")})  # adapters it builds on)
            base = {"checkpoint": (identity or {}).get("checkpoint"), "resolved": (identity or {}).get("resolved"),
                    "versions": (identity or {}).get("versions"), "tokens": calibration.get("tokens_sha256"),
                    "batch_size": settings.batch_size,
                    "code": code_digest(("pruners/allocation.py", "pruners/stats.py", "pruners/engine.py",
                                         "models/blocks.py", "models/base.py", *adapter_files))}
            cached = Scoped(reuse, base)
            if reuse.enabled and not store.onloaded:  # (a method's own dense statistics: a structured scoring pass)
                settings = dataclasses.replace(settings, reuse=cached)
        ratios = allocate(model, adapter, plan.pruner, plan.pattern, plan.allocation, calib_ids, settings,
                          reuse=cached.get_or_compute if cached is not None else None) if prunes else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if ratios is not None:
        t = _timed(timings, "allocation", t)
    if store.onloaded and prunes:  # the pruned blocks, written out one by one (after allocation's dense passes)
        if run_dir is None:
            raise ValueError("an onloaded model prunes into a run folder (engine.onload=true needs a written run)")
        store = model.prunelab_blocks = ShardedBlocks(store.source, store.prefix, run_dir / "partial" / "model",
                                                      read_prefix=store.read_prefix, adapter=store.adapter)
    module_results = plan.pruner.prune(model, adapter, plan.pattern, calib_ids if plan.pruner.needs_calibration else None,
                                       settings, ratios)
    if store.onloaded and prunes:  # complete the pruned checkpoint, read the blocks from it from now on
        store.finish(model, loaded.tokenizer)
        if plan.pattern.removes_units:  # (experts removed: the structure file, as save_pruned writes it)
            from models.checkpoint import write_structure

            write_structure(store.target, adapter)
        final = run_dir / "model"
        if final.exists():
            shutil.rmtree(final)
        os.replace(store.target, final)
        model.prunelab_blocks = ShardedBlocks(final, store.prefix, adapter=store.adapter)
    _timed(timings, "prune", t)
    if settings.resume_dir is not None or (store.onloaded and prunes):  # done: the kept blocks are not needed
        shutil.rmtree(run_dir / "partial", ignore_errors=True)
    if getattr(on_shot, "eval_s", 0.0):
        timings["prune"] = round(timings["prune"] - on_shot.eval_s, 3)
        timings["shot_evals"] = round(on_shot.eval_s, 3)
    masks = MaskState.from_results(module_results)
    prefix = adapter.blocks_prefix()
    for index, block in each_block(adapter) if masks.masks else ():  # every removed weight is zero (onloaded: one
        # block at a time; a run with no masks, e.g. whole experts removed, reads none)
        inside, own = f"{prefix}.{index}.", MaskState()
        own.masks = {n[len(inside):]: m for n, m in masks.masks.items() if n.startswith(inside)}
        check_masks_against_weights(block, own)
    structure, sparsity = account(model, adapter, plan.pattern, plan.allocation, prunes, before, module_results, ratios)
    if prunes and plan.pattern.kind == "rowcol":  # zeroed rows / columns that free whole units: cut out
        t = time.perf_counter()
        structure = shrink_section(model, adapter)
        _timed(timings, "shrink", t)
    if sparsity.get("warning"):
        log.warning("%s", sparsity["warning"])
    losses = {name: r.loss for name, r in module_results.items() if r.loss is not None}
    return Pruned(sparsity, structure, calibration, losses, module_results, ratios)
