"""Adapters and loading: structure knowledge is right for every bundled family."""

import json

import pytest
import torch
from torch import nn

import models
from models.loading import resolve_path

from .conftest import compose, load_tiny


def test_linear_groups_cover_every_linear_of_a_block_once(tiny):
    adapter = tiny.adapter
    for block in adapter.blocks():
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        grouped = [n for g in adapter.linear_groups(block) for n in g.names]
        assert sorted(grouped) == sorted(linears)
        for group in adapter.linear_groups(block):
            widths = {block.get_submodule(n).in_features for n in group.names}
            assert len(widths) == 1  # a group shares one input


def test_prunable_parameters_exclude_embeddings_norms_and_head(tiny):
    names = set(tiny.adapter.prunable_parameter_names())
    params = dict(tiny.model.named_parameters())
    assert names <= set(params)
    for name in names:
        assert params[name].dim() == 2
        assert not any(part in name for part in ("embed", "norm", "lm_head"))


def test_unit_groups_partition_the_rows_and_columns_they_own(tiny):
    block = tiny.adapter.blocks()[0]
    for group in tiny.adapter.unit_groups(block):
        for path, (axis, index) in group.owned.items():
            param = block.get_parameter(path)
            assert index.shape[0] == group.count
            flat = index.flatten()
            assert flat.unique().numel() == flat.numel(), f"{group.kind}: {path} slices overlap"
            if group.kind != "query_head" or "o_proj" in path or "q_proj" in path:
                assert flat.numel() == param.shape[axis], f"{group.kind}: {path} not fully owned"
        assert group.params_per_unit(block) > 0


def test_llama_gqa_kv_group_owns_its_query_heads():
    loaded = load_tiny("tiny-llama")
    heads, kv_heads, head_dim = loaded.adapter.head_layout()
    assert kv_heads < heads  # the bundled model really uses GQA
    block = loaded.adapter.blocks()[0]
    kv = next(g for g in loaded.adapter.unit_groups(block) if g.kind == "kv_group")
    q_index = kv.owned["self_attn.q_proj.weight"][1]
    assert q_index.shape == (kv_heads, heads // kv_heads * head_dim)
    # zeroing the units of KV group 0 changes no output feature of the q heads of group 1
    assert q_index[1].min() == heads // kv_heads * head_dim


def test_zeroing_a_kv_group_equals_removing_its_contribution():
    """The slices a unit owns are really that unit's: zeroing them kills exactly its o_proj input."""
    loaded = load_tiny("tiny-llama")
    block = loaded.adapter.blocks()[0]
    kv = next(g for g in loaded.adapter.unit_groups(block) if g.kind == "kv_group")
    seen = []
    block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for path, (axis, index) in kv.owned.items():
            block.get_parameter(path).index_fill_(axis, index[0], 0.0)
        loaded.model(input_ids=torch.randint(0, 4000, (1, 16)))
    o_in = seen[-1]
    owned_cols = kv.owned["self_attn.o_proj.weight"][1][0]
    assert o_in[..., owned_cols].abs().max() == 0
    other = torch.ones(o_in.shape[-1], dtype=torch.bool)
    other[owned_cols] = False
    assert o_in[..., other].abs().max() > 0


def test_mamba_dt_proj_is_tapped_on_x_proj_output():
    loaded = load_tiny("tiny-mamba")
    block = loaded.adapter.blocks()[0]
    dt_group = next(g for g in loaded.adapter.linear_groups(block) if g.names == ("mixer.dt_proj",))
    assert dt_group.tap.module == "mixer.x_proj" and dt_group.tap.where == "output"
    # the installed forward really bypasses dt_proj's own forward, so a plain hook would see nothing
    calls = []
    block.mixer.dt_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    block.mixer.x_proj.register_forward_hook(lambda m, a, out: calls.append(dt_group.tap.select(a, out).shape[-1]))
    with torch.no_grad():
        loaded.model(input_ids=torch.randint(0, 4000, (1, 16)))
    assert block.mixer.dt_proj.in_features in calls


def test_load_from_a_local_directory_round_trips(tmp_path):
    loaded = load_tiny("tiny-opt")
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    cfg = compose("model=local", f"model.path={tmp_path}", "model.seqlen=256").model
    again = models.load(cfg, "cpu")
    assert again.adapter.family == "opt"
    ids = torch.randint(0, 4000, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    assert again.source["resolved_path"] == str(tmp_path)


def test_resolve_path_forms(tmp_path):
    assert resolve_path("facebook/opt-125m") == "facebook/opt-125m"  # hub id: left to transformers
    assert resolve_path("bundled:tiny-llama").endswith("models/tiny/tiny-llama")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_path(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_path("pypi:surely_not_a_package_xyz")


def test_unsupported_architecture_is_rejected_from_its_config_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(models.UnsupportedModelError, match="model_type 'gpt2' is not supported"):
        models.inspect_model(compose("model=local", f"model.path={tmp_path}").model)


def test_bundled_models_are_real_language_models():
    """Model cards: dense test perplexity far below the vocabulary and the untrained model."""
    for name in ("tiny-opt", "tiny-llama", "tiny-mamba"):
        card = json.loads((models.loading.TINY_DIR / name / "train_log.json").read_text())
        assert card["test_ppl_dense"] < card["vocab_size"] / 5
        assert card["test_ppl_dense"] < card["test_ppl_untrained"] / 5
