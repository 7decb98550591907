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
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1}))
    with pytest.raises(models.UnsupportedModelError, match="model_type 'bert' is not supported"):
        models.inspect_model(compose("model=local", f"model.path={tmp_path}").model)


def test_bundled_models_are_real_language_models():
    """Model cards: dense test perplexity far below the vocabulary and the untrained model."""
    for name in ("tiny-opt", "tiny-llama", "tiny-mamba", "tiny-gpt2", "tiny-qwen3", "tiny-mixtral"):
        card = json.loads((models.loading.TINY_DIR / name / "train_log.json").read_text())
        assert card["test_ppl_dense"] < card["vocab_size"] / 5
        assert card["test_ppl_dense"] < card["test_ppl_untrained"] / 5


def test_gpt2_conv1d_projections_become_linears_computing_the_same_function():
    """GPT-2's Conv1D ([in, out] weights) become nn.Linear ([out, in]) when the adapter meets the model: same
    logits, every projection a linear of its group, modules kept by a second adapter; native_state gives back the
    checkpoint's state dict bit for bit (and from_native_state inverts it)."""
    from transformers.pytorch_utils import Conv1D

    from .test_seam import random_ids, random_model

    model = random_model("gpt2")
    native = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids(n=2, seqlen=10)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        adapter = models.adapter_for(model)
        assert not any(isinstance(m, Conv1D) for m in model.modules())
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    block = adapter.blocks()[0]
    assert block.attn.c_attn.weight.shape == (3 * 32, 32) and block.mlp.c_proj.weight.shape == (32, 64)
    c_attn = block.attn.c_attn
    models.adapter_for(model)  # a second adapter over the same model swaps nothing
    assert block.attn.c_attn is c_attn
    state = adapter.native_state(model.state_dict())
    assert state.keys() == native.keys() and all(torch.equal(v, state[k]) for k, v in native.items())
    back = adapter.from_native_state(state)
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())


def test_gpt2_head_owns_its_query_key_and_value_rows_of_the_fused_projection():
    """Zeroing head 1's slices of c_attn zeroes exactly its columns of c_proj's input (the heads' outputs)."""
    from .test_seam import random_ids, random_model

    model = random_model("gpt2")
    adapter = models.adapter_for(model)
    block = adapter.blocks()[0]
    heads = adapter.unit_group(block, "attention_head")
    rows = heads.owned["attn.c_attn.weight"][1][1]
    assert rows.tolist() == [*range(8, 16), *range(40, 48), *range(72, 80)]  # q, k and v thirds, head_dim 8
    seen = []
    block.attn.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        block.attn.c_attn.weight[rows[16:]] = 0  # its value rows and biases: a silent head
        block.attn.c_attn.bias[rows[16:]] = 0
        model(input_ids=random_ids(n=1, seqlen=10))
    assert seen[-1][..., 8:16].abs().max() == 0 and seen[-1][..., :8].abs().max() > 0
    assert adapter.zero_output_units(block, heads).tolist() == [False, True, False, False]


def test_gpt2_pruned_checkpoint_is_an_ordinary_gpt2_checkpoint(tmp_path):
    """Units removed, saved, reloaded: identical logits; the file holds Conv1D-layout weights; without a head
    removed, plain from_pretrained reads it back (n_inner in config.json)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .test_seam import random_ids, random_model

    ids = random_ids(n=2, seqlen=10)
    for heads_kept, plain in ((torch.tensor([0, 2, 3]), False), (torch.arange(4), True)):
        model = random_model("gpt2")
        adapter = models.adapter_for(model)
        for block in adapter.blocks():
            adapter.remove_units(block, "attention_head", heads_kept)
            adapter.remove_units(block, "mlp_neuron", torch.arange(0, 64, 2))
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        folder = tmp_path / f"heads{len(heads_kept)}"
        structure = models.save_pruned(model, None, folder, adapter)
        assert structure["plain_from_pretrained"] is plain
        weights = load_file(str(folder / "model.safetensors"))
        assert weights["transformer.h.0.attn.c_attn.weight"].shape == (32, 3 * 8 * len(heads_kept))  # [in, out]
        assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (32, 32)
        again = models.load(compose("model=local", f"model.path={folder}", "model.tokenizer=bundled:tiny-opt").model)
        with torch.no_grad():
            torch.testing.assert_close(again.model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        if plain:
            hf = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                torch.testing.assert_close(hf(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_llama_3_1_rope_scaling_from_a_hub_style_config_loads(tmp_path):
    """Llama-3.1's config.json (``rope_scaling`` of type llama3, ``rope_theta`` 500000) loads with the scaled
    rotary frequencies of Meta's formula, not the plain ones (the llama-3.1-8b model config)."""
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_type": "llama3"}
    LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
                     ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_scaling=scaling, rope_theta=500000.0)  # as meta-llama/Llama-3.1-8B writes it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = models.load(compose("model=local", f"model.path={tmp_path}", "model.tokenizer=bundled:tiny-llama",
                                 "model.seqlen=256").model)
    rotary = loaded.model.model.rotary_emb
    assert rotary.rope_type == "llama3"
    base = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    low, high = 64 / scaling["low_freq_factor"], 64 / scaling["high_freq_factor"]  # wavelength bounds
    expected = []
    for f in base.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < high:
            expected.append(f)
        elif wavelength > low:
            expected.append(f / 8.0)
        else:
            smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    torch.testing.assert_close(rotary.inv_freq.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert not torch.allclose(rotary.inv_freq.double(), base)


def test_an_adapter_missing_a_required_member_fails_when_defined_or_built():
    """Adapter is an ABC: a family without ``family`` / ``model_types`` fails at class definition, one without a
    required method when first built, not in the middle of a run."""
    from models.base import Adapter

    with pytest.raises(TypeError, match="class attribute 'model_types'"):
        type("NoTypes", (Adapter,), {"family": "x"})
    partial = type("Partial", (Adapter,), {"family": "x", "model_types": ("x",), "blocks": lambda self: []})
    with pytest.raises(TypeError, match="abstract method"):
        partial(None)
