"""The sweep cache (runners/reuse.py): calibration windows and OWL's outlier ratios computed once per content key
and reused by the next sweep point, with the result of a run that computes them itself; bounded; clearable."""

from __future__ import annotations

import torch

from runners.reuse import FOLDER, Reuse, main
from runners.run import execute

from .conftest import compose

COMMON = ["model=tiny-llama", "pruner=wanda", "sparsity.allocation=owl", "calib.nsamples=8", "eval.ppl.max_windows=4",
          "progress=false", "wandb.mode=disabled", "dense_baseline=false", "sweep=r"]


def test_a_second_sweep_point_reuses_windows_and_outlier_ratios_with_the_same_result(tmp_path):
    first = execute(compose(*COMMON, "sparsity.ratio=0.5", f"output_root={tmp_path}"))
    second = execute(compose(*COMMON, "sparsity.ratio=0.6", f"output_root={tmp_path}"))
    alone = execute(compose(*COMMON, "sparsity.ratio=0.6", "reuse_cache=false", f"output_root={tmp_path / 'alone'}"))
    assert first["reuse"] == {"calibration_windows": "miss", "owl_outliers": "miss"}
    assert second["reuse"] == {"calibration_windows": "hit", "owl_outliers": "hit"}
    assert "reuse" not in alone
    assert second["run_id"] == alone["run_id"]  # (the cache is not part of what a run computes)
    assert second["metrics"]["ppl"] == alone["metrics"]["ppl"] and second["sparsity"] == alone["sparsity"]
    assert second["calibration"] == alone["calibration"]
    assert len(list((tmp_path / FOLDER).glob("*/*.pt"))) == 2
    other_seed = execute(compose(*COMMON, "sparsity.ratio=0.6", "calib.seed=1", f"output_root={tmp_path}"))
    assert other_seed["reuse"] == {"calibration_windows": "miss", "owl_outliers": "miss"}  # (new windows: new keys)


def test_the_cache_is_bounded_least_recently_used_first_and_clearable(tmp_path, capsys):
    cache = Reuse(tmp_path, max_mb=1.5)
    megabyte = torch.zeros(2**18)  # 1 MiB of float32
    cache.get_or_compute("a", {"k": 1}, lambda: megabyte)
    cache.get_or_compute("a", {"k": 2}, lambda: megabyte)  # 2 MiB > 1.5: the older entry goes
    assert cache.events == {"a": "miss"} and len(list((tmp_path / FOLDER).glob("*/*.pt"))) == 1
    assert Reuse(tmp_path, max_mb=1.5).get_or_compute("a", {"k": 2}, lambda: None) is not None  # (kept: a hit)
    assert main(["clear", str(tmp_path)]) == 0 and "removed 1 entries" in capsys.readouterr().out
    assert not list((tmp_path / FOLDER).glob("*/*.pt"))
    tight = Reuse(tmp_path, max_mb=(2**20 + 16) / 2**20)  # (the tensor fits, its file does not: not kept)
    tight.get_or_compute("b", {"k": 1}, lambda: megabyte)
    assert tight.events == {"b": "too large"} and not list((tmp_path / FOLDER).glob("*/*"))


STRUCTURED = ["model=tiny-llama", "sparsity=structured", "calib.nsamples=8", "eval.ppl.max_windows=4", "progress=false",
              "wandb.mode=disabled", "dense_baseline=false", "speed.mode=never", "sweep=s"]


def test_structured_sweep_points_score_from_one_pass_with_the_same_result(tmp_path):
    """pruners/structured.py: the scoring pass (dense statistics) is shared by every ratio and allocation of a method's
    sweep; FLAP (channel moments, kept for its bias compensation) and Numerical Pruning (Grams; with
    ``compensation_inputs=dense`` the compensation uses them too) give the results of runs that pass themselves."""
    for method in (["pruner=flap"], ["pruner=numerical", "pruner.compensation_inputs=dense"]):
        first = execute(compose(*STRUCTURED, *method, "sparsity.ratio=0.2", f"output_root={tmp_path}"))
        second = execute(compose(*STRUCTURED, *method, "sparsity.ratio=0.4", "pruner.allocation=uniform",
                                 f"output_root={tmp_path}"))
        alone = execute(compose(*STRUCTURED, *method, "sparsity.ratio=0.4", "pruner.allocation=uniform",
                                "reuse_cache=false", f"output_root={tmp_path / 'alone'}"))
        assert first["reuse"]["structured_statistics"] == "miss", method
        assert second["reuse"]["structured_statistics"] == "hit", method
        assert second["run_id"] == alone["run_id"]
        assert second["structure"] == alone["structure"] and second["metrics"]["ppl"] == alone["metrics"]["ppl"]
        assert second["structure"]["parameters_after"] < first["structure"]["parameters_after"]
    # bounded: statistics larger than the whole cache are not kept, and the run is the same
    small = execute(compose(*STRUCTURED, "pruner=flap", "sparsity.ratio=0.4", "pruner.allocation=uniform",
                            "reuse_cache_max_mb=0.001", f"output_root={tmp_path / 'small'}"))
    assert small["reuse"]["structured_statistics"] == "too large"
    assert not list((tmp_path / "small" / FOLDER).glob("structured_statistics/*.pt"))
    flap_alone = execute(compose(*STRUCTURED, "pruner=flap", "sparsity.ratio=0.4", "pruner.allocation=uniform",
                                 "reuse_cache=false", f"output_root={tmp_path / 'alone'}"))  # (recorded above: read)
    assert small["metrics"]["ppl"] == flap_alone["metrics"]["ppl"] and small["structure"] == flap_alone["structure"]


def test_a_statistic_survives_the_cache():
    from pruners.stats import ChannelMoments, Hessian, statistic_from_state, statistic_state

    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 6), torch.randn(3, 6)
    for cls in (Hessian, ChannelMoments):
        whole, part = cls(6, "cpu", torch.float64), cls(6, "cpu", torch.float64)
        whole.add(x)
        part.add(x)
        again = statistic_from_state(statistic_state(part))
        assert type(again) is cls and again.count == 10 and again.dtype == torch.float64
        whole.add(y)
        again.add(y)  # (it goes on accumulating as the statistic it was)
        for name, value in vars(whole).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(again, name), value), (cls, name)
