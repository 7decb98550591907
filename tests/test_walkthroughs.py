"""The walk-throughs in docs/ (adding a method, adding a model family) run as written: their code blocks are taken
from the pages themselves, loaded as the files they describe, and put through the checks the pages promise."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import models
import pruners
from pruners import PRUNERS, Pattern, build_pruner, prune_sequential
from pruners.masks import MaskState, satisfies_n_of_m
from pruners.settings import EngineSettings

from .test_seam import random_ids, random_model

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUIET = EngineSettings(progress=False, batch_size=2)


def code_block(page: str, heading: str, language: str) -> str:
    """The first ``language`` code block under the section whose heading starts with ``heading``."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n## {heading}")
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"{page}: no {language} block under '{heading}'"
    return match.group(1)


def load_as(module_name: str, source: str):
    """Load ``source`` as the module ``module_name`` (a file of that package, relative imports included)."""
    spec = importlib.util.spec_from_loader(module_name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = module_name.rpartition(".")[0]
    sys.modules[module_name] = module
    exec(compile(source, f"<docs: {module_name}>", "exec"), module.__dict__)
    return module


@pytest.fixture
def actnorm():
    """docs/adding-a-method.md, sections 1 and 2: pruners/actnorm.py and conf/pruner/actnorm.yaml, registered for the test only."""
    try:  # (everything inside: a page that no longer loads leaves nothing registered for the other tests)
        module = load_as("pruners.actnorm", code_block("adding-a-method.md", "1.", "python"))
        config = yaml.safe_load(code_block("adding-a-method.md", "2.", "yaml"))
        yield module, config
    finally:
        PRUNERS.pop("actnorm", None)
        sys.modules.pop("pruners.actnorm", None)


def _masks(pruner, model) -> dict:
    results = pruner.prune(model, models.adapter_for(model), Pattern("unstructured", 0.5), random_ids(n=4), QUIET)
    state = MaskState.from_results(results)
    return {name: state.prune_mask(name) for name in results}


def test_the_method_walkthrough_registers_its_pruner_whose_config_repeats_its_defaults(actnorm):
    module, config = actnorm
    assert PRUNERS["actnorm"] is module.ActNorm
    defaults = {f.name: f.default for f in dataclasses.fields(module.ActNorm)}
    assert config == {"name": "actnorm", **defaults}
    with pytest.raises(ValueError, match="pruner.alpha=-1 must be >= 0"):
        build_pruner({**config, "alpha": -1}).check(Pattern("unstructured", 0.5))


@pytest.mark.parametrize("alpha, equals", [(0.0, "magnitude"), (1.0, "wanda")])
def test_the_method_walkthrough_prunes_as_its_equation_says(actnorm, alpha, equals):
    """|W| ||X||^alpha: alpha = 0 is magnitude, alpha = 1 Wanda (both per row), the same masks on a real model."""
    _, config = actnorm
    ours = _masks(build_pruner({**config, "alpha": alpha}), random_model("llama"))
    theirs = _masks(build_pruner({"name": equals, "group": "row"}), random_model("llama"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert all(abs(m.float().mean().item() - 0.5) < 1e-9 for m in ours.values())


@pytest.fixture
def neox():
    """docs/adding-a-family.md, section 2: models/gpt_neox.py, on a random tiny GPTNeoXForCausalLM (section 5)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    try:
        module = load_as("models.gpt_neox", code_block("adding-a-family.md", "2.", "python"))
        torch.manual_seed(0)
        config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64)
        model = GPTNeoXForCausalLM(config).eval()
        yield model, module.GPTNeoXAdapter(model)
    finally:
        sys.modules.pop("models.gpt_neox", None)


def test_the_family_walkthrough_adapter_gives_valid_n_m_masks_with_every_linear_grouped(neox):
    model, adapter = neox
    assert adapter.family == "gpt_neox" and "gpt_neox" in adapter.model_types
    for block in adapter.blocks():  # every linear of the block is in exactly one group
        grouped = [name for group in adapter.linear_groups(block) for name in group.names]
        linears = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        assert sorted(grouped) == sorted(linears)
    prune_sequential(model, adapter, build_pruner({"name": "wanda"}), Pattern("nm", n=2, m=4), random_ids(n=4), QUIET)
    for block in adapter.blocks():
        for group in adapter.linear_groups(block):
            for name in group.names:
                assert satisfies_n_of_m(block.get_submodule(name).weight, 2, 4)


def test_the_family_walkthrough_removing_units_equals_zeroing_them(neox):
    """Removing heads and neurons through the adapter gives the logits of zeroing what they own."""
    model, adapter = neox
    ids = random_ids(n=2)
    keep = {"attention_head": torch.tensor([0, 2, 3]), "mlp_neuron": torch.arange(0, 64, 2)}
    with torch.no_grad():
        for block in adapter.blocks():
            for group in adapter.unit_groups(block):
                dropped = torch.ones(group.count, dtype=torch.bool)
                dropped[keep[group.kind]] = False
                for path, (axis, index) in group.owned.items():
                    param = block.get_parameter(path)
                    param.index_fill_(axis, index[dropped].reshape(-1), 0.0)
        zeroed = model(input_ids=ids).logits
        for block in adapter.blocks():
            for kind, kept in keep.items():
                adapter.remove_units(block, kind, kept)
        removed = model(input_ids=ids).logits
    torch.testing.assert_close(removed, zeroed, rtol=1e-5, atol=1e-5)
    assert adapter.block_counts(adapter.blocks()[0]) == {"attention_head": 3, "mlp_neuron": 32}


def test_the_family_walkthrough_model_pruned_saves_and_reloads_with_identical_logits(neox, tmp_path, monkeypatch):
    """The gap section 5 found: transformers stores GPT-NeoX's lm_head as embed_out; reloading a pruned folder
    applies the family's load-time renames (models/checkpoint.py: loaded_names)."""
    from models import checkpoint, registry

    model, adapter = neox
    monkeypatch.setattr(registry, "ADAPTERS", (*registry.ADAPTERS, type(adapter)))  # the registry line of section 3
    adapter.remove_units(adapter.blocks()[0], "mlp_neuron", torch.arange(0, 64, 2))
    adapter.remove_units(adapter.blocks()[1], "attention_head", torch.tensor([0, 1, 3]))
    checkpoint.save_pruned(model, None, tmp_path, adapter)
    reloaded, _ = checkpoint.load_pruned(tmp_path)
    ids = random_ids(n=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_walkthrough_modules_are_not_part_of_the_package():
    """The walk-throughs' files stay in docs/ (the scratch additions were not kept)."""
    assert not (Path(pruners.__file__).parent / "actnorm.py").exists()
    assert not (Path(models.__file__).parent / "gpt_neox.py").exists()
