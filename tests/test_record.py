"""Run ids and atomic records."""

import json

import pytest
from omegaconf import OmegaConf

from runners.record import run_id, write_atomic

from .conftest import compose


def rid(*overrides, **flags):
    return run_id(OmegaConf.to_container(compose(*overrides), resolve=True), **flags)


def test_run_id_covers_what_changes_a_result_and_nothing_else():
    base = rid()
    assert base.startswith("tiny-opt_sparsegpt_50pct_") and base == rid()
    assert rid("sparsity.ratio=0.6") != base and rid("seed=1") != base and rid("calib.nsamples=64") != base
    assert rid("sweep=other", "output_root=/tmp/x", "progress=false", "engine.offload_dir=/tmp/spill") == base
    assert rid("engine.grad_windows=4") != base  # (the summation order of the factors)
    assert rid("sparsity=2of4").split("_")[2] == "2of4"


def test_dense_and_calibration_free_runs_ignore_what_they_do_not_use():
    dense = rid("pruner=dense", prunes=False, calibrates=False)
    assert dense.split("_")[2] == "dense"
    assert rid("pruner=dense", "sparsity=2of4", "calib.nsamples=3", prunes=False, calibrates=False) == dense
    magnitude = rid("pruner=magnitude", calibrates=False)
    assert rid("pruner=magnitude", "calib.nsamples=3", calibrates=False) == magnitude
    assert rid("pruner=magnitude", "sparsity=2of4", calibrates=False) != magnitude


class Exploding:
    def __str__(self):
        raise RuntimeError("boom")


def test_write_atomic_never_leaves_a_half_written_record(tmp_path):
    path = tmp_path / "run" / "result.json"
    write_atomic(path, {"ok": 1})
    with pytest.raises(RuntimeError, match="boom"):
        write_atomic(path, {"ok": 2, "bad": Exploding(), "pad": "x" * 100_000})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_records_are_ordinary_files_under_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "r" / "result.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r" / "result.json").stat().st_mode) == 0o644
