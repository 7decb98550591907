"""``engine.activations`` (models/blocks.py: KeptBatches; docs/architecture.md §2.5): the calibration hidden states
kept in host memory or in files between a block's forwards give the very same prune as kept on the device."""

import gc

import pytest
import torch

import corpora
from models.blocks import KeptBatches, kept_batches
from pruners import Pattern, build_pruner
from pruners.settings import EngineSettings
from runners.validate import ConfigError, validate

from .conftest import compose, load_tiny


def test_kept_batches_on_disk_read_back_what_was_written_and_leave_no_file(tmp_path):
    batches = [torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    kept = kept_batches("disk", "cpu", str(tmp_path))
    for b in batches:
        kept.append(b)
    (folder,) = tmp_path.iterdir()
    assert len(kept) == 3 and len(list(folder.iterdir())) == 3
    assert all(torch.equal(a, b) for a, b in zip(kept, batches, strict=True)) and torch.equal(kept[1], batches[1])
    again = kept.new()
    again.append(batches[0])
    assert len(list(tmp_path.iterdir())) == 2
    del kept, again
    gc.collect()
    assert not any(tmp_path.iterdir())
    assert isinstance(kept_batches("host", "cpu"), KeptBatches) and kept_batches("device", "cpu") == []
    with pytest.raises(ValueError, match="engine.activations=disk needs engine.offload_dir"):
        kept_batches("disk", "cpu")


def _prune(name: str, pruner: dict, pattern: Pattern, **settings):
    loaded = load_tiny(name)
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", 6, 64, seed=0).ids
    results = build_pruner(pruner).prune(loaded.model, loaded.adapter, pattern, calib,
                                         EngineSettings(batch_size=4, progress=False, **settings))
    return loaded.model.state_dict(), results


@pytest.mark.parametrize("name,pruner,pattern", [
    ("tiny-llama", {"name": "sparsegpt"}, Pattern("unstructured", 0.5)),
    ("tiny-opt", {"name": "wanda"}, Pattern("nm", 0.5, 2, 4)),
    ("tiny-llama", {"name": "numerical"}, Pattern("structured", 0.3)),  # (a dense scoring pass, then a pruned one)
    ("tiny-mixtral", {"name": "expert_drop"}, Pattern("experts", 0.25)),
])
def test_host_and_disk_activations_prune_exactly_as_device_ones(tmp_path, monkeypatch, name, pruner, pattern):
    reads, folders = {"host": 0, "disk": 0}, []
    read, append = KeptBatches.__getitem__, KeptBatches.append

    def counted(self, index):  # (which store each forward's batch came from)
        reads["disk" if self._folder is not None else "host"] += 1
        return read(self, index)

    def written(self, tensor):  # (how many copies of the activations are on disk at once)
        append(self, tensor)
        folders.append(sum(1 for _ in tmp_path.iterdir()))

    monkeypatch.setattr(KeptBatches, "__getitem__", counted)
    monkeypatch.setattr(KeptBatches, "append", written)
    device_state, device_results = _prune(name, pruner, pattern)
    assert reads == {"host": 0, "disk": 0}
    blocks = len(load_tiny(name).adapter.blocks())
    for place in ("host", "disk") if pruner["name"] == "sparsegpt" else ("disk",):  # (host: the same store, no files)
        state, results = _prune(name, pruner, pattern, activations=place, offload_dir=str(tmp_path))
        assert state.keys() == device_state.keys() and all(torch.equal(state[k], device_state[k]) for k in state)
        assert results.keys() == device_results.keys()
        assert reads[place] >= 2 * blocks, reads  # (2 batches, at least one forward per block)
        gc.collect()
    assert folders and max(folders) <= 2, folders  # a block's inputs and its outputs, never a third copy
    gc.collect()
    assert not any(tmp_path.iterdir())  # (every block's batch files gone with the run)


@pytest.mark.parametrize("overrides,message", [
    (["engine.activations=disk"], "engine.activations=disk needs engine.offload_dir"),
    (["engine.activations=host", "pruner=goa", "sparsity=structured"],
     "engine.activations=host: pruner 'goa' keeps its own activations"),
    (["engine.activations=disk", "engine.offload_dir=/tmp/x", "pruner=surgeon"],
     "engine.activations=disk: pruner 'surgeon' keeps its own activations"),
    (["engine.activations=cloud"], "engine.activations"),
    (["engine.activations=disk", "pruner=magnitude", "sparsity.allocation=owl"],  # (OWL's pass walks the blocks)
     "engine.activations=disk needs engine.offload_dir"),
])
def test_activations_a_method_cannot_keep_off_the_device_are_refused_before_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))
    validate(compose("pruner=dense", "engine.activations=host"))  # (reads no calibration: nothing to keep)
