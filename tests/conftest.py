"""Shared fixtures. Everything runs offline on the bundled tiny models and corpus."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from pruners.stats import Hessian

# offline, and nothing written to the user's caches
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# under pytest-xdist, split the cores between the workers (and the processes they start): two workers with
# two OpenMP threads each on two cores spin against each other and run several times slower
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
TINY = ("tiny-opt", "tiny-llama", "tiny-mamba", "tiny-gpt2")


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_DATASETS_CACHE"] = str(home / "datasets")
    yield


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


_LOADED: dict = {}


def load_tiny(name: str):
    """A fresh copy of a bundled tiny model (loaded once per session)."""
    import models

    if name not in _LOADED:
        _LOADED[name] = models.load(compose(f"model={name}").model, "cpu")
    base = _LOADED[name]
    model = copy.deepcopy(base.model)
    return models.LoadedModel(model, base.tokenizer, type(base.adapter)(model), base.source)


@pytest.fixture(params=TINY)
def tiny(request):
    torch.manual_seed(0)
    return load_tiny(request.param)


@pytest.fixture(scope="session")
def captured_layer():
    """(W, X): the weight of tiny-llama block 1's gate_proj and the inputs it saw on calibration text."""
    import corpora
    from models.blocks import capture_block_inputs, run_block

    loaded = load_tiny("tiny-llama")
    adapter = loaded.adapter
    ids = corpora.calibration_windows(loaded.tokenizer, "bundled", 16, 128, seed=0).ids
    inputs = capture_block_inputs(loaded.model, adapter, ids, "cpu", 8)
    inputs.batches = run_block(adapter, adapter.blocks()[0], inputs)
    block = adapter.blocks()[1]
    seen = []
    handle = block.mlp.gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    run_block(adapter, block, inputs)
    handle.remove()
    X = torch.cat(seen).double()
    return block.mlp.gate_proj.weight.detach().double().clone(), X


def layer_error(W, W_hat, X):
    return ((X @ (W - W_hat).T) ** 2).sum().item()


def hessian_of(X, dtype=torch.float32):
    stat = Hessian(X.shape[1], "cpu", dtype)
    for chunk in X.split(500):
        stat.add(chunk)
    return stat


QUALITY_CALIB = 16  # calibration windows of 256 tokens for the perplexity comparisons
QUALITY_WINDOWS = 24  # bundled validation windows of 256 tokens
_PPL: dict = {}


def pruned_ppl(name: str, pruner: str, pattern=None, *, nsamples: int = QUALITY_CALIB, **options) -> float:
    """Perplexity of a bundled model pruned by ``pruner`` with ``options`` on ``nsamples`` calibration windows, plus
    the pruner's extra windows (GOA's recovery set) drawn after them (cached per session; ``dense`` = unpruned)."""
    import corpora
    from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows
    from pruners import build_pruner
    from pruners.settings import EngineSettings

    key = (name, pruner, pattern, nsamples, tuple(sorted(options.items())))
    if key not in _PPL:
        loaded = load_tiny(name)
        if pruner != "dense":
            method = build_pruner({"name": pruner, **options})
            calib = corpora.calibration_windows(loaded.tokenizer, "bundled", nsamples + method.extra_windows(), 256,
                                                seed=0).ids
            method.prune(loaded.model, loaded.adapter, pattern, calib, EngineSettings(batch_size=16, progress=False))
        ids, _ = protocol_windows(loaded.tokenizer, PROTOCOLS["bundled-val"], 256, max_windows=QUALITY_WINDOWS)
        _PPL[key] = perplexity(loaded.model, loaded.adapter, ids, batch_size=8, progress=False)
    return _PPL[key]
