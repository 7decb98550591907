"""The offline image metrics' feature network and reference statistics (``models/tiny/fmnist-features``), and the model
card of the bundled tiny generator (docs/imagegen.md §4, §5), after ``python -m models.train_imagegen``:

    python -m evaluators.image_reference [--data /usr/share/datasets/fashion-mnist] [--stage all|features|card]

Fixed seeds; ~3 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from models.llamagen import LlamaGenForCausalLM, class_labels, sample_batches
from models.train_imagegen import DEFAULT_DATA, SEED, TINY, load_split
from models.vq import VQModel

from . import image
from .image_features import FeatureNet, load_reference, save_reference

GEN_DIR, FEAT_DIR = TINY / "tiny-imagegen", TINY / "fmnist-features"


def train_classifier(images, labels, steps: int = 1500, batch: int = 128):
    torch.manual_seed(SEED)
    net = FeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED + 2)
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=gen)
        loss = F.cross_entropy(net(images[pick])[2], labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"classifier step {step}/{steps} loss {loss.item():.4f}", flush=True)
    return net.eval()


CARD_SAMPLING = dict(cfg_scale=1.5, top_k=0, top_p=1.0, temperature=1.0)


def write_card(info: dict, per_class: int = 100) -> dict:
    """Dense metrics against the held-out statistics, beside two models that must score far worse: the untrained
    model, and the trained one's samples under shuffled class labels (class-conditional metrics only); a sample grid."""
    net, reference, _ = load_reference(FEAT_DIR)
    vq = VQModel.from_pretrained(GEN_DIR / "vq")
    labels = class_labels(10, 10 * per_class)
    rows = {}
    trained = LlamaGenForCausalLM.from_pretrained(GEN_DIR).eval()
    torch.manual_seed(SEED)
    untrained = LlamaGenForCausalLM(trained.config).eval()
    for name, model in (("dense", trained), ("untrained", untrained)):
        pixels = image.decode(vq, sample_batches(model, labels, 250, SEED, **CARD_SAMPLING))
        rows[name] = image.metrics(pixels, labels, net, reference)
        if name == "dense":
            image.grid(pixels, labels, per_class=10).save(GEN_DIR / "samples.png")
            shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))]
            rows["dense, shuffled labels"] = image.metrics(pixels, shuffled, net, reference)
    lines = [f"| model | {' | '.join(rows['dense'])} |", "|---|" + "---:|" * len(rows["dense"])]
    lines += [f"| {k} | {' | '.join(str(v) for v in row.values())} |" for k, row in rows.items()]
    (GEN_DIR / "card_metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"samples_per_class": per_class, "sampling": CARD_SAMPLING, "metrics": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--stage", default="all", choices=["all", "features", "card"])
    parser.add_argument("--out", default=str(TINY), help="the folder holding tiny-imagegen (default: the bundled one)")
    parser.add_argument("--steps", type=float, default=1.0, help="scale the classifier's steps (a quick check: 0.01)")
    args = parser.parse_args(argv)
    global GEN_DIR, FEAT_DIR
    GEN_DIR, FEAT_DIR = Path(args.out) / "tiny-imagegen", Path(args.out) / "fmnist-features"
    if args.stage in ("all", "features"):
        data = Path(args.data)
        train_x, train_y = load_split(data, "train")
        test_x, test_y = load_split(data, "test")
        net = train_classifier(train_x, train_y, steps=max(2, int(1500 * args.steps)))
        with torch.no_grad():
            acc = (net(test_x)[2].argmax(1) == test_y).float().mean().item()
        save_reference(net, test_x, test_y, FEAT_DIR, {"dataset": "Fashion-MNIST test split (10,000 images)",
                                                       "classifier_test_accuracy": round(acc, 4), "seed": SEED})
    if args.stage in ("all", "card"):
        info_path = GEN_DIR / "training.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info["card"] = write_card(info, per_class=max(10, int(100 * min(1.0, args.steps * 10))))
        info_path.write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
