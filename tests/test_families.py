"""The adapter contract on small random configs built here (no trained checkpoint), for the families that need no
bundled model: every linear grouped and valid 2:4 masks, removing units equals zeroing them (logits and cached
generation), pruned checkpoints reload equal, blocks run alone give the model's logits, runs through the runner from
a local folder, and GOA's attention probabilities reproduce the attention output."""

from __future__ import annotations

import pytest
import torch

from models import adapter_for, checkpoint
from models.loading import TINY_DIR
from pruners import Pattern, build_pruner, prune_sequential
from pruners.masks import satisfies_n_of_m
from pruners.settings import EngineSettings

from .conftest import compose

QUIET = EngineSettings(progress=False, batch_size=2)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                        tie_word_embeddings=True))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                        max_position_embeddings=256, tie_word_embeddings=True))


def llama3():  # Llama-3.1 / 3.2: RoPE scaling "llama3", tied embeddings (3.2-1B / 3B)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                        tie_word_embeddings=True, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64}))


def mistral():  # sliding-window attention (windows shorter than the test's sequences)
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                            sliding_window=8))


def phi3():  # fused qkv_proj and gate_up_proj (partial rotary, as Phi-3.5 has none: tested with 0.5)
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                      partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def gemma2():  # GeGLU, pre + post norms, soft-capped scores and logits, sliding (window 8) and global layers
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                          max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=16,
                                          layer_types=["sliding_attention", "full_attention"]))


def gemma3():  # q_norm / k_norm, local layers with their own rotary base, a global layer with the long one
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              intermediate_size=128, max_position_embeddings=256, sliding_window=8,
                                              query_pre_attn_scalar=16,
                                              layer_types=["sliding_attention", "full_attention"]))


def mixtral():  # experts (4, top-2; fused 3-D in transformers 5, per-expert linears once the adapter meets them)
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                            num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe():  # experts in layer 1, a dense MLP in layer 0 (mlp_only_layers), q_norm / k_norm
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              intermediate_size=128, moe_intermediate_size=128, num_experts=4,
                                              num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=256))


def qwen2_moe():  # q/k/v biases, a shared expert with its sigmoid gate beside 4 routed experts (top-2); layer 0 full
    # attention, layer 1 a sliding window of 8 (its attention, unlike Qwen2's, does not name its layer type)
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                              moe_intermediate_size=128, shared_expert_intermediate_size=128,
                                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                              use_sliding_window=True, sliding_window=8, max_window_layers=1))


FAMILIES = {"qwen2": qwen2, "qwen3": qwen3, "llama3": llama3, "mistral": mistral, "phi3": phi3, "gemma2": gemma2,
            "gemma3": gemma3, "mixtral": mixtral, "qwen3_moe": qwen3_moe,
            "qwen2_moe": qwen2_moe}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    with torch.no_grad():  # (biases too: a family's biases must follow its units)
        for p in model.parameters():
            if p.dim() == 1 and not torch.all(p == 1):
                p.normal_(0, 0.1)
    return request.param, model, adapter_for(model)


def ids(n=4, seqlen=16):
    return torch.randint(0, 4096, (n, seqlen), generator=torch.Generator().manual_seed(1))


def prune_2_of_4_checking_every_linear(model, adapter):
    """Every linear of every block is in a linear group or declared untouched (Qwen2-MoE's shared expert); SparseGPT at
    2:4 leaves the untouched ones as they were."""
    untouched = {}
    for index, block in enumerate(adapter.blocks()):
        grouped = sorted(name for group in adapter.linear_groups(block) for name in group.names)
        untouched[index] = {n: block.get_submodule(n).weight.clone() for n in adapter.untouched_linears(block)}
        assert sorted(grouped + list(untouched[index])) == \
            sorted(n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear))
    prune_sequential(model, adapter, build_pruner({"name": "sparsegpt"}), Pattern("nm", n=2, m=4), ids(), QUIET)
    for index, block in enumerate(adapter.blocks()):
        assert all(torch.equal(block.get_submodule(n).weight, w) for n, w in untouched[index].items())


def test_every_linear_grouped_and_n_m_masks_valid(family):
    _, model, adapter = family
    prune_2_of_4_checking_every_linear(model, adapter)
    for block in adapter.blocks():
        for name in adapter.prunable_linears(block):
            assert satisfies_n_of_m(block.get_submodule(name).weight, 2, 4)


def assert_as_zeroed_and_reloads_equal(model, adapter, zeroed, prompt, zeroed_tokens, folder):
    """The shrunk model's logits and cached generation are the zeroed model's; saved and reloaded, its logits."""
    checkpoint.save_pruned(model, None, folder, adapter)
    reloaded, _ = checkpoint.load_pruned(folder)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids(2)).logits, zeroed, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), zeroed_tokens)
        torch.testing.assert_close(reloaded(input_ids=ids(2)).logits, model(input_ids=ids(2)).logits)


def test_removing_units_equals_zeroing_them_and_reloads_equal(family, tmp_path):
    _, model, adapter = family
    keep = {"kv_group": torch.tensor([1]), "mlp_neuron": torch.arange(0, 128, 3)}
    with torch.no_grad():
        for block in adapter.blocks():
            for group in adapter.unit_groups(block):
                if group.kind not in keep:
                    continue
                dropped = torch.ones(group.count, dtype=torch.bool)
                dropped[keep[group.kind]] = False
                for path, (axis, index) in group.owned.items():
                    block.get_parameter(path).index_fill_(axis, index[dropped].reshape(-1), 0.0)
        zeroed = model(input_ids=ids(2)).logits
        prompt = ids(1, 6)
        zeroed_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)  # (KV-cached)
        for kind, kept in keep.items():  # (the first block only keeps its heads: blocks of different sizes)
            for block in adapter.blocks()[: 1 if kind == "kv_group" else None]:
                if kind in adapter.block_counts(block):  # (an MoE layer has no MLP neurons as units)
                    adapter.remove_units(block, kind, kept)
    assert adapter.head_layout(adapter.blocks()[0])[:2] == (2, 1)  # one KV group of two query heads left
    assert adapter.head_layout(adapter.blocks()[1])[:2] == (4, 2)
    first = model.model.layers[0].self_attn
    if getattr(first, "q_proj", None) is not None and first.q_proj.bias is not None:
        assert first.q_proj.bias.shape[0] == first.k_proj.bias.shape[0] * 2 == 2 * first.head_dim
    assert_as_zeroed_and_reloads_equal(model, adapter, zeroed, prompt, zeroed_tokens, tmp_path)


def test_a_local_folder_of_the_family_runs_through_the_runner(family, tmp_path):
    from transformers import AutoTokenizer

    from runners.run import execute

    name, model, adapter = family
    # (as the family's checkpoints store it: MoE experts fused again)
    model.save_pretrained(tmp_path / name, state_dict=adapter.native_state(model.state_dict()))
    AutoTokenizer.from_pretrained(TINY_DIR / "tiny-llama").save_pretrained(tmp_path / name)  # (vocabulary 4096)
    common = ["model=local", f"model.path={tmp_path / name}", "model.seqlen=64", "calib.nsamples=4",
              "eval.ppl.max_windows=2", f"output_root={tmp_path / 'out'}", "wandb.mode=disabled", "progress=false"]
    record = execute(compose(*common, "pruner=sparsegpt"))
    assert record["model"]["model_type"] == model.config.model_type and record["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    record = execute(compose(*common, "pruner=numerical", "sparsity=structured", "speed.mode=never"))
    assert record["structure"]["parameters_after"] < record["structure"]["parameters_before"]


def test_blocks_run_alone_give_the_model_s_own_logits(family):
    """The path statistics are captured on is the one that runs: block 0's input and the kwargs each block receives
    (per kind where layers differ: Gemma's sliding-window and global layers, windows of 8 in 16 tokens), every block
    called alone, then the head, give the model's logits."""
    from models.blocks import capture_block_inputs, run_blocks

    _, model, adapter = family
    batch = ids(2)
    with torch.no_grad():
        inputs = capture_block_inputs(model, adapter, batch, "cpu", batch_size=2)
        logits = adapter.head(run_blocks(adapter, inputs, "cpu", progress=False)[0])
        torch.testing.assert_close(logits, model(input_ids=batch).logits, atol=1e-5, rtol=1e-5)


def test_attention_probabilities_reproduce_the_attention_output(family):
    """GOA's head similarity: the probabilities the adapter computes from the q / k projections, applied to the
    values, give the attention's own output, with the mask and rotary embeddings the layer really receives (rotary
    scaling, Qwen3's and Gemma-3's q_norm / k_norm, Gemma-2's soft-capping, sliding windows of 8 in 12 tokens)."""
    from models.blocks import capture_block_inputs

    name, model, adapter = family
    with torch.no_grad():
        captured = capture_block_inputs(model, adapter, ids(2, 12), "cpu", batch_size=2)
    for block in adapter.blocks():
        kwargs = adapter.block_kwargs(block, captured.kwargs_by_batch_size[2])
        attn = block.self_attn
        x = torch.randn(2, 12, 64)
        q_name, k_name = adapter.query_key(block)
        q, k = block.get_submodule(q_name)(x), block.get_submodule(k_name)(x)
        probs = adapter.attention_probabilities(block, q, k, captured.kwargs_by_batch_size[2])
        heads, kv_heads, d = adapter.head_layout(block)
        values = q[..., (heads + kv_heads) * d :] if q_name == k_name else attn.v_proj(x)  # (fused: the last rows)
        v = values.view(2, 12, kv_heads, d).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
        out = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 12, heads * d))
        expected = attn(x, position_embeddings=kwargs["position_embeddings"], attention_mask=kwargs["attention_mask"])[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def mamba2(**overrides):  # (heads of 16 channels, 2 groups for B / C and the gated norm)
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(Mamba2Config(**{"vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2,
                                             "state_size": 16, "expand": 2, "head_dim": 16, "num_heads": 8,
                                             "n_groups": 2, "chunk_size": 16, **overrides}))


def test_mamba2_prunes_unstructured_n_m_and_structured_through_the_runner(tmp_path):
    """Mamba-2: both linears grouped, valid 2:4 masks, blocks run alone give the model's logits; SparseGPT, and
    Numerical Pruning on whole B/C groups and FLAP on heads, through the runner from a local folder."""
    from transformers import AutoTokenizer

    from models.blocks import capture_block_inputs, run_blocks
    from runners.run import execute
    from runners.validate import ConfigError, validate

    torch.manual_seed(0)
    model = mamba2().eval()
    adapter = adapter_for(model)
    with torch.no_grad():
        inputs = capture_block_inputs(model, adapter, ids(2), "cpu", batch_size=2)
        logits = adapter.head(run_blocks(adapter, inputs, "cpu", progress=False)[0])
        torch.testing.assert_close(logits, model(input_ids=ids(2)).logits, atol=1e-5, rtol=1e-5)
    prune_2_of_4_checking_every_linear(model, adapter)
    assert all(satisfies_n_of_m(linear.weight, 2, 4) for block in adapter.blocks()
               for linear in adapter.prunable_linears(block).values())
    folder = tmp_path / "mamba2"
    mamba2().save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY_DIR / "tiny-llama").save_pretrained(folder)
    common = ["model=local", f"model.path={folder}", "model.seqlen=64", "calib.nsamples=4", "eval.ppl.max_windows=2",
              f"output_root={tmp_path / 'out'}", "wandb.mode=disabled", "progress=false", "speed.mode=never"]
    record = execute(compose(*common, "pruner=sparsegpt"))
    assert record["model"]["model_type"] == "mamba2" and record["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ConfigError, match="pruner 'goa' prunes attention \\+ MLP depth-2 modules"):
        validate(compose(*common, "pruner=goa", "sparsity=structured"))  # (before any work)
    for method, unit, kind, kept in (("numerical", "kv_group", "mamba2_group", 1),
                                     ("flap", "query_head", "mamba2_head", 4)):
        record = execute(compose(*common, f"pruner={method}", "sparsity=structured", "sparsity.ratio=0.5",
                                 f"pruner.attention_unit={unit}", "pruner.allocation=uniform"))
        structure = record["structure"]
        assert structure["parameters_after"] < structure["parameters_before"]
        assert all(block[kind]["kept"] == kept for block in structure["blocks"]), structure["blocks"]


def zero_units(model, adapter, keep: dict):
    """Zero every unit not kept (``keep[block index] = (kind, kept indices)``); the zeroed model's logits, a prompt
    and its cached greedy generation (what the removal must give back)."""
    blocks = adapter.blocks()
    for index, (kind, kept) in keep.items():
        group = adapter.unit_group(blocks[index], kind)
        dropped = torch.ones(group.count, dtype=torch.bool)
        dropped[kept] = False
        for path, (axis, rows) in group.owned.items():
            blocks[index].get_parameter(path).index_fill_(axis, rows[dropped].reshape(-1), 0.0)
    prompt = ids(1, 6)
    return (model(input_ids=ids(2)).logits, prompt,
            model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))  # (KV-cached)


@pytest.mark.parametrize("groups", [2, 1])
def test_mamba2_removing_groups_and_heads_equals_zeroing_them_and_reloads_equal(groups, tmp_path):
    """Whole B/C groups (block 0) and heads, two of every group's four (block 1), removed equal zeroed (logits,
    cached generation; the gated norm's eps and weight rescaled for the heads); the pruned checkpoint reloads equal;
    uneven heads per group are refused; a head whose out_proj columns are zero is not silent (it counts in its
    group's norm), one whose gate rows are zero is."""
    from models.shrink import silent_units

    torch.manual_seed(0)
    model = mamba2(n_groups=groups, use_bias=True).eval()
    adapter = adapter_for(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if p.eq(1).all() else torch.randn_like(p) * 0.1)
    blocks = adapter.blocks()
    keep = {0: ("mamba2_group", torch.tensor([1])), 1: ("mamba2_head", torch.tensor([0, 2, 5, 7]))}
    if groups == 1:
        keep = {1: keep[1]}
    assert [g.kind for g in adapter.unit_groups(blocks[0])] == (["mamba2_group", "mamba2_head"] if groups == 2
                                                                 else ["mamba2_head"])
    with pytest.raises(ValueError, match="kept per B/C group must be equal") if groups == 2 else _no_error():
        adapter.check_removal(blocks[1], adapter.unit_group(blocks[1], "mamba2_head"), torch.tensor([0, 1, 2, 4]))
    with torch.no_grad():
        zeroed, prompt, zeroed_tokens = zero_units(model, adapter, keep)
        eps = blocks[1].mixer.norm.variance_epsilon
        for index, (kind, kept) in keep.items():
            adapter.remove_units(blocks[index], kind, kept)
    assert adapter.block_counts(blocks[1])["mamba2_head"] == 4
    assert blocks[1].mixer.norm.variance_epsilon == pytest.approx(eps * 2)  # 4 of 8 heads per group's norm -> 2
    if groups == 2:
        assert adapter.block_counts(blocks[0]) == {"mamba2_group": 1, "mamba2_head": 4}
        assert blocks[0].mixer.norm.variance_epsilon == eps  # a whole group: the other groups' norms unchanged
    assert_as_zeroed_and_reloads_equal(model, adapter, zeroed, prompt, zeroed_tokens, tmp_path)
    with torch.no_grad():
        heads = adapter.unit_group(blocks[1], "mamba2_head")
        out_proj, in_proj = blocks[1].mixer.out_proj, blocks[1].mixer.in_proj
        out_proj.weight[:, heads.owned["mixer.out_proj.weight"][1][0]] = 0  # head 0: unread, still normalised with
        in_proj.weight[heads.owned["mixer.in_proj.weight"][1][1][:16]] = 0  # head 1: z rows zero: silent
        in_proj.bias[heads.owned["mixer.in_proj.weight"][1][1][:16]] = 0
        assert silent_units(adapter, blocks[1], heads).tolist() == [False, True, False, False]


class _WholeWidthGatedNorm(torch.nn.Module):
    """Mamba-2's gated RMSNorm as transformers 4.57 - 5.0 build it: one mean square over all ``d_inner`` channels,
    whatever ``n_groups`` (no ``group_size``)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(weight.clone()), eps

    def forward(self, hidden_states, gate=None):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float() * torch.nn.functional.silu(gate.float())
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def test_mamba2_units_under_a_whole_width_norm_are_removed_as_zeroed():
    """Under transformers 4.57 - 5.0's gated norm (one mean square over every channel of the mixer) a removed B/C
    group shrinks that mean as a removed head does: both get the eps / weight correction with G = d_inner (removal
    equals zeroing, logits and cached generation), and a group whose out_proj columns are zero is not silent."""
    from models.shrink import silent_units

    torch.manual_seed(0)
    model = mamba2(use_bias=True).eval()
    adapter = adapter_for(model)
    blocks = adapter.blocks()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if p.eq(1).all() else torch.randn_like(p) * 0.1)
        for block in blocks:
            block.mixer.norm = _WholeWidthGatedNorm(block.mixer.norm.weight, block.mixer.norm.variance_epsilon)
        group = adapter.unit_group(blocks[0], "mamba2_group")
        out_proj = blocks[0].mixer.out_proj
        out_proj.weight[:, group.owned["mixer.out_proj.weight"][1][0]] = 0  # group 0 unread, still in the norm
        assert silent_units(adapter, blocks[0], group).tolist() == [False, False]
        keep = {0: ("mamba2_group", torch.tensor([1])), 1: ("mamba2_head", torch.tensor([0, 2, 5, 7]))}
        zeroed, prompt, zeroed_tokens = zero_units(model, adapter, keep)
        eps = blocks[0].mixer.norm.variance_epsilon
        for index, (kind, kept) in keep.items():
            adapter.remove_units(blocks[index], kind, kept)
        assert [b.mixer.norm.variance_epsilon for b in blocks] == pytest.approx([eps * 2, eps * 2])  # 128 -> 64 each
        assert not any(hasattr(b.mixer.norm, "group_size") for b in blocks)
        torch.testing.assert_close(model(input_ids=ids(2)).logits, zeroed, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), zeroed_tokens)


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
