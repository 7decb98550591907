"""Resumable layer-wise prunes (``engine.resume=true``, pruners/resume.py): a run killed with SIGKILL right after
block 1 is kept goes on from block 2 when started again, and ends with the same weights, masks and perplexity as a
run never stopped."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruners.resume import FAULT_VARIABLE
from runners.run import execute
from runners.validate import ConfigError, validate

from .conftest import ROOT, compose

COMMON = ["model=tiny-llama", "calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled",
          "dense_baseline=false", "save_model=true", "sweep=r"]


def weights(record_path):
    return AutoModelForCausalLM.from_pretrained(record_path.parent / "model", dtype=torch.float32).state_dict()


def killed_after_block_1(args, root, done=2):
    """Run ``args`` with ``engine.resume=true`` in a process SIGKILLed once block 1 (a method with shots: shot 1) is
    kept; its partial folder, with blocks 0 and 1 (shot 1: ``done=1``) done."""
    env = {**os.environ, FAULT_VARIABLE: "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "runners.run", *args, "engine.resume=true", f"output_root={root}"],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (partial,) = (root / "r").glob("*/partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == done
    return partial


# (Wanda: the same engine path; in memory: the structured FLAP case below restores kept weights the same way, and the
# gpus launcher test resumes SparseGPT in memory)
@pytest.mark.parametrize("pruner,onload", [("sparsegpt", True)])
def test_a_prune_killed_after_block_1_resumes_there_with_the_result_of_an_unstopped_run(pruner, onload, tmp_path):
    """(Also onloaded, engine.onload=true: the pruned blocks written before the kill stay in the partial checkpoint;
    and with the calibration batches in files, engine.activations=disk, restored into files again.)"""
    args = [*COMMON, f"pruner={pruner}", f"engine.onload={str(onload).lower()}", "engine.activations=disk",
            f"engine.offload_dir={tmp_path / 'activations'}"]
    whole = execute(compose(*COMMON, f"pruner={pruner}", f"output_root={tmp_path / 'whole'}"))  # (in memory, on the device)
    partial = killed_after_block_1(args, tmp_path / "resumed")
    assert not list(partial.parent.glob("result.json"))  # no record from a killed run
    left = set((tmp_path / "activations").iterdir())  # (a SIGKILLed process removes nothing: its batch files stay)

    logger = logging.getLogger("prunelab")  # (its own handler: whatever another test did to propagation or levels)
    seen = logging.handlers.BufferingHandler(10_000)
    was = logger.level, logger.disabled
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    try:
        resumed = execute(compose(*args, "engine.resume=true", f"output_root={tmp_path / 'resumed'}"))
    finally:
        logger.removeHandler(seen)
        logger.level, logger.disabled = was
    assert any("resuming the prune at block 2 of 4" in r.getMessage() for r in seen.buffer)
    assert not partial.exists()  # done: the kept blocks go
    assert set((tmp_path / "activations").iterdir()) == left  # (and the resumed run's batch files)
    assert resumed["run_id"] == whole["run_id"]
    assert resumed["metrics"]["ppl"] == whole["metrics"]["ppl"]
    assert resumed["sparsity"] == whole["sparsity"]
    ours = weights(tmp_path / "resumed" / "r" / resumed["run_id"] / "result.json")
    theirs = weights(tmp_path / "whole" / "r" / whole["run_id"] / "result.json")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("pruner,onload", [("flap", False), ("numerical", True), ("expert_drop", True), ("goa", False)])
def test_a_structured_prune_killed_after_block_1_resumes_there(pruner, onload, tmp_path):
    """A structured method keeps its plan (the units each block keeps, the statistics its compensation reads) before
    its first block and each block as it is done (its units removed, then its weights): started again, it skips the
    scoring pass, shrinks the done blocks as they were and goes on from block 2 (Numerical Pruning: on the stored
    inputs of the pruned blocks; GOA with the remedy: its criteria, recovery and dense streams), with the result of a
    run never stopped (onloaded too)."""
    from safetensors.torch import load_file

    args = [*COMMON, f"pruner={pruner}", "sparsity=structured", "sparsity.ratio=0.3", "speed.mode=never",
            f"engine.onload={str(onload).lower()}", "calib.nsamples=4", "eval.ppl.max_windows=2"]
    if pruner == "expert_drop":  # (whole experts of tiny-mixtral, with their router rows; no plan: one pass)
        args = [a for a in args if a not in ("sparsity=structured", "sparsity.ratio=0.3")] + \
            ["model=tiny-mixtral", "sparsity=experts", "sparsity.ratio=0.25"]
    if pruner == "goa":  # (block by block on the pruned model, three streams: no plan)
        args += ["pruner.remedy=true", "pruner.remedy_samples=4"]
    whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
    partial = killed_after_block_1(args, tmp_path / "resumed")
    assert (partial / "plan.pt").is_file() == (pruner not in ("expert_drop", "goa"))
    resumed = execute(compose(*args, "engine.resume=true", f"output_root={tmp_path / 'resumed'}"))
    assert not partial.exists()
    assert resumed["run_id"] == whole["run_id"] and resumed["structure"] == whole["structure"]
    assert resumed["metrics"]["ppl"] == whole["metrics"]["ppl"] and resumed["sparsity"] == whole["sparsity"]
    ours, theirs = ({k: v for f in sorted((root / "r" / whole["run_id"] / "model").glob("*.safetensors"))
                     for k, v in load_file(f).items()} for root in (tmp_path / "resumed", tmp_path / "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_surgeon_prune_killed_after_shot_1_resumes_there(tmp_path):
    """A method with shots (the Surgeon; K-OBD and L-OBD share its driver) keeps, after each, the weights it prunes,
    their masks and its own state: started again, it goes on with shot 2, with the result of a run never stopped."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from models.loading import TINY_DIR

    torch.manual_seed(0)  # (a small random LLaMA: the Surgeon's curvature on tiny-llama takes minutes here)
    folder = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_DIR / "tiny-llama").save_pretrained(folder)
    args = [*COMMON, "model=local", f"model.path={folder}", "model.seqlen=64", "pruner=surgeon", "pruner.shots=2",
            "calib.nsamples=4", "eval.ppl.max_windows=2"]
    whole = execute(compose(*args, f"output_root={tmp_path / 'whole'}"))
    partial = killed_after_block_1(args, tmp_path / "resumed", done=1)
    assert sorted(p.name for p in partial.glob("shot-*.pt")) == ["shot-0001.pt"]
    resumed = execute(compose(*args, "engine.resume=true", f"output_root={tmp_path / 'resumed'}"))
    assert not partial.exists()
    assert resumed["run_id"] == whole["run_id"] and resumed["sparsity"] == whole["sparsity"]
    assert resumed["metrics"]["ppl"] == whole["metrics"]["ppl"]
    ours = weights(tmp_path / "resumed" / "r" / resumed["run_id"] / "result.json")
    theirs = weights(tmp_path / "whole" / "r" / whole["run_id"] / "result.json")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_is_refused_for_methods_that_do_not_go_block_by_block():
    with pytest.raises(ConfigError, match="engine.resume=true: pruner 'llm_pruner' does not go block by block"):
        validate(compose("pruner=llm_pruner", "sparsity=structured", "engine.resume=true"))
    validate(compose("pruner=dense", "engine.resume=true"))  # (prunes nothing: nothing to resume, nothing refused)


def test_the_gpus_launcher_runs_a_job_whose_worker_died_again_and_it_resumes(tmp_path):
    """A worker killed (SIGKILL) after block 1 of its job: the launcher starts a fresh worker on the same job
    (``retries: 1``), which goes on from block 2 and records the run."""
    env = {**os.environ, FAULT_VARIABLE: "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "runners.run", "-m", "hydra/launcher=gpus", "hydra.launcher.gpus=cpu",
                           *COMMON, "pruner=sparsegpt", "engine.resume=true", f"output_root={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "exited with code -9 while running job #0; running it again (1 of 1)" in log
    assert "resuming the prune at block 2 of 4" in log
    (record,) = (tmp_path / "r").glob("*/result.json")
    assert json.loads(record.read_text())["sparsity"]["overall"] > 0.49
