"""CUDA paths (skipped without a GPU): the engine and perplexity agree with the CPU."""

import pytest
import torch

import corpora
from evaluators.ppl import perplexity
from pruners import Pattern, build_pruner, prune_sequential
from pruners.settings import EngineSettings

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
                         ids, EngineSettings(device=device, progress=False))
        assert next(loaded.model.parameters()).device.type == "cpu"  # blocks go back to the host
        results[device] = perplexity(loaded.model, loaded.adapter, ids[:4], device=device, mode="sequential",
                                     progress=False)
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-2)


@pytest.mark.parametrize("pruner", ["numerical", "flap"])
def test_structured_pruning_on_cuda_matches_cpu(pruner):
    """Scores, compensation and removal on the GPU keep the same units and give the same perplexity."""
    torch.backends.cuda.matmul.allow_tf32 = False
    kept, ppl = {}, {}
    for device in ("cpu", "cuda"):
        loaded = load_tiny("tiny-llama")
        ids = corpora.calibration_windows(loaded.tokenizer, "bundled", 16, 128, seed=0).ids
        results = build_pruner({"name": pruner}).prune(loaded.model, loaded.adapter, Pattern("structured", 0.3), ids,
                                                       EngineSettings(device=device, progress=False))
        assert next(loaded.model.parameters()).device.type == "cpu"
        kept[device] = {name: r.kept_units for name, r in results.items()}
        ppl[device] = perplexity(loaded.model, loaded.adapter, ids[:4], device=device, progress=False)
    assert kept["cuda"] == kept["cpu"]
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-2)


def test_speed_measurement_runs_on_cuda():
    from evaluators.speed import measure_speed

    loaded = load_tiny("tiny-llama")
    speed = measure_speed(loaded.model, "cuda", batch_size=2, prompt_len=16, new_tokens=4, repeats=2)
    assert speed["peak_device_mb"] > 0 and speed["decode_ms_per_token"] > 0
    assert next(loaded.model.parameters()).device.type == "cpu"
