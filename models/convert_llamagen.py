"""Convert official LlamaGen c2i checkpoints into a PruneLab model folder (docs/imagegen.md §2).

    python -m models.convert_llamagen --gpt c2i_XXL_384.pt --vq vq_ds16_c2i.pt --size GPT-XXL --image-size 384 \\
        --out checkpoints/llamagen-xxl

The folder holds the GPT (``config.json`` with ``model_type: llamagen`` + ``model.safetensors``) and its VQ tokenizer
(``vq/``); ``model=local model.path=<folder>`` (or ``conf/model/llamagen-xxl.yaml``) loads it. Checkpoints are read
with ``torch.load(weights_only=True)``; one that holds other pickled objects needs ``--trust-pickle`` (only for files
from a source you trust). The guidance scale written is the one published for the model (the Numerical Pruning
paper's Table 3: XXL 1.75, 3B 1.65) unless ``--cfg-scale`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .llamagen import SIZES, LlamaGenConfig, config_for, from_official, official_state
from .vq import VQConfig, VQModel

PUBLISHED_CFG = {"GPT-XXL": 1.75, "GPT-3B": 1.65}


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # (an unpickling error names the class it refused)
        if trust_pickle:
            raise
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: not loadable as plain tensors ({first}); if you trust the file, add "
                         f"--trust-pickle") from None


def convert(gpt_state: dict, vq_state: dict, config: LlamaGenConfig, vq_config: VQConfig, out: str | Path) -> Path:
    """Write ``out`` (GPT + ``vq/``) from official state dicts; both are loaded strictly first."""
    out = Path(out)
    model = from_official(gpt_state, config)
    vq = VQModel(vq_config)
    vq.load_official(official_state(vq_state))
    model.save_pretrained(out)
    vq.save_pretrained(out / (config.vq or "vq"))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpt", required=True, help="c2i_*.pt (LlamaGen's class-conditional GPT)")
    parser.add_argument("--vq", required=True, help="vq_ds16_c2i.pt (LlamaGen's VQ-16 tokenizer)")
    parser.add_argument("--size", required=True, choices=sorted(SIZES))
    parser.add_argument("--image-size", type=int, default=384, choices=(256, 384))
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: as published for the size")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trust-pickle", action="store_true")
    args = parser.parse_args(argv)
    scale = args.cfg_scale if args.cfg_scale is not None else PUBLISHED_CFG.get(args.size)
    if scale is None:
        parser.error(f"--cfg-scale: no published guidance scale for {args.size}; give one")
    config = config_for(args.size, args.image_size, 16, cfg_scale=scale)
    vq_config = VQConfig(image_size=args.image_size)
    out = convert(read_checkpoint(args.gpt, args.trust_pickle), read_checkpoint(args.vq, args.trust_pickle), config,
                  vq_config, args.out)
    print(f"{out}: {args.size} at {args.image_size} px ({config.block_size} tokens), guidance {scale}")


if __name__ == "__main__":
    main()
