"""The columns of the report's runs table (``report.columns`` / ``python -m runners.report --columns``).

A column is an alias below or a dotted path into a result record (``timings_s.load``,
``metrics.speed.pruned.decode_ms_per_token``, ``metrics.zeroshot.tasks.austen_next.acc``, ``device.torch_threads``);
a key that itself contains dots (a perplexity protocol on a file, ``/data/test.txt@256``) is matched whole. Two
aliases expand to several columns: ``ppl`` (one per perplexity protocol of the records) and ``acc`` (one per
zero-shot task). ``report.baseline`` names the run every row is divided by (:func:`parse_baseline`).

Imports nothing heavy: the runner's validation checks the names before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# the top-level keys of a result record (runners/results.py: assemble), where a dotted path may start
RECORD_KEYS = ("run_id", "sweep", "created", "model", "pruner", "pattern", "sparsity", "method_losses", "metrics",
               "timings_s", "memory", "calibration", "seed", "device", "versions", "code", "config", "structure",
               "saved_model", "reused_from", "pruned_from", "kept_pruned", "prune_id")

_MISSING = object()


def lookup(record: dict, path: str):
    """The value at a dotted ``path`` of ``record`` (None where absent); dict keys containing dots match whole."""
    def walk(obj, parts):
        if not parts:
            return obj
        if isinstance(obj, dict):
            for i in range(len(parts), 0, -1):  # the longest key first: "bundled.txt@256" before "bundled"
                key = ".".join(parts[:i])
                if key in obj:
                    found = walk(obj[key], parts[i:])
                    if found is not _MISSING:
                        return found
        return _MISSING

    found = walk(record, path.split("."))
    return None if found is _MISSING else found


def _eval_seconds(rec: dict):
    times = [v for k, v in (rec.get("timings_s") or {}).items() if k.startswith("eval/")]
    return round(sum(times), 3) if times else None


def _parameters(rec: dict):
    structure = rec.get("structure")
    return structure["parameters_after"] if structure else (rec.get("model") or {}).get("parameters")


def _method_loss(rec: dict):
    losses = [v for v in (rec.get("method_losses") or {}).values() if isinstance(v, (int, float))]
    return sum(losses) if losses else None


def _path(path: str) -> Callable[[dict], Any]:
    return lambda rec: lookup(rec, path)


# alias -> (value of a record, description for the caption, whether a ratio to the baseline means something)
ALIASES: dict[str, tuple[Callable[[dict], Any], str, bool]] = {
    "prune_s": (_path("timings_s.prune"), "prune time, s (calibration forwards, statistics, masks and updates)", True),
    "load_s": (_path("timings_s.load"), "model load time, s", True),
    "eval_s": (_eval_seconds, "evaluation time, s (every eval/* timing)", True),
    "total_s": (_path("timings_s.total"), "the run's time from its start to its record, s", True),
    "peak_host_mb": (_path("memory.peak_host_rss_mb"), "peak host memory, MB (ru_maxrss of the process)", True),
    "peak_device_mb": (_path("memory.peak_device_mb"), "peak CUDA memory allocated, MB", True),
    "sparsity": (_path("sparsity.overall"), "measured sparsity of the prunable weights", False),
    "parameters": (_parameters, "parameters of the (pruned) model", True),
    "method_loss": (_method_loss, "the method's own layer-wise loss estimate, summed over the pruned linears", True),
    "zeroshot_acc": (_path("metrics.zeroshot.average.acc"), "zero-shot accuracy, mean over the tasks", True),
    "zeroshot_s": (_path("metrics.zeroshot.seconds"), "zero-shot evaluation time, s (as the backend ran it)", True),
    "decode_ms": (_path("metrics.speed.pruned.decode_ms_per_token"), "decode ms/token (first speed batch size)", True),
    "decode_speedup": (_path("metrics.speed.speedup.decode"), "decode speedup vs dense, same process", False),
    "prefill_speedup": (_path("metrics.speed.speedup.prefill"), "prefill speedup vs dense, same process", False),
    "threads": (_path("device.torch_threads"), "torch threads of the run", False),
    "fid": (_path("metrics.image.fid"), "FID of the generated samples (eval=image)", True),
    "ms_per_image": (_path("metrics.speed.pruned.ms_per_image"), "generation ms/image (first speed batch size)", True),
    "generate_speedup": (_path("metrics.speed.speedup.generate"), "generation speedup vs dense, same process",
                         False),
}
EXPANDING = {"ppl": "perplexity per protocol", "acc": "zero-shot accuracy per task"}
DEFAULT = ("ppl", "prune_s", "total_s", "peak_host_mb")  # a baseline given without columns


@dataclass(frozen=True)
class Column:
    label: str
    value: Callable[[dict], Any]
    description: str
    ratio: bool = True


def check_column(spec: str) -> None:
    """Raise ValueError unless ``spec`` is an alias or a dotted path starting at a record key."""
    spec = str(spec).strip()
    if spec in ALIASES or spec in EXPANDING:
        return
    head = spec.split(".", 1)[0]
    if "." in spec and head in RECORD_KEYS and all(spec.split(".")):
        return
    raise ValueError(f"{spec}: not a column (aliases: {', '.join([*EXPANDING, *ALIASES])}; or a dotted record "
                     f"path starting at one of {', '.join(RECORD_KEYS)}, e.g. timings_s.load)")


def expand(specs, records: list[dict]) -> list[Column]:
    """The columns of ``specs`` for these records (``ppl`` / ``acc``: one per protocol / task found)."""
    out: list[Column] = []
    for spec in specs:
        spec = str(spec).strip()
        check_column(spec)
        if spec == "ppl":
            keys = dict.fromkeys(k for r in records for k in (r.get("metrics") or {}).get("ppl", {}))
            out += [Column(f"ppl {k}", _path(f"metrics.ppl.{k}.value"), f"perplexity, {k}") for k in keys]
        elif spec == "acc":
            tasks = dict.fromkeys(t for r in records for t in ((r.get("metrics") or {}).get("zeroshot") or {})
                                  .get("tasks", {}))
            out += [Column(f"acc {t}", _path(f"metrics.zeroshot.tasks.{t}.acc"), f"zero-shot acc, {t}") for t in tasks]
        elif spec in ALIASES:
            value, description, ratio = ALIASES[spec]
            out.append(Column(spec, value, description, ratio))
        else:
            out.append(Column(spec, _path(spec), spec))
    return out


def parse_baseline(spec: str) -> tuple[str, str]:
    """``magnitude`` -> ``("method", "magnitude")``; ``eval.zeroshot.backend=memory`` -> that key and value."""
    spec = str(spec).strip()
    if "=" in spec:
        key, value = (part.strip() for part in spec.split("=", 1))
        if not key or not value:
            raise ValueError(f"{spec}: give <config key>=<value>, e.g. eval.zeroshot.backend=memory")
        return key, value
    if not spec:
        raise ValueError("a baseline is a pruner name (magnitude) or <config key>=<value>")
    return "method", spec


def text(value) -> str:
    """A config value as it is written on the command line (``true``, ``null``, ``0.5``, ``[1,8]``)."""
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))
