"""Pruning and evaluation are separate steps: a run that differs from a recorded one only in its evaluation loads
the kept pruned model (the ``cache_pruned`` cache or a ``save_model`` folder) instead of pruning again."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import corpora
from pruners import PRUNERS
from runners.prune_cache import META_FILE
from runners.record import prune_id, run_id
from runners.run import execute
from runners.validate import validate

from .conftest import compose

FAST = ["calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false", "wandb.mode=disabled"]
# enough new tokens that the decode time (a difference of two generations) cannot round to 0 on a busy CPU
SPEED = ["speed.repeats=2", "speed.new_tokens=16", "speed.prompt_len=16", "speed.batch_size=2", "speed.threads=1"]
PRUNE_TIMINGS = {"prune", "calibration_data", "allocation"}


def forbid_pruning(monkeypatch):
    """From here on, calibrating or pruning fails the test: a run that reuses kept weights does neither."""
    def boom(*args, **kwargs):
        raise AssertionError("calibrated / pruned although a kept pruned model of this prune id exists")

    monkeypatch.setattr(corpora, "calibration_windows", boom)
    for cls in PRUNERS.values():
        monkeypatch.setattr(cls, "prune", boom)


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_another_evaluation_loads_the_kept_pruned_weights(tmp_path, monkeypatch):
    common = ["model=tiny-llama", "pruner=wanda", f"output_root={tmp_path}", "sweep=a", *FAST]
    first = execute(compose(*common))
    assert first["status"] == "computed" and "pruned_from" not in first
    assert {"prune", "calibration_data"} <= set(first["timings_s"])
    cache = tmp_path / ".pruned" / first["prune_id"]
    assert first["kept_pruned"] == str(cache) and (cache / META_FILE).is_file()
    assert not list((tmp_path / ".pruned").glob(".tmp-*")), "no temporary folder is left behind"
    info = json.loads((cache / META_FILE).read_text())
    assert info["record"] == first["path"] and info["sparsity"] == first["sparsity"]
    assert json.loads(Path(first["path"]).read_text())["prune_id"] == first["prune_id"]

    # another perplexity protocol: a new run id, the same prune id; the weights come from the cache
    with monkeypatch.context() as m:
        forbid_pruning(m)
        second = execute(compose(*common, "eval.ppl.datasets=[bundled,bundled-val]"))
    assert second["status"] == "computed"
    assert second["run_id"] != first["run_id"] and second["prune_id"] == first["prune_id"]
    source = second["pruned_from"]
    assert source["kind"] == "cache" and source["path"] == str(cache) and source["prune_id"] == first["prune_id"]
    assert source["record"] == first["path"] and source["run_id"] == first["run_id"]
    assert source["timings_s"]["prune"] == first["timings_s"]["prune"], "the prune timing is the first run's"
    assert not PRUNE_TIMINGS & set(second["timings_s"]), "no fresh prune timing"
    for key in ("sparsity", "method_losses", "calibration", "model"):
        assert second[key] == first[key], key
    assert second["metrics"]["ppl"]["bundled@256"] == first["metrics"]["ppl"]["bundled@256"], "same weights, same numbers"
    assert "bundled-val@256" in second["metrics"]["ppl"]
    assert json.loads(Path(second["path"]).read_text())["pruned_from"] == source
    # its dense baseline (a new eval config) was still computed, from the unpruned model
    dense = [json.loads(p.read_text()) for p in (tmp_path / "a").glob("*_dense_*/result.json")]
    (dense,) = [d for d in dense if "bundled-val@256" in d["metrics"]["ppl"]]
    assert dense["sparsity"]["overall"] < 0.01 < second["sparsity"]["overall"]

    # force=true prunes again; save_model keeps that model instead of the cache: bit-identical weights
    third = execute(compose(*common, "sweep=b", "force=true", "save_model=true"))
    assert "pruned_from" not in third and "prune" in third["timings_s"] and third["prune_id"] == first["prune_id"]
    assert third["kept_pruned"] == third["saved_model"]
    assert_same_weights(weights(cache), weights(third["saved_model"]))
    assert third["metrics"]["ppl"]["bundled@256"] == first["metrics"]["ppl"]["bundled@256"]

    # without the cache, the saved model of sweep b serves a run of sweep c
    shutil.rmtree(cache)
    with monkeypatch.context() as m:
        forbid_pruning(m)
        fourth = execute(compose(*common, "sweep=c", "eval.ppl.max_windows=3"))
    assert fourth["pruned_from"]["kind"] == "saved_model"
    assert fourth["pruned_from"]["path"] == third["saved_model"] and fourth["pruned_from"]["run_id"] == third["run_id"]
    assert not (tmp_path / ".pruned" / first["prune_id"]).exists(), "a reused model is not cached again"


def test_a_structured_model_round_trips_with_its_shapes(tmp_path, monkeypatch):
    common = ["model=tiny-llama", "pruner=flap", "sparsity=structured", f"output_root={tmp_path}", "sweep=s",
              "dense_baseline=false", *FAST, *SPEED]
    first = execute(compose(*common, "speed.mode=never"))
    structure = first["structure"]
    assert structure["parameters_after"] < structure["parameters_before"] and "speed" not in first["metrics"]
    cache = Path(first["kept_pruned"])
    assert cache.parent == tmp_path / ".pruned"

    # another evaluation (the speed ratio): the dense model is loaded for its speed, the pruned one from the cache
    with monkeypatch.context() as m:
        forbid_pruning(m)
        second = execute(compose(*common, "speed.mode=always"))
    assert second["pruned_from"]["path"] == str(cache) and second["prune_id"] == first["prune_id"]
    assert second["structure"] == structure and second["sparsity"] == first["sparsity"]
    speed = second["metrics"]["speed"]
    assert speed["pruned"]["parameters"] == structure["parameters_after"]
    assert speed["dense"]["parameters"] == structure["parameters_before"]
    assert second["metrics"]["ppl"] == first["metrics"]["ppl"]


def _config(*overrides):
    cfg = compose(*overrides)
    return OmegaConf.to_container(cfg, resolve=True), validate(cfg, check_model=False)


def test_the_prune_id_covers_what_determines_the_weights_and_nothing_else():
    base, plan = _config("pruner=wanda")
    pid, rid = prune_id(base, plan.calibrates), run_id(base, calibrates=plan.calibrates)
    for override in ("eval.ppl.max_windows=3", "eval.ppl.datasets=[bundled,bundled-val]", "eval=tiny-zeroshot",
                     "speed.mode=always", "save_model=true"):
        config, plan = _config("pruner=wanda", override)
        assert prune_id(config, plan.calibrates) == pid, override
        assert run_id(config, calibrates=plan.calibrates) != rid, f"{override} changes the numbers"
    for override in ("cache_pruned=never", "cache_pruned_max_params=5", "sweep=x", "force=true", "output_root=/x"):
        config, plan = _config("pruner=wanda", override)
        assert prune_id(config, plan.calibrates) == pid and run_id(config, calibrates=plan.calibrates) == rid, override
    for override in ("pruner.group=matrix", "seed=1", "calib.nsamples=16", "calib.seed=1", "sparsity.ratio=0.6",
                     "sparsity=2of4", "engine.stats_dtype=float64", "model.dtype=float32", "model=tiny-llama"):
        config, plan = _config("pruner=wanda", override)
        assert prune_id(config, plan.calibrates) != pid, override
    # a method without calibration does not depend on the calibration data
    mag, plan = _config("pruner=magnitude")
    assert not plan.calibrates
    assert prune_id(_config("pruner=magnitude", "calib.nsamples=16")[0], False) == prune_id(mag, False)


def test_another_pruner_config_or_seed_prunes_again_and_cache_pruned_decides_what_is_kept(tmp_path):
    common = ["model=tiny-opt", "pruner=magnitude", f"output_root={tmp_path}", "sweep=m", "dense_baseline=false", *FAST]
    first = execute(compose(*common))
    assert first["kept_pruned"] is not None
    for override in ("seed=1", "pruner.group=row"):
        other = execute(compose(*common, override))
        assert other["prune_id"] != first["prune_id"] and "pruned_from" not in other and "prune" in other["timings_s"]
    reused = execute(compose(*common, "eval.ppl.max_windows=3"))
    assert reused["pruned_from"]["prune_id"] == first["prune_id"]

    # never, or auto over the parameter limit: nothing is kept, and the next evaluation prunes again
    for keep in (["cache_pruned=never"], ["cache_pruned=auto", "cache_pruned_max_params=1000"]):
        root = tmp_path / keep[-1].replace("=", "-")
        args = [*common, f"output_root={root}", *keep]
        once = execute(compose(*args))
        assert once["kept_pruned"] is None and not (root / ".pruned").exists()
        again = execute(compose(*args, "eval.ppl.max_windows=3"))
        assert "pruned_from" not in again and "prune" in again["timings_s"]
    always = execute(compose(*common, f"output_root={tmp_path / 'always'}", "cache_pruned=always",
                             "cache_pruned_max_params=1000"))
    assert always["kept_pruned"] == str(tmp_path / "always" / ".pruned" / always["prune_id"])


@pytest.mark.parametrize("field", ["prune_id", "format"])
def test_a_cache_that_does_not_match_is_not_used(tmp_path, field):
    common = ["model=tiny-opt", "pruner=magnitude", f"output_root={tmp_path}", "sweep=x", "dense_baseline=false", *FAST]
    first = execute(compose(*common))
    meta = Path(first["kept_pruned"]) / META_FILE
    info = json.loads(meta.read_text())
    info[field] = "something else"
    meta.write_text(json.dumps(info))
    again = execute(compose(*common, "eval.ppl.max_windows=3"))
    assert "pruned_from" not in again and "prune" in again["timings_s"]
    assert json.loads(meta.read_text())["prune_id"] == first["prune_id"], "the pruning run replaced the bad cache"
