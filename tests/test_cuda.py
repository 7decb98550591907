"""CUDA paths (skipped without a GPU): the engine and perplexity agree with the CPU."""

import pytest
import torch

import corpora
from evaluators.ppl import perplexity
from pruners import Pattern, build_pruner, prune_sequential

from .conftest import TINY, load_tiny

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", TINY)
def test_engine_on_cuda_matches_cpu(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for device in ("cpu", "cuda"):
        loaded = load_tiny(name)
        ids = corpora.calibration_windows(loaded.tokenizer, "bundled", 16, 128, seed=0).ids
        prune_sequential(loaded.model, loaded.adapter, build_pruner({"name": "sparsegpt"}), Pattern("nm", 0.5, 2, 4),
                         ids, device=device, progress=False)
        assert next(loaded.model.parameters()).device.type == "cpu"  # blocks go back to the host
        results[device] = perplexity(loaded.model, loaded.adapter, ids[:4], device=device, mode="sequential",
                                     progress=False)
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-2)
