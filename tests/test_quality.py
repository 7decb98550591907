"""On each bundled model, the calibration-aware methods beat magnitude at 50% (their papers' claim)."""

import pytest

import corpora
from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows
from pruners import Pattern, build_pruner, prune_sequential

from .conftest import TINY, load_tiny


@pytest.mark.parametrize("name", TINY)
def test_sparsegpt_and_wanda_beat_magnitude_at_50_percent(name):
    base = load_tiny(name)
    calib = corpora.calibration_windows(base.tokenizer, "bundled", 64, 256, seed=0).ids
    ids, _ = protocol_windows(base.tokenizer, PROTOCOLS["bundled-val"], 256, max_windows=48)
    ppl = {"dense": perplexity(base.model, base.adapter, ids, batch_size=8, progress=False)}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        loaded = load_tiny(name)
        prune_sequential(loaded.model, loaded.adapter, build_pruner({"name": pruner}), Pattern("unstructured", 0.5),
                         calib, batch_size=16, progress=False)
        ppl[pruner] = perplexity(loaded.model, loaded.adapter, ids, batch_size=8, progress=False)
    assert ppl["sparsegpt"] < ppl["magnitude"], ppl
    assert ppl["wanda"] < ppl["magnitude"], ppl
    assert ppl["dense"] < min(ppl["sparsegpt"], ppl["wanda"]), ppl
