"""Shared fixtures. Everything runs offline on the bundled tiny models and corpus."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

# offline, and nothing written to the user's caches
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
TINY = ("tiny-opt", "tiny-llama", "tiny-mamba")


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
