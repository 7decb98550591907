"""Resumable layer-wise and structured prunes (docs/architecture.md §1.1): after each block, what a run killed there needs to go on
from the next one, kept in a folder (``engine.resume`` on: ``<run folder>/partial``):

- ``block-<k>.pt``: block k's pruned weights (its state dict) and the per-linear results (masks as bits);
- ``inputs-<k>.pt``: the hidden states entering block k (the kwargs are captured again: they depend on the
  windows only);
- ``progress.json``: how many blocks are done, for which run (``key``), written last, by rename;
- ``plan.pt``: a structured method's decision before its first block is pruned (the units each block keeps, the
  statistics its compensation reads), so that a resumed run skips the scoring pass;
- ``shot-<t>.pt`` (a whole-model method with shots: the Surgeon, K-OBD, L-OBD, instead of the block files): after
  shot t, the weights of the linears it prunes, their masks and the method's own state; ``progress.json`` counts
  shots.

A run started again with the same folder and key loads the done blocks into the model and the inputs of the next,
and goes on from there: the same weights and masks as a run that was never stopped (the engine is deterministic on
the same inputs). Each file is written to a temporary name and renamed, so a kill at any moment leaves either the
previous state or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import torch

from models.base import add_bias

from .masks import PackedMask

log = logging.getLogger("prunelab")
# fault injection for the kill-and-resume tests: SIGKILL this process once block k (a method with shots: shot k) is
# kept (a run that resumed is not killed again)
FAULT_VARIABLE = "PRUNELAB_KILL_AFTER_BLOCK"


def _write(path: Path, save) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save(tmp)
    os.replace(tmp, path)


def _result_state(result) -> dict:
    state = {"pruned": result.pruned, "total": result.total, "loss": result.loss, "unit_kind": result.unit_kind,
             "kept_units": result.kept_units, "uncalibrated": result.uncalibrated, "mask": None}
    if result.mask is not None:
        state["mask"] = {"bits": result.mask.bits, "shape": list(result.mask.shape), "pruned": result.mask.pruned}
    return state


def _result(state: dict):
    from .base import ModuleResult

    mask = state.pop("mask")
    if mask is not None:
        mask = PackedMask(mask["bits"], tuple(mask["shape"]), mask["pruned"])
    return ModuleResult(**state, mask=mask)


class BlockProgress:
    """The kept state of one run's layer-wise prune, in ``folder``; ``key`` names the run (its prune id)."""

    def __init__(self, folder: str | Path, key: str, blocks: int):
        self.folder, self.key, self.blocks = Path(folder), str(key), blocks
        self.resumed = False

    def _progress(self) -> dict | None:
        path = self.folder / "progress.json"
        if not path.is_file():
            return None
        progress = json.loads(path.read_text())
        if progress.get("key") != self.key or progress.get("blocks") != self.blocks:
            log.warning("%s holds the progress of another run (%s): starting from block 0", self.folder,
                        progress.get("key"))
            return None
        return progress

    def restore(self, model_blocks, adapter=None) -> tuple[int, list[torch.Tensor] | None, dict]:
        """``(first block to prune, its input batches or None, the results of the done blocks)``, the done blocks'
        pruned weights loaded into ``model_blocks``; ``(0, None, {})`` when there is nothing to resume. Units a done
        block lost (a structured method's results: ``unit_kind``, ``kept_units``) are removed from it first, through
        ``adapter``, so that its shapes are the pruned ones (also for an onloaded block, still on ``meta``)."""
        progress = self._progress()
        if progress is None or progress["done"] == 0:
            return 0, None, {}
        done, results = progress["done"], {}
        for index in range(done):
            kept = torch.load(self.folder / f"block-{index:04d}.pt", weights_only=True)
            block_results = {name: _result(state) for name, state in kept["results"].items()}
            for result in block_results.values():  # (in the order they were removed: coarse units first)
                if result.kept_units is not None and result.unit_kind is not None and adapter is not None:
                    kept_units = torch.tensor(result.kept_units, dtype=torch.long)
                    if result.unit_kind == "expert":  # (pruners/expert_drop.py: whole experts and their router rows)
                        adapter.remove_experts(model_blocks[index], kept_units)
                    elif len(result.kept_units) < result.total:
                        adapter.remove_units(model_blocks[index], result.unit_kind, kept_units)
            for name in kept.get("added_biases", []):  # (FLAP's compensation gave these linears a bias)
                add_bias(model_blocks[index].get_submodule(name))
            if kept["state"]:  # (an onloaded model's pruned blocks are in its pruned checkpoint already)
                model_blocks[index].load_state_dict(kept["state"])
            results.update(block_results)
        inputs_path = self.folder / f"inputs-{done:04d}.pt"
        # (memory-mapped: with engine.activations=disk the batches go to their own files one by one)
        batches = torch.load(inputs_path, weights_only=True, mmap=True) if inputs_path.is_file() else None
        log.info("resuming the prune at block %d of %d (%s)", done, self.blocks, self.folder)
        self.resumed = True
        return done, batches, results

    def save_plan(self, plan: dict) -> None:
        """Keep what the prune decided before its first block (a structured method: the units each block keeps and
        the statistics its compensation reads), so that a resumed run does not score again."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write(self.folder / "plan.pt", lambda p: torch.save({"key": self.key, "blocks": self.blocks, **plan}, p))

    def plan(self) -> dict | None:
        """The plan :meth:`save_plan` kept for this run, or None."""
        path = self.folder / "plan.pt"
        if not path.is_file():
            return None
        plan = torch.load(path, weights_only=True)
        if plan.pop("key") != self.key or plan.pop("blocks") != self.blocks:
            return None
        log.info("resuming with the kept scoring pass (%s)", path)
        return plan

    def save(self, index: int, block, results: dict, next_batches: list[torch.Tensor] | None,
             with_weights: bool = True) -> None:
        """Keep block ``index`` (pruned; its weights unless ``with_weights`` is False: an onloaded model writes them to
        its pruned checkpoint anyway), its results and the next block's inputs; then mark it done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = block.state_dict() if with_weights else {}
        state = {"state": {k: v.detach().cpu() for k, v in weights.items()},
                 "results": {name: _result_state(r) for name, r in results.items()},
                 "added_biases": [n for n, m in block.named_modules() if getattr(m, "prunelab_added_bias", False)]}
        _write(self.folder / f"block-{index:04d}.pt", lambda p: torch.save(state, p))
        if next_batches is not None:
            # (batches kept off the device are taken where they are kept: files memory-mapped, not all in memory)
            batches = [b.detach().cpu() for b in getattr(next_batches, "on_host", lambda: next_batches)()]
            _write(self.folder / f"inputs-{index + 1:04d}.pt", lambda p: torch.save(batches, p))
        progress = {"key": self.key, "blocks": self.blocks, "done": index + 1}
        _write(self.folder / "progress.json", lambda p: p.write_text(json.dumps(progress)))
        (self.folder / f"inputs-{index:04d}.pt").unlink(missing_ok=True)  # (the inputs it was pruned on)
        if os.environ.get(FAULT_VARIABLE) == str(index) and not self.resumed:  # (a run that resumed: not again)
            os.kill(os.getpid(), signal.SIGKILL)


def resume_walk(model, adapter, settings) -> tuple[int, list[torch.Tensor] | None, dict, object]:
    """For a driver that prunes block by block through ``walk_blocks``: ``(first block, its input batches, the done
    blocks' results, after_block)``, where ``after_block(index, block, next_batches)`` keeps block ``index`` done with
    its entries of the results dict returned here (the driver fills it as it goes). Without ``settings.resume_dir``:
    ``(0, None, {}, None)``."""
    if settings.resume_dir is None:
        return 0, None, {}, None
    from models.onload import store_of

    progress = BlockProgress(settings.resume_dir, settings.resume_key, len(adapter.blocks()))
    start, batches, results = progress.restore(adapter.blocks(), adapter)
    prefix, onloaded = f"{adapter.blocks_prefix()}.", store_of(model).onloaded

    def after_block(index, block, next_batches) -> None:
        done = {name: r for name, r in results.items() if name.startswith(f"{prefix}{index}.")}
        progress.save(index, block, done, next_batches, with_weights=not onloaded)

    return start, batches, results, after_block


def resume_shots(settings, shots: int) -> tuple[int, dict | None, object]:
    """For a whole-model method that prunes in ``shots`` shots: ``(first shot to run, the state kept after the shot
    before it or None, after_shot)``, where ``after_shot(shot, state)`` keeps ``state`` (a dict of tensors, lists,
    numbers) once ``shot`` is done. Without ``settings.resume_dir``: ``(1, None, None)``. A kill between a shot's
    file and its progress leaves the previous shot's pair, which a resumed run takes."""
    if settings.resume_dir is None:
        return 1, None, None
    progress = BlockProgress(settings.resume_dir, settings.resume_key, shots)
    kept = progress._progress()
    first, state = 1, None
    if kept is not None and kept["done"] > 0:
        first = kept["done"] + 1
        state = torch.load(progress.folder / f"shot-{kept['done']:04d}.pt", weights_only=True)
        log.info("resuming the prune at shot %d of %d (%s)", first, shots, progress.folder)
        progress.resumed = True

    def after_shot(shot: int, state: dict) -> None:
        progress.folder.mkdir(parents=True, exist_ok=True)
        _write(progress.folder / f"shot-{shot:04d}.pt", lambda p: torch.save(state, p))
        _write(progress.folder / "progress.json",
               lambda p: p.write_text(json.dumps({"key": progress.key, "blocks": shots, "done": shot})))
        (progress.folder / f"shot-{shot - 1:04d}.pt").unlink(missing_ok=True)
        if os.environ.get(FAULT_VARIABLE) == str(shot) and not progress.resumed:  # (the kill-and-resume tests)
            os.kill(os.getpid(), signal.SIGKILL)

    return first, state, after_shot


def pack_masks(masks: dict[str, PackedMask]) -> dict:
    """Masks as plain tensors and numbers (what ``torch.load(weights_only=True)`` reads back)."""
    return {name: {"bits": m.bits, "shape": list(m.shape), "pruned": m.pruned} for name, m in masks.items()}


def unpack_masks(packed: dict) -> dict[str, PackedMask]:
    return {name: PackedMask(m["bits"], tuple(m["shape"]), m["pruned"]) for name, m in packed.items()}
