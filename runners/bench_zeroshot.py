"""Benchmark: lm-eval's CLI on a saved checkpoint vs PruneLab's in-memory path, same tasks and batch size.

    python -m runners.bench_zeroshot [--model tiny-llama] [--tasks austen_next,austen_cloze]
        [--batch-size 8] [--limit N] [--device cpu] [--threads 1] [--out outputs/bench/zeroshot]

1. In-process, timed step by step (imports, ``models.load``, :func:`evaluators.zeroshot.load_tasks`,
   :func:`evaluators.zeroshot.evaluate_zeroshot`) in this fresh process;
2. the same model object (unchanged by the evaluation) and its tokenizer are saved to a temporary
   directory, and ``lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks ...
   --include_path <bundled tasks> --device ... --batch_size ... --output_path ...`` runs as a
   subprocess (wall time measured around it; its results JSON is parsed);
3. accuracies are compared per task (they should be identical: same model, data, batching rule).

Writes ``summary.json`` and ``summary.md`` under ``--out`` (plus the CLI's log and results). A record,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cli_command(args, checkpoint: Path, output: Path, include: Path) -> list[str]:
    script = Path(sys.executable).with_name("lm_eval")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    cmd = base + ["--model", "hf", "--model_args", f"pretrained={checkpoint},dtype=float32",
                  "--tasks", args.tasks, "--include_path", str(include), "--device", args.device,
                  "--batch_size", str(args.batch_size), "--output_path", str(output)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd


def _cli_results(output: Path) -> dict:
    files = sorted(output.rglob("results_*.json"))
    if not files:
        raise FileNotFoundError(f"lm_eval wrote no results_*.json under {output}")
    return json.loads(files[-1].read_text())


def _acc(entry: dict, metric: str):
    value = entry.get(f"{metric},none")
    return value if isinstance(value, (int, float)) else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="a conf/model name")
    parser.add_argument("--tasks", default="austen_next,austen_cloze")
    parser.add_argument("--batch-size", default="8", help="an int, or auto (then each side applies its own rule)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--out", default="outputs/bench/zeroshot")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()  # the CLI runs in a temporary cwd
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    batch_size = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)

    # ---- in-process -------------------------------------------------------------------------
    t0 = time.perf_counter()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import lm_eval
    import lm_eval.evaluator  # noqa: F401 - timed as part of the in-process imports
    import lm_eval.models.huggingface  # noqa: F401
    from hydra import compose, initialize_config_dir

    import models
    from evaluators import zeroshot

    from .record import library_versions
    from .run import CONF_DIR

    t1 = time.perf_counter()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "model.dtype=float32"])
    loaded = models.load(cfg.model, args.device)
    t2 = time.perf_counter()
    task_dict = zeroshot.load_tasks(tasks)
    t3 = time.perf_counter()
    ours = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, task_dict, args.device, batch_size=batch_size,
                                      limit=args.limit)
    t4 = time.perf_counter()
    inproc = {"import_s": t1 - t0, "load_model_s": t2 - t1, "load_tasks_s": t3 - t2, "evaluate_s": t4 - t3,
              "total_s": t4 - t0, "total_excluding_model_load_s": (t4 - t0) - (t2 - t1)}
    print(f"in-process: evaluate {inproc['evaluate_s']:.1f} s, total {inproc['total_s']:.1f} s", flush=True)

    # ---- lm-eval CLI on a saved checkpoint -----------------------------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="prunelab-zeroshot-"))
    try:
        checkpoint = tmp / "checkpoint"
        t5 = time.perf_counter()
        loaded.model.save_pretrained(checkpoint)
        loaded.tokenizer.save_pretrained(checkpoint)
        save_s = time.perf_counter() - t5
        cli_out = out / "cli"
        shutil.rmtree(cli_out, ignore_errors=True)
        cmd = _cli_command(args, checkpoint, cli_out, zeroshot.BUNDLED_TASKS_DIR)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
               "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
        t6 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        cli_wall = time.perf_counter() - t6
        (out / "cli_log.txt").write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"lm_eval exited with {proc.returncode}; see {out / 'cli_log.txt'}")
        theirs = _cli_results(cli_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lm_eval CLI: {cli_wall:.1f} s wall", flush=True)

    # ---- comparison --------------------------------------------------------------------------
    per_task = {}
    for name in ours["tasks"]:
        entry = theirs["results"].get(name, {})
        mine = ours["tasks"][name]
        per_task[name] = {
            "acc_in_memory": mine["acc"], "acc_cli": _acc(entry, "acc"),
            "acc_norm_in_memory": mine["acc_norm"], "acc_norm_cli": _acc(entry, "acc_norm"),
            "samples_in_memory": mine["samples"],
            "samples_cli": theirs.get("n-samples", {}).get(name, {}).get("effective"),
            "version_in_memory": mine["version"], "version_cli": theirs.get("versions", {}).get(name),
        }
        per_task[name]["same_acc"] = (per_task[name]["acc_in_memory"] == per_task[name]["acc_cli"]
                                      and per_task[name]["acc_norm_in_memory"] == per_task[name]["acc_norm_cli"])
    config = theirs.get("config", {})
    summary = {
        "model": args.model, "parameters": loaded.source.get("parameters"), "device": args.device,
        "tasks": tasks, "limit": args.limit, "threads": threads,
        "batch_size": {"requested": args.batch_size, "in_memory": ours["batch_size"]["used"],
                       "cli": config.get("batch_sizes") or config.get("batch_size")},
        "in_memory": {k: round(v, 3) for k, v in inproc.items()},
        "cli": {"wall_s": round(cli_wall, 3), "save_checkpoint_s": round(save_s, 3),
                "reported_total_evaluation_time_s": _float(theirs.get("total_evaluation_time_seconds"))},
        "ratios": {"cli_wall / in_memory_evaluate": round(cli_wall / inproc["evaluate_s"], 2),
                   "cli_wall / in_memory_total": round(cli_wall / inproc["total_s"], 2),
                   "(cli_wall + save) / in_memory_total": round((cli_wall + save_s) / inproc["total_s"], 2)},
        "per_task": per_task,
        "all_same_acc": all(t["same_acc"] for t in per_task.values()),
        "versions": {**library_versions(), "lm_eval_reported": ours["lm_eval_version"],
                     "lm_eval_imported": getattr(lm_eval, "__version__", None)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "cli_command": " ".join(cmd),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary))
    return summary


def _float(value):
    try:
        return round(float(value), 3)
    except (TypeError, ValueError):
        return None


def _markdown(s: dict) -> str:
    inp, cli = s["in_memory"], s["cli"]
    lines = [
        f"# Zero-shot: lm-eval CLI on a saved checkpoint vs in-memory ({s['model']}, {s['device']}, "
        f"{s['threads']} threads)", "",
        f"Tasks {', '.join(s['tasks'])}, limit {s['limit'] or 'none'}, batch size requested {s['batch_size']['requested']} "
        f"(in-memory used {s['batch_size']['in_memory']}, CLI used {s['batch_size']['cli']}); "
        f"lm_eval {s['versions'].get('lm_eval')}, torch {s['versions'].get('torch')}, "
        f"transformers {s['versions'].get('transformers')}.", "",
        "| path | seconds |", "|---|---:|",
        f"| in-memory: imports | {inp['import_s']:.2f} |",
        f"| in-memory: load model | {inp['load_model_s']:.2f} |",
        f"| in-memory: load tasks | {inp['load_tasks_s']:.2f} |",
        f"| in-memory: evaluate | {inp['evaluate_s']:.2f} |",
        f"| in-memory: total | {inp['total_s']:.2f} |",
        f"| in-memory: total without model load | {inp['total_excluding_model_load_s']:.2f} |",
        f"| save checkpoint (CLI needs it) | {cli['save_checkpoint_s']:.2f} |",
        f"| lm_eval CLI subprocess, wall | {cli['wall_s']:.2f} |",
        f"| lm_eval CLI, its own total_evaluation_time | {cli['reported_total_evaluation_time_s']} |", "",
        "| ratio | value |", "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in s["ratios"].items()], "",
        "| task | acc in-memory | acc CLI | acc_norm in-memory | acc_norm CLI | docs | same |",
        "|---|---:|---:|---:|---:|---:|---|",
        *[f"| {name} | {t['acc_in_memory']:.4f} | {_fmt(t['acc_cli'])} | {_fmt(t['acc_norm_in_memory'])} | "
          f"{_fmt(t['acc_norm_cli'])} | {t['samples_in_memory']} | {'yes' if t['same_acc'] else 'NO'} |"
          for name, t in s["per_task"].items()], "",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


if __name__ == "__main__":
    main()
