"""Train the bundled tiny image generator on Fashion-MNIST (docs/imagegen.md §5): a VQ tokenizer (28 x 28 grey ->
7 x 7 codes) and a LlamaGen-style class-conditional GPT on those codes. The classifier whose features the offline
image metrics use, the held-out set's statistics and the model card: ``python -m evaluators.image_reference``.

    python -m models.train_imagegen [--data /usr/share/datasets/fashion-mnist] [--stage all|vq|gpt]

Data: Debian's ``dataset-fashion-mnist`` package (``apt install dataset-fashion-mnist``; MIT licence; the idx files of
zalandoresearch/fashion-mnist). Writes ``models/tiny/tiny-imagegen/`` (GPT + ``vq/``, ``training.json``). Fixed
seeds; ~20 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .llamagen import LlamaGenConfig, LlamaGenForCausalLM
from .vq import VQConfig, VQModel

TINY = Path(__file__).resolve().parent / "tiny"
GEN_DIR, FEAT_DIR = TINY / "tiny-imagegen", TINY / "fmnist-features"
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SEED = 0

VQ = VQConfig(codebook_size=256, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 4], decoder_ch_mult=[1, 2, 4],
              z_channels=32, ch=16, num_res_blocks=1, in_channels=1, out_channels=1, norm_groups=8, image_size=28)
GPT = dict(vocab_size=256, dim=128, n_layer=4, n_head=4, multiple_of=32, num_classes=10, class_dropout_prob=0.1,
           block_size=49, image_size=28, downsample=4, vq="vq", cfg_scale=1.5,
           image_reference="bundled:fmnist-features")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): magic (2 zero bytes, dtype 0x08, ndim), big-endian sizes, uint8 data."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[n, 1, 28, 28]`` in [-1, 1] and labels ``[n]``."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(data / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(data / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _schedule(opt, steps: int, warmup: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vq(images: torch.Tensor, steps: int = 1500, batch: int = 64, lr: float = 2e-3) -> tuple[VQModel, list]:
    """Reconstruction (MSE) + codebook loss + 0.25 x commitment loss, straight-through codes (LlamaGen's losses,
    without its perceptual and GAN terms)."""
    torch.manual_seed(SEED)
    vq = VQModel(VQ)
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched = _schedule(opt, steps)
    gen = torch.Generator().manual_seed(SEED)
    log, start = [], time.time()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        z = vq.latents(x)
        b, e, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, e), dim=-1)
        q = vq.quantize.lookup(vq.quantize.nearest(flat))
        codebook_loss = F.mse_loss(q, flat.detach())
        commit = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        rec = vq.decoder(vq.post_quant_conv(q.view(b, h, w, e).permute(0, 3, 1, 2)))
        loss = F.mse_loss(rec, x) + codebook_loss + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - start, 1)})
            print(f"vq step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    return vq.eval(), log


@torch.no_grad()
def tokenize(vq: VQModel, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([vq.encode(images[i : i + batch]) for i in range(0, len(images), batch)])


def train_gpt(codes: torch.Tensor, labels: torch.Tensor, steps: int = 3000, batch: int = 64, lr: float = 2e-3
              ) -> tuple[LlamaGenForCausalLM, list]:
    """Next-token loss on ``[class, codes...]`` with 10% class dropout (the null class: classifier-free guidance)."""
    torch.manual_seed(SEED)
    model = LlamaGenForCausalLM(LlamaGenConfig(**GPT))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    sched = _schedule(opt, steps)
    gen = torch.Generator().manual_seed(SEED + 1)
    log, start = [], time.time()
    for step in range(steps):
        pick = torch.randint(0, len(codes), (batch,), generator=gen)
        ids = torch.cat([labels[pick, None], codes[pick]], dim=1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "elapsed_s": round(time.time() - start, 1)})
            print(f"gpt step {step}/{steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    return model.eval(), log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--stage", default="all", choices=["all", "vq", "gpt"])
    parser.add_argument("--out", default=str(TINY), help="where the two folders go (default: the bundled ones)")
    parser.add_argument("--steps", type=float, default=1.0, help="scale every stage's steps (a quick check: 0.01)")
    args = parser.parse_args(argv)
    global GEN_DIR, FEAT_DIR
    GEN_DIR, FEAT_DIR = Path(args.out) / "tiny-imagegen", Path(args.out) / "fmnist-features"
    scale = lambda n: max(2, int(n * args.steps))  # noqa: E731
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Path(args.data)
    train_x, train_y = load_split(data, "train")
    test_x, test_y = load_split(data, "test")
    info_path = GEN_DIR / "training.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if args.stage in ("all", "vq"):
        t = time.time()
        vq, log = train_vq(train_x, steps=scale(1500))
        vq.save_pretrained(GEN_DIR / "vq")
        with torch.no_grad():
            rec = vq.decode_code(vq.encode(test_x[:2000]))
        used = int(tokenize(vq, train_x[:10000]).unique().numel())
        info["vq"] = {"config": VQ.__dict__, "log": log, "train_seconds": round(time.time() - t, 1),
                      "test_mse": round(F.mse_loss(rec, test_x[:2000]).item(), 5), "codes_used_of_256": used}
        info_path.parent.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    if args.stage in ("all", "gpt"):
        vq = VQModel.from_pretrained(GEN_DIR / "vq")
        codes = tokenize(vq, train_x)
        t = time.time()
        model, log = train_gpt(codes, train_y, steps=scale(3000))
        model.save_pretrained(GEN_DIR)
        test_codes = tokenize(vq, test_x)
        ids = torch.cat([test_y[:, None], test_codes], dim=1)
        with torch.no_grad():
            nll = torch.stack([model(input_ids=ids[i : i + 500], labels=ids[i : i + 500]).loss
                               for i in range(0, len(ids), 500)]).mean().item()
        info["gpt"] = {"config": GPT, "log": log, "train_seconds": round(time.time() - t, 1),
                       "test_token_ppl": round(math.exp(nll), 3),
                       "parameters": sum(p.numel() for p in model.parameters())}
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    if args.stage == "all":
        print("next: python -m evaluators.image_reference (the feature network, its statistics, the model card)")


if __name__ == "__main__":
    main()
