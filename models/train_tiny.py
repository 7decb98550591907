"""Train the bundled tiny checkpoints (``models/tiny/<name>``) on the bundled Austen corpus.

Deterministic: fixed seed, fixed number of steps, fixed batch order, 2 CPU threads.
Each run writes ``config.json``, ``model.safetensors`` (fp16 to keep the repository small; the
runner loads them as fp32), the shared byte-level BPE tokenizer, ``train_log.json`` and a model card
(``README.md``) with the dense and untrained test perplexity under the ``bundled`` protocol.

Usage::

    python -m models.train_tiny tokenizer            # (re)train the shared BPE tokenizer (~2 s)
    python -m models.train_tiny tiny-opt              # train one model (run times in docs/environment.md §3)
    python -m models.train_tiny all
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TINY_DIR = HERE / "tiny"
TOKENIZER_DIR = TINY_DIR / "tokenizer"
CORPUS_DIR = HERE.parent / "corpora" / "austen"
VOCAB_SIZE = 4096
SEQLEN = 256
SEED = 0

# Architectures: small enough to train on 2 CPU cores in minutes, large enough to be real LMs.
ARCHS = {
    "tiny-opt": dict(
        family="opt",
        config=dict(hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=128, dropout=0.0,
                    attention_dropout=0.0, activation_dropout=0.0, do_layer_norm_before=True),
        steps=700, batch=8, lr=3e-3,
    ),
    "tiny-llama": dict(
        family="llama",
        # GQA: 4 query heads share 2 key/value heads
        config=dict(hidden_size=128, num_hidden_layers=4, intermediate_size=352, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                    rms_norm_eps=1e-5),
        steps=700, batch=8, lr=3e-3,
    ),
    "tiny-qwen3": dict(
        family="qwen3",
        # Qwen3's layout: GQA (4 query / 2 KV heads), q_norm / k_norm over each head's dimensions, tied embeddings
        config=dict(hidden_size=128, num_hidden_layers=4, intermediate_size=352, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
                    rms_norm_eps=1e-6),
        steps=700, batch=8, lr=3e-3,
    ),
    "tiny-mixtral": dict(
        family="mixtral",
        # a mixture of experts: 8 SwiGLU experts per layer, each token routed to 2 (Mixtral's router, trained with its
        # load-balancing loss), GQA attention (4 query / 2 KV heads); what sparsity=experts and routed statistics need
        config=dict(hidden_size=128, num_hidden_layers=4, intermediate_size=96, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                    max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5),
        steps=700, batch=8, lr=3e-3, train_kwargs=dict(output_router_logits=True),  # (training only: the aux loss)
    ),
    "tiny-gpt2": dict(
        family="gpt2",
        # Conv1D projections, fused c_attn, GELU MLP, learned positions, tied LM head
        config=dict(n_embd=128, n_layer=4, n_head=4, n_inner=512, n_positions=512, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True),
        steps=700, batch=8, lr=3e-3,
    ),
    "tiny-mamba": dict(
        family="mamba",
        config=dict(hidden_size=128, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4,
                    tie_word_embeddings=True, use_mambapy=True),
        steps=250, batch=8, lr=3e-3,
    ),
}


def train_tokenizer() -> None:
    """Byte-level BPE on the training split only (docs/environment.md §3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train([str(CORPUS_DIR / "train.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(TOKENIZER_DIR)
    _portable_tokenizer_config(TOKENIZER_DIR)


def _portable_tokenizer_config(folder: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which transformers 4 cannot resolve (docs/environment.md §1)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _tokens(tokenizer, split: str) -> torch.Tensor:
    text = (CORPUS_DIR / f"{split}.txt").read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def build_model(name: str, tokenizer):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MambaConfig,
        MambaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    spec = ARCHS[name]
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cls = {"opt": (OPTConfig, OPTForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
           "mamba": (MambaConfig, MambaForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM)}[spec["family"]]
    return cls[1](cls[0](**spec["config"], **common))


@torch.no_grad()
def window_ppl(model, ids: torch.Tensor, seqlen: int = SEQLEN, batch: int = 16) -> float:
    """Token-level perplexity over non-overlapping windows (the ``bundled`` protocol's arithmetic)."""
    model.eval()
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    nll = 0.0
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(nll / (n * (seqlen - 1)))


def train(name: str) -> dict:
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_DIR)
    spec = ARCHS[name]
    train_ids, test_ids = _tokens(tokenizer, "train"), _tokens(tokenizer, "test")
    model = build_model(name, tokenizer)
    untrained_ppl = window_ppl(model, test_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    steps, warmup = spec["steps"], max(1, spec["steps"] // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(SEED)
    start, log = time.time(), []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - SEQLEN - 1, (spec["batch"],), generator=gen)
        x = torch.stack([train_ids[s : s + SEQLEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False, **spec.get("train_kwargs", {})).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - start, 1)})
            print(f"{name} step {step}/{steps} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    train_s = time.time() - start
    out = TINY_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    # measure what ships: fp16 weights loaded back as fp32
    model = type(model).from_pretrained(out, dtype=torch.float32)
    dense_ppl = window_ppl(model, test_ids)
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "name": name, "architecture": type(model).__name__, "parameters": n_params,
        "vocab_size": len(tokenizer), "steps": steps, "batch": spec["batch"], "seqlen": SEQLEN,
        "lr": spec["lr"], "seed": SEED, "train_tokens": steps * spec["batch"] * SEQLEN,
        "train_seconds": round(train_s, 1), "test_ppl_dense": round(dense_ppl, 3),
        "test_ppl_untrained": round(untrained_ppl, 3), "torch": torch.__version__, "log": log,
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    _write_card(out, summary, spec)
    return summary


def _write_card(out: Path, s: dict, spec: dict) -> None:
    cfg = ", ".join(f"{k}={v}" for k, v in spec["config"].items())
    out.joinpath("README.md").write_text(
        f"# {s['name']}\n\n"
        f"A tiny `{s['architecture']}` ({s['parameters'] / 1e6:.2f}M parameters, vocab {s['vocab_size']}) trained by\n"
        f"`python -m models.train_tiny {s['name']}` on the bundled Austen corpus (`corpora/austen/train.txt`).\n"
        f"Weights are stored in fp16; PruneLab loads them as fp32. For tests and the offline quickstart only.\n\n"
        f"- architecture: {cfg}\n"
        f"- training: {s['steps']} steps x {s['batch']} x {s['seqlen']} tokens ({s['train_tokens']:,} tokens), AdamW lr {s['lr']},\n"
        f"  seed {s['seed']}, {s['train_seconds']:.0f} s on 2 CPU cores\n"
        f"- **dense test perplexity** (protocol `bundled`: Persuasion, non-overlapping {s['seqlen']}-token windows): "
        f"**{s['test_ppl_dense']:.2f}**\n"
        f"- same architecture untrained: {s['test_ppl_untrained']:.1f}\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train the bundled tiny models")
    parser.add_argument("what", choices=["tokenizer", "all", *ARCHS])
    args = parser.parse_args()
    if args.what == "tokenizer":
        train_tokenizer()
    else:
        for name in ARCHS if args.what == "all" else [args.what]:
            print(json.dumps({k: v for k, v in train(name).items() if k != "log"}, indent=2))
