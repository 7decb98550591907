"""Resumable layer-wise prunes (``engine.resume=true``, pruners/resume.py): a run killed with SIGKILL right after
block 1 is kept goes on from block 2 when started again, and ends with the same weights, masks and perplexity as a
run never stopped."""

from __future__ import annotations

import json
import logging
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


@pytest.mark.parametrize("pruner,onload", [("sparsegpt", False), ("wanda", False), ("sparsegpt", True)])
def test_a_prune_killed_after_block_1_resumes_there_with_the_result_of_an_unstopped_run(pruner, onload, tmp_path,
                                                                                       caplog):
    """(Also onloaded, engine.onload=true: the pruned blocks written before the kill stay in the partial checkpoint.)"""
    args = [*COMMON, f"pruner={pruner}", f"engine.onload={str(onload).lower()}"]
    whole = execute(compose(*args[:-1], f"output_root={tmp_path / 'whole'}"))  # (in memory, not resumable: as usual)
    env = {**os.environ, FAULT_VARIABLE: "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "runners.run", *args, "engine.resume=true",
                             f"output_root={tmp_path / 'resumed'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    (partial,) = (tmp_path / "resumed" / "r").glob("*/partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 2
    assert not list(partial.parent.glob("result.json"))  # no record from a killed run

    with caplog.at_level(logging.INFO, logger="prunelab"):
        resumed = execute(compose(*args, "engine.resume=true", f"output_root={tmp_path / 'resumed'}"))
    assert "resuming the prune at block 2 of 4" in caplog.text
    assert not partial.exists()  # done: the kept blocks go
    assert resumed["run_id"] == whole["run_id"]
    assert resumed["metrics"]["ppl"] == whole["metrics"]["ppl"]
    assert resumed["sparsity"] == whole["sparsity"]
    ours = weights(tmp_path / "resumed" / "r" / resumed["run_id"] / "result.json")
    theirs = weights(tmp_path / "whole" / "r" / whole["run_id"] / "result.json")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_resume_is_refused_for_methods_that_do_not_go_block_by_block():
    with pytest.raises(ConfigError, match="engine.resume=true: pruner 'surgeon' does not go block by block"):
        validate(compose("pruner=surgeon", "engine.resume=true"))
    validate(compose("pruner=dense", "engine.resume=true"))  # (prunes nothing: nothing to resume, nothing refused)
