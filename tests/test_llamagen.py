"""LlamaGen image generators: model code, official checkpoint layout, generation, adapter, removal, reload."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from models import adapter_for, load_pruned, save_pruned
from models import llamagen as L
from models.vq import VQConfig, VQModel


def tiny_config(**overrides) -> L.LlamaGenConfig:
    args = dict(vocab_size=48, dim=64, n_layer=3, n_head=4, num_classes=5, block_size=16, multiple_of=16)
    args.update(overrides)
    return L.LlamaGenConfig(**args)


def tiny_model(seed: int = 0, **overrides) -> L.LlamaGenForCausalLM:
    torch.manual_seed(seed)
    model = L.LlamaGenForCausalLM(tiny_config(**overrides)).eval()
    for p in model.parameters():  # (LlamaGen zeroes the output layer at init: all logits would be 0)
        torch.nn.init.normal_(p, 0.0, 0.2)
    return model


def sequences(model, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    labels = torch.randint(0, cfg.num_classes, (n, 1), generator=g)
    return torch.cat([labels, torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)], dim=1)


def official_keys(n_layer: int) -> set[str]:
    """LlamaGen's c2i GPT state-dict keys (autoregressive/models/gpt.py, written out)."""
    keys = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layer):
        keys |= {f"layers.{i}.{name}.weight" for name in (
            "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
            "attention_norm", "ffn_norm")}
    return keys


def test_official_key_layout_loads_strictly():
    model = tiny_model()
    assert set(model.state_dict()) == official_keys(3)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    for wrapper in ("model", "module", "state_dict"):
        loaded = L.from_official({wrapper: state, "steps": 10}, tiny_config())
        assert torch.equal(loaded.layers[2].attention.wqkv.weight, state["layers.2.attention.wqkv.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        L.from_official({"model": {k: v for k, v in state.items() if "wo" not in k}}, tiny_config())


def test_official_sizes():
    cfg = L.config_for("GPT-XXL", image_size=384)
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.block_size, cfg.intermediate_size) == (48, 24, 1536, 576, 4096)
    cfg = L.config_for("GPT-3B", image_size=384)
    assert (cfg.head_dim, cfg.intermediate_size) == (100, 8704)
    with pytest.raises(ValueError, match="unknown"):
        L.config_for("GPT-9B")


def test_rope_2d_rows_and_columns():
    table = L.rope_2d(grid=4, head_dim=16)
    assert table.shape == (17, 8, 2)
    assert torch.equal(table[0], torch.zeros(8, 2))  # the class position: no rotation, q and k vanish
    cos = table[1:, :, 0].view(4, 4, 8)
    assert torch.equal(cos[1, 0, :4], cos[1, 3, :4])  # first half: the row's angle
    assert torch.equal(cos[0, 2, 4:], cos[3, 2, 4:])  # second half: the column's
    assert not torch.equal(cos[0, 0, :4], cos[1, 0, :4])


def test_loss_is_next_token_loss_over_image_tokens():
    model = tiny_model()
    ids = sequences(model)
    out = model(input_ids=ids, labels=ids)
    direct = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 48), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(direct.item())
    with pytest.raises(ValueError, match="positions"):
        model(input_ids=torch.zeros(1, 18, dtype=torch.long))


def _greedy_full_forward(model, labels, cfg_scale):
    """Argmax decoding by recomputing the whole sequence every step (no cache)."""
    ids = labels.view(-1, 1)
    null = torch.full_like(ids, model.config.num_classes)
    for _ in range(model.config.block_size):
        logits = model(input_ids=ids).logits[:, -1]
        if cfg_scale > 1:
            uncond = model(input_ids=torch.cat([null, ids[:, 1:]], 1)).logits[:, -1]
            logits = L.guided(logits, uncond, cfg_scale)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[:, 1:]


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_generation_equals_full_forward(cfg_scale):
    model = tiny_model()
    labels = torch.tensor([0, 3, 4])
    cached = L.generate(model, labels, cfg_scale=cfg_scale, top_k=1)
    assert torch.equal(cached, _greedy_full_forward(model, labels, cfg_scale))
    assert all(layer.attention.kv_cache is None for layer in model.layers)  # dropped: full forwards work after


def test_sampling_is_seeded_and_filtered():
    model = tiny_model()
    labels = torch.tensor([1, 2])
    a = L.generate(model, labels, cfg_scale=1.5, top_k=5, generator=torch.Generator().manual_seed(3))
    b = L.generate(model, labels, cfg_scale=1.5, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 16)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(L.filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    # nucleus: softmax ~ [.09, .67, .24, .03]: p = 0.7 keeps the two most likely
    assert torch.isinf(L.filter_logits(logits, top_p=0.7)).tolist() == [[True, False, False, True]]


def test_removing_units_equals_zeroing_them_and_generation_sizes_caches_per_layer():
    model = tiny_model()
    adapter = adapter_for(model)
    assert adapter.modality == "image" and [b.attention.heads() for b in adapter.blocks()] == [(4, 4)] * 3
    zeroed = tiny_model()
    plan = {0: ([0, 2], 60), 1: ([1], 100), 2: ([0, 1, 2, 3], 7)}  # kept heads, kept neurons per block
    for i, (heads, neurons) in plan.items():
        for m, remove in ((model, True), (zeroed, False)):
            block = adapter_for(m).blocks()[i]
            for group in adapter_for(m).unit_groups(block):
                keep = heads if group.kind == "kv_group" else list(range(neurons))
                if remove:
                    adapter_for(m).remove_units(block, group.kind, keep)
                    continue
                dropped = [u for u in range(group.count) if u not in keep]
                for path, (axis, index) in group.owned.items():
                    block.get_parameter(path).data.index_fill_(axis, index[dropped].reshape(-1), 0.0)
    assert [b.attention.heads() for b in adapter.blocks()] == [(2, 2), (1, 1), (4, 4)]
    ids = sequences(model)
    torch.testing.assert_close(model(input_ids=ids).logits, zeroed(input_ids=ids).logits, atol=1e-5, rtol=0)
    labels = torch.tensor([2, 4])
    assert torch.equal(L.generate(model, labels, cfg_scale=2.0, top_k=1), _greedy_full_forward(model, labels, 2.0))


def test_pruned_checkpoint_reloads_equal(tmp_path):
    model = tiny_model()
    adapter = adapter_for(model)
    adapter.remove_units(adapter.blocks()[0], "kv_group", [1, 3])
    adapter.remove_units(adapter.blocks()[2], "mlp_neuron", list(range(0, 176, 2)))
    save_pruned(model, None, tmp_path / "pruned", adapter)
    reloaded, structure = load_pruned(tmp_path / "pruned")
    assert structure["blocks"][0] == {"kv_group": 2, "mlp_neuron": 176}
    assert structure["blocks"][2] == {"kv_group": 4, "mlp_neuron": 88}
    ids = sequences(model)
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_uniform_pruning_is_expressible_in_the_config():
    model = tiny_model()
    adapter = adapter_for(model)
    for block in adapter.blocks():
        adapter.remove_units(block, "kv_group", [0, 1, 2])
        adapter.remove_units(block, "mlp_neuron", list(range(80)))
    update = adapter.config_for_counts(adapter.block_counts(adapter.blocks()[0]))
    fresh = L.LlamaGenForCausalLM(L.LlamaGenConfig(**{**model.config.to_dict(), **update}))
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_vq_roundtrip_and_official_layout(tmp_path):
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2],
                   z_channels=32, ch=32, num_res_blocks=1, in_channels=1, out_channels=1, image_size=28)
    vq = VQModel(cfg).eval()
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    codes = vq.encode(images)
    assert codes.shape == (2, 49) and cfg.downsample == 4
    assert vq.decode_code(codes).shape == (2, 1, 28, 28)
    vq.save_pretrained(tmp_path / "vq")
    again = VQModel.from_pretrained(tmp_path / "vq")
    assert torch.equal(again.encode(images), codes)
    state = {**vq.state_dict(), "quantize.codebook_used": torch.zeros(65536)}  # LlamaGen's usage counter
    VQModel(cfg).load_official(state)
    # codes are the nearest L2-normalised codebook entries of the L2-normalised latents
    z = vq.latents(images).permute(0, 2, 3, 1).reshape(-1, 4)
    sims = torch.nn.functional.normalize(z, dim=-1) @ vq.quantize.codebook().t()
    assert torch.equal(sims.argmax(1), codes.reshape(-1))


REFERENCE = os.environ.get("PRUNELAB_LLAMAGEN_REFERENCE")


@pytest.mark.skipif(not REFERENCE, reason="set PRUNELAB_LLAMAGEN_REFERENCE to a FoundationVision/LlamaGen checkout")
def test_equals_reference_llamagen():
    """Bitwise equal to LlamaGen's own GPT and VQ on identical weights (forward, KV-cached sampling with guidance and
    top-k under one seed, VQ codes and decoded pixels)."""
    sys.path.insert(0, REFERENCE)
    from autoregressive.models.generate import generate as ref_generate
    from autoregressive.models.gpt import ModelArgs, Transformer
    from tokenizer.tokenizer_image import vq_model as ref_vq

    torch.manual_seed(0)
    ref = Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16,
                                multiple_of=32))
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    ref.eval()
    ours = L.from_official({"model": ref.state_dict()}, L.LlamaGenConfig(
        vocab_size=64, dim=64, n_layer=2, n_head=4, num_classes=10, block_size=16, multiple_of=32))
    labels, toks = torch.tensor([3, 7, 1]), torch.randint(0, 64, (3, 16))
    expected, _ = ref(toks[:, :-1], labels, input_pos=torch.arange(16))
    assert torch.equal(ours(input_ids=torch.cat([labels[:, None], toks[:, :-1]], 1)).logits, expected)
    for cfg_scale, top_k in [(1.0, 0), (4.0, 0), (1.75, 20)]:
        torch.manual_seed(5)
        a = ref_generate(ref, labels, 16, cfg_scale=cfg_scale, top_k=top_k, temperature=1.0, top_p=1.0)
        torch.manual_seed(5)
        assert torch.equal(a.long(), L.generate(ours, labels, cfg_scale=cfg_scale, top_k=top_k))
    args = ref_vq.ModelArgs(codebook_size=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64)
    rv = ref_vq.VQModel(args).eval()
    ov = VQModel(VQConfig(codebook_size=32, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2], z_channels=64))
    ov.load_official(rv.state_dict())
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    _, _, (_, _, idx) = rv.encode(x)
    assert torch.equal(ov.eval().encode(x), idx.view(2, -1))
    assert torch.equal(ov.decode_code(ov.encode(x)), rv.decode_code(idx, [2, 8, 7, 7]))


def test_converted_official_checkpoint_loads_through_the_model_config(tmp_path):
    import argparse

    from models import load
    from models.convert_llamagen import convert, read_checkpoint
    from models.vq import VQTokenizer

    from .conftest import compose

    model = tiny_model()
    vq_cfg = VQConfig(codebook_size=48, codebook_embed_dim=4, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                      z_channels=16, ch=16, num_res_blocks=1, norm_groups=8, image_size=8)
    vq = VQModel(vq_cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "c2i.pt")
    torch.save({"model": {**vq.state_dict(), "quantize.codebook_used": torch.zeros(65536)}}, tmp_path / "vq.pt")
    convert(read_checkpoint(tmp_path / "c2i.pt"), read_checkpoint(tmp_path / "vq.pt"), tiny_config(cfg_scale=1.75),
            vq_cfg, tmp_path / "out")
    cfg = compose("model=local", f"model.path={tmp_path / 'out'}", "model.seqlen=16")
    loaded = load(cfg.model)
    assert loaded.adapter.family == "llamagen" and isinstance(loaded.tokenizer, VQTokenizer)
    assert loaded.model.config.cfg_scale == 1.75
    ids = sequences(model)
    assert torch.equal(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="--trust-pickle"):
        read_checkpoint(tmp_path / "pickled.pt")


def test_attention_probabilities_reproduce_the_attention_output():
    """GOA's head similarity reads the probabilities from the fused wqkv output: applied to the values they give the
    block's own attention output (2-D rotary embedding, class position, causal mask and all)."""
    model = tiny_model(n_kv_head=2)
    adapter = adapter_for(model)
    block = adapter.blocks()[1]
    x = torch.randn(2, 17, 64)
    freqs = model.rope.rows(17, "cpu")
    attn = block.attention
    fused = attn.wqkv(x)
    q_name, k_name = adapter.query_key(block)
    assert q_name == k_name == "attention.wqkv"
    probs = adapter.attention_probabilities(block, fused, fused, {"freqs_cis": freqs})
    assert probs.shape == (2, 4, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 17))
    v = fused[..., (4 + 2) * 16 :].view(2, 17, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    out = attn.wo((probs @ v).transpose(1, 2).reshape(2, 17, 64))
    torch.testing.assert_close(out, attn(x, freqs), atol=1e-5, rtol=1e-5)
