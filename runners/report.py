"""``python -m runners.report outputs/<sweep>``: result records -> paper-style tables, plots and W&B.

Reads every ``result.json`` under the sweep folder and writes to ``<sweep>/report/`` (or ``--out``):

- ``ppl.{md,csv,tex}``: perplexity, method rows (dense first) x (model, protocol) columns, one block per
  pattern, with the change vs dense; a ``paper`` column beside ``ours`` when the sweep's preset has
  published numbers (``report.published`` in the records' config, or ``--published NAME``);
- ``ppl_by_sparsity.{md,csv,tex}``: per (model, protocol), method rows x sparsity-pattern columns;
- ``zeroshot.{md,csv,tex}``: per model, method/pattern rows x task accuracy columns + average (when any
  record has zero-shot metrics);
- ``speed.{md,csv,tex}``: parameters and decode / prefill time, pruned vs dense (runs that measured speed:
  structured runs by default), a row per speed batch size;
- ``runs.{md,csv,tex}`` (``report.columns`` / ``--columns``, e.g. a benchmark preset's): one row per run with the
  chosen record values (:mod:`runners.columns`: ``ppl``, ``prune_s``, ``peak_host_mb``, ... or dotted record paths),
  the other keys the sweep varied, and with ``report.baseline`` / ``--baseline`` (a pruner, or
  ``<config key>=<value>``) each value's ratio to the baseline run's; the caption says whether each peak memory is
  its run's own (one process per run) or a process's running peak;
- ``records.csv``: every metric of every record shown, one row each (the tidy source of all tables);
- ``stale.md``: records left out: stale ones (another code fingerprint than the newest record of their
  cell, i.e. same config but seed; ``--include-stale`` keeps them) and duplicates (same cell, seed and code:
  the newest is kept). Several seeds of a cell: mean ± sd (n=k);
- ``ppl_vs_sparsity.png`` (log scale when the values span more than a decade) and
  ``zeroshot_vs_sparsity.png``;
- W&B: the tables as ``wandb.Table`` and the plots as images, in a ``report`` run of the sweep's group
  (offline by default; ``--wandb disabled`` to skip).

Every table's caption names the protocol (dataset, split, windows x seqlen) its numbers come from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import pandas as pd

from pruners.masks import parse_pattern_label, pattern_label

from . import columns
from .record import cell_key, read_record
from .validate import published_path

DENSE = "dense"


# ---------------------------------------------------------------------------------------------
# records -> tidy rows


def pattern_key(pattern: dict) -> str:
    """Column label of a record's sparsity pattern (:func:`pruners.masks.pattern_label`): ``dense``, ``50%``,
    ``2:4``, ``30% struct``."""
    return pattern_label(pattern["kind"], pattern.get("ratio"), pattern.get("n"), pattern.get("m"))


def method_label(rec: dict, variant: bool = True) -> str:
    """The method column: the pruner, with its sparsity allocation where it is not the default
    (``wanda (OWL λ=0.08 M=5)``; :meth:`pruners.allocation.Allocation.describe`) and, with ``variant``, the keys
    that tell its cell from the other cells of the same model, method and pattern (:func:`label_variants`:
    ``dense (eval.ppl.max_windows=16)``)."""
    allocation = rec["pattern"].get("allocation")
    label = f"{rec['pruner']} ({allocation})" if allocation else rec["pruner"]
    if rec.get("shown"):  # report.label_keys that differ from the pruner's default (label_variants)
        label += f" ({rec['shown']})"
    return f"{label} ({rec['variant']})" if variant and rec.get("variant") else label


def cell_content(rec: dict, baseline: bool = False) -> dict:
    """What a record's cell covers (:func:`runners.record.cell_key`) as ``{dotted key: value}``: its result config
    without the seed, and its identity (``identity.resolved.dtype``, ``identity.data.eval/bundled.sha256``, ...)
    without library versions. ``baseline``: what a dense record shares with the pruning runs it is the baseline
    of (no pruner, sparsity, calibration)."""
    from .identity import scoped, strip_unresolved
    from .record import result_config

    prunes = rec["pattern"]["kind"] != DENSE and not baseline
    calibrates = rec.get("calibration") is not None and not baseline
    config = result_config(rec["config"], prunes=prunes, calibrates=calibrates)
    identity = scoped(rec.get("identity"), "run" if prunes else "dense")
    if identity is not None:
        config = {**strip_unresolved(config), "identity": {k: v for k, v in identity.items() if k != "versions"}}
    drop = ("seed", "pruner") if baseline else ("seed",)
    return {k: v for k, v in _flat(config).items() if k not in drop and not k.startswith(tuple(d + "." for d in drop))}


def _differing(contents: list[dict]) -> list[str]:
    keys = sorted({k for c in contents for k in c})
    return [k for k in keys if len({columns.text(c.get(k, "\0absent")) for c in contents}) > 1]


def shown_keys(rec: dict, label_keys) -> str:
    """``pruner.<key>=<value>`` for each of ``label_keys`` the record's pruner has and sets to something other than
    its default (``report.label_keys``: the variants a paper's table names, e.g. ``pruner.remedy=true``)."""
    import dataclasses

    from pruners import PRUNERS

    cls = PRUNERS.get(rec["pruner"])
    if cls is None or not label_keys:
        return ""
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    values = (rec.get("config") or {}).get("pruner") or {}
    shown = []
    for key in label_keys:
        name = str(key).removeprefix("pruner.")
        if name in defaults and name in values and columns.text(values[name]) != columns.text(defaults[name]):
            shown.append(f"pruner.{name}={_value_text(values[name])}")
    return ", ".join(shown)


def label_variants(records: list[dict], label_keys=()) -> None:
    """Records of different cells that would share a table position (model, method, pattern) get ``variant``: the
    keys whose values tell the cells apart (``eval.ppl.max_windows=16``), so that no table ever averages two
    configurations; records that are alone at their position get none. ``label_keys`` (``report.label_keys``) are
    named in the method label itself wherever a record's value is not its pruner's default (``shown``), so that the
    label does not depend on which other runs share the folder. Each record also gets ``baseline``: the method
    label of the dense record with the same model, evaluation and identity (None: no such record)."""
    groups: dict = {}
    for rec in records:
        rec["shown"] = shown_keys(rec, label_keys)
    for rec in records:
        rec.pop("variant", None)
        rec["cell"] = rec.get("cell") or record_cell(rec)
        key = (rec["model"]["name"], method_label(rec, variant=False), pattern_key(rec["pattern"]))
        groups.setdefault(key, {}).setdefault(rec["cell"], []).append(rec)
    for cells in groups.values():
        if len(cells) < 2:
            continue
        contents = {cell: cell_content(recs[0]) for cell, recs in cells.items()}
        keys = _differing(list(contents.values()))
        for cell, recs in cells.items():
            text = ", ".join(f"{k}={_value_text(contents[cell].get(k, '-'))}" for k in keys)
            for rec in recs:
                rec["variant"] = text
    dense = {}
    for rec in records:
        if rec["pattern"]["kind"] == DENSE:
            dense[(rec["model"]["name"], _digest_content(cell_content(rec, baseline=True)))] = method_label(rec)
    for rec in records:
        rec["baseline"] = dense.get((rec["model"]["name"], _digest_content(cell_content(rec, baseline=True))))


def _value_text(value) -> str:
    return "null" if value is None else columns.text(value)


def _digest_content(content: dict) -> str:
    return json.dumps(content, sort_keys=True, default=str)


def load_records(folder: Path) -> list[dict]:
    """All complete records under ``folder`` (temporary files of an interrupted write are not records)."""
    records = []
    for path in sorted(Path(folder).rglob("result.json")):
        if ".hydra" in path.parts or "wandb" in path.parts:
            continue
        record = read_record(path)
        if record is not None and "metrics" in record:
            record["path"] = str(path)
            records.append(record)
    return records


def record_cell(rec: dict) -> str:
    """The record's cell (:func:`runners.record.cell_key`): its result config and identity (resolved device type,
    dtype, attention; checkpoint and data content) without seed, code and library versions."""
    prunes = rec["pattern"]["kind"] != DENSE
    return cell_key(rec["config"], prunes=prunes, calibrates=rec.get("calibration") is not None,
                    identity=rec.get("identity"))


def _legacy_cell(rec: dict) -> str:
    """The record's cell by its config alone (as before identities existed)."""
    prunes = rec["pattern"]["kind"] != DENSE
    return cell_key(rec["config"], prunes=prunes, calibrates=rec.get("calibration") is not None)


def record_fingerprint(rec: dict) -> str | None:
    """The code a record's numbers come from: the scoped code fingerprint (older records: their whole-tree
    digest) and the library versions its id covers (``identity.versions``): records of one cell that differ in
    either are never mixed (the older are stale)."""
    code = rec.get("code") or {}
    if code.get("fingerprint"):
        fingerprint = code["fingerprint"]
    elif code.get("source_digest"):
        fingerprint = f"digest:{code['source_digest']}"
    else:
        return None
    versions = (rec.get("identity") or {}).get("versions")
    if versions:
        fingerprint += " " + " ".join(f"{k}={v}" for k, v in sorted(versions.items()))
    return fingerprint


def select_records(records: list[dict], include_stale: bool = False) -> tuple[list[dict], list[dict], list[dict]]:
    """``(kept, stale, duplicates)``: never mix code versions or count a run twice.

    Per cell, the newest record (``created``) fixes the code fingerprint; records of another fingerprint are
    stale (left out unless ``include_stale``). One record per (cell, seed, fingerprint): the newest; the
    others are duplicates (a run copied into another sweep, or a forced re-run). Each record in ``stale``
    and ``duplicates`` gets ``superseded_by`` (the path of the record that replaces it).
    """
    # records written before ids had an identity (runners/identity.py) are stale once a newer record of the same
    # config has one: they come from older code, and their own cell would otherwise show them as another row
    current: dict[str, dict] = {}
    for rec in records:
        if rec.get("identity") is not None:
            legacy = _legacy_cell(rec)
            if legacy not in current or str(rec.get("created") or "") > str(current[legacy].get("created") or ""):
                current[legacy] = rec
    by_cell: dict[str, list[dict]] = {}
    kept, stale, duplicates = [], [], []
    for rec in records:
        rec["cell"], rec["fingerprint"] = record_cell(rec), record_fingerprint(rec)
        newer = current.get(_legacy_cell(rec)) if rec.get("identity") is None else None
        if newer is not None:
            stale.append({**rec, "stale": True, "superseded_by": newer.get("path")})
            if not include_stale:
                continue
        by_cell.setdefault(rec["cell"], []).append(rec)
    for recs in by_cell.values():
        recs = sorted(recs, key=lambda r: (str(r.get("created") or ""), r.get("path", "")), reverse=True)
        newest = recs[0]
        seen: dict = {}
        for rec in recs:
            is_stale = rec["fingerprint"] != newest["fingerprint"]
            rec["stale"] = is_stale
            if is_stale:
                stale.append({**rec, "superseded_by": newest.get("path")})
                if not include_stale:
                    continue
            key = (rec.get("seed"), rec["fingerprint"])
            if key in seen:
                duplicates.append({**rec, "superseded_by": seen[key].get("path")})
                continue
            seen[key] = rec
            kept.append(rec)
    return kept, stale, duplicates


def markdown_stale(stale: list[dict], duplicates: list[dict], include_stale: bool) -> str:
    lines = []
    if stale:
        lines += ["**Stale records** (code fingerprint differs from the newest record of the same cell; "
                  + ("included: --include-stale" if include_stale else "left out; --include-stale keeps them")
                  + ")", "", "| record | run id | seed | created | fingerprint | newest record |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.get('path')} | {r['run_id']} | {r.get('seed')} | {r.get('created')} | {r['fingerprint']} "
                  f"| {r['superseded_by']} |" for r in stale]
        lines.append("")
    if duplicates:
        lines += ["**Duplicate records** (same cell, seed and code; the newest is kept)", "",
                  "| record | run id | seed | created | kept record |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('path')} | {r['run_id']} | {r.get('seed')} | {r.get('created')} | {r['superseded_by']} |"
                  for r in duplicates]
        lines.append("")
    return "\n".join(lines)


def tidy(records: list[dict]) -> pd.DataFrame:
    """One row per (record, metric): model, method, pattern, ratio, metric, dataset, value, stderr, protocol."""
    rows = []
    for rec in records:
        base = {"model": rec["model"]["name"], "method": method_label(rec), "pattern": pattern_key(rec["pattern"]),
                "kind": rec["pattern"]["kind"], "ratio": rec["sparsity"]["target"],
                "measured_sparsity": rec["sparsity"]["overall"], "run_id": rec["run_id"],
                "prune_s": rec["timings_s"].get("prune"), "seed": rec.get("seed"),
                "cell": rec.get("cell") or record_cell(rec),
                "fingerprint": rec.get("fingerprint") or record_fingerprint(rec), "created": rec.get("created"),
                "baseline": rec.get("baseline")}
        for key, entry in rec["metrics"].get("ppl", {}).items():
            prov = entry.get("protocol", {})
            rows.append({**base, "metric": "ppl", "dataset": key, "value": entry["value"], "stderr": None,
                         "protocol": _describe_protocol(key, prov)})
        image = rec["metrics"].get("image")
        for key in IMAGE_METRICS if image else ():
            if image.get(key) is not None:
                rows.append({**base, "metric": key, "dataset": "image", "value": image[key], "stderr": None,
                             "protocol": _describe_image(image)})
        zeroshot = rec["metrics"].get("zeroshot")
        if zeroshot:
            for task, values in zeroshot["tasks"].items():
                rows.append({**base, "metric": "acc", "dataset": task, "value": values["acc"],
                             "stderr": values.get("acc_stderr"), "protocol": _describe_zeroshot(zeroshot)})
                if values.get("acc_norm") is not None:
                    rows.append({**base, "metric": "acc_norm", "dataset": task, "value": values["acc_norm"],
                                 "stderr": values.get("acc_norm_stderr"), "protocol": _describe_zeroshot(zeroshot)})
            rows.append({**base, "metric": "acc", "dataset": "average", "value": zeroshot["average"]["acc"],
                         "stderr": None, "protocol": _describe_zeroshot(zeroshot)})
    columns = ["model", "method", "pattern", "kind", "ratio", "measured_sparsity", "metric", "dataset", "value",
               "stderr", "protocol", "run_id", "prune_s", "seed", "cell", "fingerprint", "created", "baseline"]
    # pass records through select_records first: several seeds of one cell are then averaged below (mean, sd, n)
    return pd.DataFrame(rows, columns=columns)


def _describe_protocol(key: str, prov: dict) -> str:
    parts = [prov.get("reference") or prov.get("name") or key]
    if prov.get("windows") and prov.get("seqlen"):
        parts.append(f"{prov['windows']} windows x {prov['seqlen']} tokens")
    return f"{key}: " + ", ".join(parts)


IMAGE_METRICS = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Prec", "recall": "Rec",
                 "class_accuracy": "class acc", "class_fid": "class FID"}  # (lower is better: FID, sFID, class FID)


def _describe_image(image: dict) -> str:
    size = "x".join(str(n) for n in image.get("resolution", []))
    return (f"{image.get('samples')} samples at {size} ({image.get('labels')} labels, guidance "
            f"{image.get('sampling', {}).get('cfg_scale')}, seed {image.get('seed')}), {image.get('features')} "
            f"features vs {image.get('reference')}")


def _describe_zeroshot(zeroshot: dict) -> str:
    limit = zeroshot.get("limit")
    return (f"lm-evaluation-harness {zeroshot.get('lm_eval_version')}, {zeroshot.get('num_fewshot', 0)}-shot"
            + (f", limit {limit}" if limit else ""))


def method_order(methods) -> list[str]:
    """Dense first, then the baselines in their usual order, then the rest alphabetically; a method with a
    non-uniform allocation (``wanda (OWL ...)``) right after its uniform row."""
    known = [DENSE, "magnitude", "wanda", "sparsegpt"]

    def key(method: str):
        base, _, variant = method.partition(" (")
        return (known.index(base) if base in known else len(known), base, variant)
    return sorted(set(methods), key=key)


def pattern_order(patterns) -> list[str]:
    """Dense, unstructured by ratio, N:M by ratio (larger groups after), structured, heads, rows + columns, then
    whole experts, each by ratio."""
    rank = {"dense": 0, "unstructured": 1, "nm": 2, "structured": 3, "heads": 4, "rowcol": 5, "experts": 6}

    def key(p: str):
        parsed = parse_pattern_label(p)
        return (rank[parsed["kind"]], parsed["ratio"], -(parsed["m"] or 0))
    return sorted(set(patterns), key=key)


# ---------------------------------------------------------------------------------------------
# published numbers


def load_published(name: str | None, model_map: dict | None = None, dataset_map: dict | None = None) -> pd.DataFrame:
    """``conf/experiment/<name>.published.csv`` (model, method, pattern, dataset, metric, value, tag, source),
    with paper models and protocols renamed to ours through ``model_map`` / ``dataset_map`` ({ours: paper})."""
    columns = ["model", "method", "pattern", "dataset", "metric", "value", "tag", "source"]
    if not name:
        return pd.DataFrame(columns=columns)
    frame = pd.read_csv(published_path(name), comment="#", dtype={"pattern": str})
    frame = frame[[c for c in columns if c in frame.columns]]
    for label in frame["pattern"]:  # one label format: parsed, so a typo fails here and not as a missing cell
        try:
            parse_pattern_label(label)
        except ValueError as err:
            raise ValueError(f"{published_path(name)}: {err}") from None
    if model_map:
        reverse = {paper: ours for ours, paper in model_map.items()}
        frame = frame.assign(model=frame["model"].map(lambda m: reverse.get(m, m)))
    if dataset_map:
        reverse = {paper: ours for ours, paper in dataset_map.items()}
        frame = frame.assign(dataset=frame["dataset"].map(lambda d: reverse.get(d, d)))
    return frame


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _spread(sd, n) -> str:
    """`` ± sd (n=k)`` for a mean over k > 1 seeds, else nothing."""
    if n is None or pd.isna(n) or int(n) < 2:
        return ""
    return f" ± {_fmt(sd)} (n={int(n)})"


def _delta(value, dense) -> str:
    if value is None or dense is None or any(isinstance(v, float) and math.isnan(v) for v in (value, dense)):
        return ""
    return f" ({value - dense:+.2f})"


def ppl_table(frame: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Wide perplexity table: one row per (method, pattern), dense first; per (model, protocol) the columns
    ``ours``, ``delta`` (to dense) and, where published numbers exist, ``paper``."""
    ppl = frame[frame.metric == "ppl"]
    if ppl.empty:
        return pd.DataFrame()
    grouped = ppl.groupby(["method", "pattern", "model", "dataset"])["value"]
    cells, spread, count = grouped.mean(), grouped.std(), grouped.count()
    seeds = bool((count > 1).any())  # several seeds somewhere: sd and n columns
    paper = published[published.metric == "ppl"].set_index(["method", "pattern", "model", "dataset"])["value"] \
        if not published.empty else pd.Series(dtype=float)
    targets = sorted(set(zip(ppl.model, ppl.dataset, strict=True)))
    rows = []
    shown_models = {model for model, _ in targets}
    pairs = set(zip(ppl.method, ppl.pattern, strict=True))
    if not paper.empty:  # paper rows for the models we show, even where we have no run (yet)
        pairs |= {(m, p) for m, p, model, _ in paper.index if model in shown_models}
    combos = [(m, p) for p in pattern_order(p for _, p in pairs) for m in method_order(m for m, _ in pairs)
              if (m, p) in pairs]
    baselines = _baselines(ppl)
    for method, pattern in combos:
        row = {"method": method, "pattern": pattern}
        for model, dataset in targets:
            value = cells.get((method, pattern, model, dataset))
            base = baselines.get((method, pattern, model))
            dense = cells.get((base, DENSE, model, dataset)) if base else None
            row[f"{model} | {dataset} | ours"] = value
            row[f"{model} | {dataset} | delta"] = (value - dense) if value is not None and dense is not None else None
            if seeds:
                row[f"{model} | {dataset} | sd"] = spread.get((method, pattern, model, dataset))
                row[f"{model} | {dataset} | n"] = count.get((method, pattern, model, dataset))
            if not paper.empty and any(paper.index.get_level_values("model") == model):
                row[f"{model} | {dataset} | paper"] = paper.get((method, pattern, model, dataset))
        rows.append(row)
    table = pd.DataFrame(rows)
    keep = table.filter(like="| ours").notna().any(axis=1) | table.filter(like="| paper").notna().any(axis=1)
    return table[keep].reset_index(drop=True)


def _baselines(frame: pd.DataFrame) -> dict:
    """``{(method, pattern, model): the method label of its dense baseline}`` (records with one: the dense record of
    the same model, evaluation and identity, :func:`label_variants`)."""
    rows = frame.dropna(subset=["baseline"]) if "baseline" in frame else frame.iloc[0:0]
    return {(m, p, model): b for m, p, model, b in zip(rows.method, rows.pattern, rows.model, rows.baseline, strict=True)}


def ppl_by_sparsity(frame: pd.DataFrame, spreads: dict | None = None) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (model, protocol): method rows x pattern columns (the Wanda README layout), dense in its own column."""
    ppl = frame[frame.metric == "ppl"]
    out = {}
    for (model, dataset), part in ppl.groupby(["model", "dataset"]):
        pivot = part.pivot_table(index="method", columns="pattern", values="value", aggfunc="mean")
        rows, cols = method_order(pivot.index), pattern_order(pivot.columns)
        pivot = pivot.reindex(index=rows, columns=cols)
        if spreads is not None:  # seeds: shown as mean ± sd (n=k)
            spreads[(model, dataset)] = tuple(part.pivot_table(index="method", columns="pattern", values="value",
                                                               aggfunc=agg).reindex(index=rows, columns=cols)
                                              for agg in ("std", "count"))
        out[(model, dataset)] = pivot
    return out


def zeroshot_table(frame: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Accuracy (acc, %) per task and the average; rows (model, method, pattern), dense first per model. Where
    ``published`` has ``acc`` cells (in % as printed) for a row's model, method and pattern, a ``<method> [paper]``
    row follows it with those cells (tasks the records do not have are left out; its ``average`` is the paper's,
    over the paper's tasks, which equals ours only when the same tasks ran)."""
    acc = frame[frame.metric == "acc"]
    if acc.empty:
        return pd.DataFrame()
    pivot = acc.pivot_table(index=["model", "method", "pattern"], columns="dataset", values="value", aggfunc="mean")
    tasks = [c for c in pivot.columns if c != "average"] + ["average"]
    pivot = pivot[tasks] * 100
    order = [(model, m, p) for model in sorted(set(acc.model)) for m in method_order(acc.method)
             for p in pattern_order(acc.pattern) if (model, m, p) in pivot.index]
    pivot = pivot.reindex(order)
    baselines = _baselines(acc)
    dense_avg = {}
    for model, method, pattern in pivot.index:
        base = baselines.get((method, pattern, model))
        if base is not None and (model, base, DENSE) in pivot.index:
            dense_avg[(model, method, pattern)] = pivot.loc[(model, base, DENSE), "average"]
    pivot["delta avg"] = [pivot.loc[i, "average"] - dense_avg[i] if i in dense_avg else None for i in pivot.index]
    paper = published[published.metric == "acc"] if published is not None and not published.empty else None
    if paper is None or paper.empty:
        return pivot.reset_index()
    rows = []
    for (model, method, pattern), row in pivot.iterrows():
        rows.append({"model": model, "method": method, "pattern": pattern, **row.to_dict()})
        cells = paper[(paper.model == model) & (paper.method == method) & (paper.pattern == pattern)]
        if not cells.empty:
            values = dict(zip(cells.dataset, cells.value.astype(float), strict=True))
            rows.append({"model": model, "method": f"{method} [paper]", "pattern": pattern,
                         **{task: values.get(task) for task in tasks}, "delta avg": None})
    return pd.DataFrame(rows, columns=["model", "method", "pattern", *tasks, "delta avg"])


def image_table(frame: pd.DataFrame, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Image generators' metrics (the Numerical Pruning paper's Table 3 columns: FID, sFID, IS, precision, recall,
    then the class checks); rows (model, method, pattern), dense first; a ``<method> [paper]`` row after each row
    the published numbers have (their metrics named as ours: fid, sfid, is, precision, recall)."""
    rows = frame[frame.metric.isin(list(IMAGE_METRICS))]
    if rows.empty:
        return pd.DataFrame()
    pivot = rows.pivot_table(index=["model", "method", "pattern"], columns="metric", values="value", aggfunc="mean")
    metrics = [m for m in IMAGE_METRICS if m in pivot.columns]
    order = [(model, m, p) for model in sorted(set(rows.model)) for m in method_order(rows.method)
             for p in pattern_order(rows.pattern) if (model, m, p) in pivot.index]
    pivot = pivot.reindex(order)[metrics]
    paper = published[published.metric.isin(list(IMAGE_METRICS))] if published is not None else None
    out = []
    for (model, method, pattern), row in pivot.iterrows():
        out.append({"model": model, "method": method, "pattern": pattern, **row.to_dict()})
        cells = paper[(paper.model == model) & (paper.method == method) & (paper.pattern == pattern)] \
            if paper is not None and not paper.empty else []
        if len(cells):
            values = dict(zip(cells.metric, cells.value.astype(float), strict=True))
            out.append({"model": model, "method": f"{method} [paper]", "pattern": pattern,
                        **{m: values.get(m) for m in metrics}})
    return pd.DataFrame(out, columns=["model", "method", "pattern", *metrics])


def markdown_image(table: pd.DataFrame, caption: str) -> str:
    cols = [c for c in table.columns if c not in ("model", "method", "pattern")]
    lines = [f"**Image generation (FID, sFID, class FID: lower is better; IS, precision, recall, class accuracy: "
             f"higher).** {caption}", "",
             "| model | method | pattern | " + " | ".join(IMAGE_METRICS[c] for c in cols) + " |",
             "|---|---|---|" + "---:|" * len(cols)]
    for _, row in table.iterrows():
        lines.append(f"| {row['model']} | {row['method']} | {row['pattern']} | "
                     + " | ".join(_fmt(row[c], 3 if c in ("precision", "recall", "class_accuracy") else 2)
                                  for c in cols) + " |")
    return "\n".join(lines) + "\n"


def sample_grids(records: list[dict], folder: Path, out: Path) -> list[Path]:
    """Per model, the sample grids of its runs side by side (dense first, then by method and pattern), each under
    its label: ``samples_<model>.png``. Grids are the PNGs beside the records (``metrics.image.grid``)."""
    from PIL import Image, ImageDraw

    written = []
    by_model: dict[str, list] = {}
    for rec in records:
        image = rec["metrics"].get("image") or {}
        path = Path(rec.get("path", folder / rec["sweep"] / rec["run_id"] / "result.json")).parent / str(
            image.get("grid", ""))
        if image.get("grid") and path.is_file():
            by_model.setdefault(rec["model"]["name"], []).append((method_label(rec), pattern_key(rec["pattern"]), path))
    for model, entries in by_model.items():
        methods, patterns = method_order({e[0] for e in entries}), pattern_order({e[1] for e in entries})
        entries.sort(key=lambda e: (patterns.index(e[1]) if e[0] != DENSE else -1, methods.index(e[0])))
        opened = [Image.open(e[2]) for e in entries]
        mode = "RGB" if any(g.mode not in ("L", "1") for g in opened) else "L"
        grids = [g.convert(mode) for g in opened]
        head, gap = 14, 6
        width = sum(g.width for g in grids) + gap * (len(grids) - 1)
        canvas = Image.new(mode, (width, head + max(g.height for g in grids)), "white")
        draw, x = ImageDraw.Draw(canvas), 0
        for (method, pattern, _), grid in zip(entries, grids, strict=True):
            draw.text((x + 2, 1), method if method == DENSE else f"{method} {pattern}", fill="black")
            canvas.paste(grid, (x, head))
            x += grid.width + gap
        target = out / f"samples_{model}.png"
        canvas.save(target)
        written.append(target)
    return written


def allocation_table(records: list[dict]) -> pd.DataFrame:
    """Runs with a per-layer allocation (``sparsity.allocation`` other than uniform over every linear): per block,
    the ratio the allocation asked and the sparsity measured (``target / achieved``); one row per record."""
    rows = []
    for rec in records:
        allocation = rec["sparsity"].get("allocation") or {}
        if allocation.get("kind", "uniform") == "uniform" and not rec["pattern"].get("allocation"):
            continue
        asked, achieved = allocation.get("block_ratios") or [], rec["sparsity"].get("per_block") or []
        row = {"model": rec["model"]["name"], "method": method_label(rec), "pattern": pattern_key(rec["pattern"]),
               "seed": rec.get("seed"), "overall": rec["sparsity"]["overall"]}
        for i in range(max(len(asked), len(achieved))):
            target = asked[i] if i < len(asked) else None
            measured = achieved[i] if i < len(achieved) else None
            row[f"block {i}"] = ("dense" if target is None and not measured else
                                 f"{'-' if target is None else f'{target:.4f}'} / "
                                 f"{'-' if measured is None else f'{measured:.4f}'}")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_allocation(table: pd.DataFrame) -> str:
    cols = [c for c in table.columns if c.startswith("block ")]
    lines = ["**Per-layer sparsity** (runs with a non-uniform allocation): per block, the ratio the allocation "
             "asked / the sparsity measured over the block's prunable linears; per module: the record's "
             "sparsity.per_module.", "", "| model | method | pattern | seed | overall | " + " | ".join(cols) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(cols)]
    for _, row in table.iterrows():
        lines.append(f"| {row['model']} | {row['method']} | {row['pattern']} | {row['seed']} | {row['overall']:.4f} | "
                     + " | ".join(str(row[c]) if isinstance(row[c], str) else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _speed_rows(rows: list[dict]) -> pd.DataFrame:
    """Speed rows ordered by model, pattern, method (as the other tables), then batch size."""
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    order = {(m, pt): i for i, (m, pt) in enumerate((m, pt) for pt in pattern_order(table.pattern)
                                                    for m in method_order(table.method))}
    return table.assign(_o=[order[(m, pt)] for m, pt in zip(table.method, table.pattern, strict=True)]) \
        .sort_values(["model", "_o", "batch"], kind="stable").drop(columns="_o").reset_index(drop=True)


def speed_table(records: list[dict]) -> pd.DataFrame:
    """Runs that measured speed (structured runs by default): size and decode / prefill time, dense vs pruned,
    each pair taken in the same process."""
    rows = []
    for rec in records:
        speed = rec["metrics"].get("speed")
        if not speed or "ms_per_image" in speed["pruned"]:  # (image generators: image_speed_table)
            continue
        pairs = [(speed["dense"], speed["pruned"], speed["speedup"])]
        if speed["dense"].get("by_batch_size") and speed["pruned"].get("by_batch_size"):  # speed.batch_size: a list
            from evaluators.speed import ratio

            pairs = [(d, p, {"decode": ratio(d["decode_ms_per_token"], p["decode_ms_per_token"]),
                             "prefill": ratio(d["prefill_ms"], p["prefill_ms"])})
                     for b, d in speed["dense"]["by_batch_size"].items()
                     for p in [speed["pruned"]["by_batch_size"].get(b)] if p is not None]
        for d, p, x in pairs:
            rows.append({"model": rec["model"]["name"], "method": method_label(rec),
                         "pattern": pattern_key(rec["pattern"]), "batch": p["setup"]["batch_size"],
                         "parameters": p["parameters"], "parameters dense": d["parameters"],
                         "decode ms/token dense": d["decode_ms_per_token"], "decode ms/token": p["decode_ms_per_token"],
                         "decode speedup": x["decode"], "prefill ms dense": d["prefill_ms"], "prefill ms": p["prefill_ms"],
                         "prefill speedup": x["prefill"],
                         "setup": "{device}, {dtype}, {threads} threads, batch {batch_size}, prompt {prompt_len}, "
                                  "{new_tokens} new tokens".format(**p["setup"])})
    return _speed_rows(rows)


def image_speed_table(records: list[dict]) -> pd.DataFrame:
    """Image generators that measured speed: ms per image dense vs pruned (same process), per batch size."""
    from evaluators.speed import speedup

    rows = []
    for rec in records:
        speed = rec["metrics"].get("speed")
        if not speed or "ms_per_image" not in speed["pruned"]:
            continue
        dense, pruned = speed["dense"], speed["pruned"]
        pairs = [(dense.get("by_batch_size", {}).get(b, d), p) for b, p in pruned["by_batch_size"].items()
                 for d in [dense]] if pruned.get("by_batch_size") else [(dense, pruned)]
        for d, p in pairs:
            rows.append({"model": rec["model"]["name"], "method": method_label(rec),
                         "pattern": pattern_key(rec["pattern"]), "batch": p["setup"]["batch_size"],
                         "parameters": p["parameters"], "parameters dense": d["parameters"],
                         "ms/image dense": d["ms_per_image"], "ms/image": p["ms_per_image"],
                         "speedup": speedup(d, p)["generate"], "peak device MB": p.get("peak_device_mb"),
                         "setup": "{device}, {dtype}, {threads} threads, {tokens_per_image} tokens per image, guidance "
                                  "{cfg_scale}".format(**p["setup"])})
    return _speed_rows(rows)


def markdown_image_speed(table: pd.DataFrame) -> str:
    setups = "; ".join(sorted(set(table.setup)))
    lines = [f"**Generation speed, pruned vs dense (measured in the same process).** {setups}. Speedup = dense time "
             "/ pruned time.", "", "| model | method | pattern | batch | parameters | ms/image | speedup |",
             "|---|---|---|---:|---:|---:|---:|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['model']} | {row['method']} | {row['pattern']} | {row['batch']} | {row['parameters']:,} "
                     f"(dense {row['parameters dense']:,}) | {row['ms/image']:.2f} (dense {row['ms/image dense']:.2f}) "
                     f"| {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _timed(value, spec: str, suffix: str = "") -> str:
    """A time or a speedup formatted, or "not timed" where the record has none (evaluators/speed.py: a host too busy
    to time the decode; pandas turns such a None into NaN once another row has a number)."""
    return "not timed" if value is None or value != value else f"{value:{spec}}{suffix}"


def markdown_speed(table: pd.DataFrame) -> str:
    setups = "; ".join(sorted(set(table.setup)))
    cols = ["parameters", "decode ms/token", "decode speedup", "prefill ms", "prefill speedup"]
    lines = [f"**Inference speed, pruned vs dense (measured in the same process).** {setups}. Speedup = dense time "
             "/ pruned time.", "", "| model | method | pattern | batch | " + " | ".join(cols) + " |",
             "|---|---|---|---:|" + "---:|" * len(cols)]
    for _, row in table.iterrows():
        lines.append(f"| {row['model']} | {row['method']} | {row['pattern']} | {row['batch']} | {row['parameters']:,} "
                     f"(dense {row['parameters dense']:,}) | {_timed(row['decode ms/token'], '.2f')} (dense "
                     f"{_timed(row['decode ms/token dense'], '.2f')}) | {_timed(row['decode speedup'], '.2f', 'x')} | "
                     f"{row['prefill ms']:.1f} (dense {row['prefill ms dense']:.1f}) | "
                     f"{_timed(row['prefill speedup'], '.2f', 'x')} |")
    return "\n".join(lines) + "\n"


# the runs table (report.columns): one row per run, chosen record values, ratios to a baseline run


class OptionError(ValueError):
    """A runs-table option (``columns`` / ``baseline``) that does not fit the records: one line, exit code 2."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _flat(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{dotted key: value}`` (lists and empty mappings as leaves)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _result_keys(rec: dict) -> dict:
    """What can change the record's result, seed left out: its cell (:func:`cell_content`: the result config and
    the identity, e.g. ``identity.resolved.dtype``), so that runs of different cells are never one row."""
    return cell_content(rec)


def varying_keys(records: list[dict]) -> list[str]:
    """Config keys (of the result) that differ between records of the same model, method and pattern: what else
    the sweep swept (``device``, ``eval.zeroshot.backend``, ``calib.nsamples``, a pruner option, ...)."""
    groups: dict = {}
    for rec in records:
        groups.setdefault((rec["model"]["name"], method_label(rec, variant=False), pattern_key(rec["pattern"])), []).append(
            _result_keys(rec))
    varying: dict[str, None] = {}
    for configs in groups.values():
        for key in sorted({k for c in configs for k in c}):
            if len({columns.text(c.get(key, "\0absent")) for c in configs}) > 1:
                varying[key] = None
    return list(varying)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def runs_table(records: list[dict], specs, baseline: str | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per run (cell; several seeds: the mean, with ``n``): model, method, pattern, the other swept keys
    (:func:`varying_keys`), the columns of ``specs`` (:func:`runners.columns.expand`) and, with ``baseline``, each
    numeric column divided by the baseline run's (``<column> / <baseline>``).

    The baseline run of a row: ``pruner name`` -> the run of that method with the same model and pattern and the same
    values of the swept keys other than the pruner's and sparsity's own; ``key=value`` -> the run whose config has
    that value and which equals the row in model, method, pattern and the other swept keys. A baseline run that does
    not have a key (a dense run has no calibration) matches any value of it. Raises ValueError for a baseline that
    no record matches."""
    try:
        cols = columns.expand(specs, records)
    except ValueError as err:
        raise OptionError("columns", str(err)) from None
    vary = varying_keys(records)
    rows: dict = {}
    for rec in records:
        keys = _result_keys(rec)
        ident = (rec["model"]["name"], method_label(rec, variant=False), pattern_key(rec["pattern"]),
                 *(columns.text(keys[k]) if k in keys else None for k in vary))
        rows.setdefault(ident, []).append((rec, keys))
    table = []
    for ident, recs in rows.items():
        row = {"model": ident[0], "method": ident[1], "pattern": ident[2], "n": len(recs),
               **{k: ("-" if v is None else v) for k, v in zip(vary, ident[3:], strict=True)}}
        for col in cols:
            values = [col.value(rec) for rec, _ in recs]
            numbers = [v for v in values if _number(v)]
            row[col.label] = (sum(numbers) / len(numbers) if len(numbers) == len(values) else
                              next((v for v in values if v is not None), None))
        row["_flat"] = _flat(recs[0][0]["config"])
        row["_keys"] = recs[0][1]
        table.append(row)
    meta = {"columns": cols, "varying": vary, "baseline": baseline, "ratios": []}
    key, chosen = None, []
    if baseline:
        try:
            key, value = columns.parse_baseline(baseline)
        except ValueError as err:
            raise OptionError("baseline", str(err)) from None
        if key == "method":
            chosen = [r for r in table if r["method"] == value]
            if not chosen:
                raise OptionError("baseline", f"{baseline}: no run of that method (methods: "
                                 f"{', '.join(method_order(r['method'] for r in table))})")
            match = [k for k in vary if not k.startswith(("pruner.", "sparsity."))]
        else:
            seen = {columns.text(r["_flat"][key]) for r in table if key in r["_flat"]}
            chosen = [r for r in table if key in r["_flat"] and columns.text(r["_flat"][key]) == value]
            if not chosen:
                raise OptionError("baseline", f"{baseline}: no run has {key}={value} "
                                 f"({'values: ' + ', '.join(sorted(seen)) if seen else 'no run has the key ' + key})")
            match = [k for k in vary if k != key]
        same = ("model", "pattern") if key == "method" else ("model", "method", "pattern")

        def base_of(row):
            candidates = [b for b in chosen if all(b[k] == row[k] for k in same) and all(
                k not in b["_keys"] or b[k] == row[k] for k in match)]
            if len(candidates) < 2:
                return candidates[0] if candidates else None
            # several (a method baseline run with different settings of its own): the one that agrees with the row
            # on the most keys both have (pruner.shots=5 beside pruner.shots=1 and 5), the first on a tie
            shared = [k for k in vary if k not in match and k in row["_keys"]]
            return max(candidates, key=lambda b: sum(k in b["_keys"] and b[k] == row[k] for k in shared))

        numeric = [c for c in cols if c.ratio and any(_number(r[c.label]) for r in table)]
        for row in table:
            b = base_of(row)
            for col in numeric:
                value_, ref = row[col.label], None if b is None else b[col.label]
                row[f"{col.label} / {value}"] = (value_ / ref if _number(value_) and _number(ref) and ref else None)
        meta["ratios"] = [c.label for c in numeric]
        meta["match"] = [*same, *match]
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in table])
    order = {(m, p): i for i, (m, p) in enumerate((m, p) for p in pattern_order(frame.pattern)
                                                  for m in method_order(frame.method))}
    # dense first, then by pattern and method; rows of a key=value baseline before the others of their cell
    first = [not (baseline and key != "method" and any(r is b for b in chosen)) for r in table]
    frame = frame.assign(_o=[order[(m, p)] for m, p in zip(frame.method, frame.pattern, strict=True)], _b=first) \
        .sort_values(["model", "_o", "_b", *vary], kind="stable").drop(columns=["_o", "_b"]).reset_index(drop=True)
    if not (frame.n > 1).any():
        frame = frame.drop(columns="n")
    return frame, meta


def _num(value) -> str:
    """A table cell: integers (and whole numbers from 1000 up) with thousands separators, values below 1 with 4
    significant digits, others with 2 decimals (1 from 1000 up)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000 and float(value).is_integer():  # (counts a mean made floats)
        return f"{int(value):,}"
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}" if abs(value) < 1000 else f"{value:,.1f}"


def _process_note(records: list[dict]) -> str:
    """Whether each run's peak host memory is its own: ru_maxrss is per process, so runs that shared one show its
    running peak."""
    by_process: dict = {}
    for rec in records:
        if rec["pruner"] != DENSE and not rec.get("reused_from"):
            device = rec.get("device") or {}
            by_process.setdefault((device.get("host"), device.get("pid")), []).append(rec)
    shared = sum(len(v) for v in by_process.values() if len(v) > 1)
    if not shared:
        return ("Each pruning run ran in its own process, so its peak host memory is its own (a dense baseline "
                "shares the process of the run that recorded it, and that run's peak includes it).")
    return (f"{shared} pruning runs shared a process with another run (an in-process sweep): their peak host memory "
            "is that process's running peak, not their own; hydra/launcher=gpus hydra.launcher.max_jobs_per_worker=1 "
            "runs each job in a fresh process.")


def runs_caption(records: list[dict], meta: dict) -> str:
    setups = sorted({f"{(r.get('device') or {}).get('device')}, torch threads {(r.get('device') or {}).get('torch_threads')}"
                     + (f", {r['device']['gpu']}" if (r.get("device") or {}).get("gpu") else "") for r in records})
    described = [f"{c.label} = {c.description}" for c in meta["columns"] if c.description != c.label]
    paths = len(described) < len(meta["columns"])
    parts = ["One row per run (mean over seeds where n > 1)" + (
        "; other swept keys: " + ", ".join(meta["varying"]) if meta["varying"] else "") + ".",
        *(["Columns: " + "; ".join(described) + ("; the others are record paths" if paths else "") + "."]
          if described else [])]
    protocols = sorted({_describe_protocol(k, v.get("protocol", {})) for r in records
                        for k, v in r["metrics"].get("ppl", {}).items()
                        if any(c.label == f"ppl {k}" for c in meta["columns"])})
    if protocols:
        parts.append("Protocols: " + "; ".join(protocols) + ".")
    if meta.get("ratios"):
        parts.append(f"(Nx) = the value / the {meta['baseline']} run's with the same {', '.join(meta['match'])}.")
    parts.append("Setup: " + "; ".join(setups) + ".")
    if any(c.label == "peak_host_mb" for c in meta["columns"]):
        parts.append(_process_note(records))
    loaded = [r for r in records if r.get("pruned_from")]
    if loaded:
        parts.append(f"{len(loaded)} runs loaded the kept weights of an earlier pruning (pruned_from) instead of "
                     "pruning: they have no prune time of their own and their peak memory is not a pruning run's "
                     "(force=true prunes again).")
    return " ".join(parts)


def markdown_runs(table: pd.DataFrame, meta: dict, caption: str) -> str:
    _, value = columns.parse_baseline(meta["baseline"]) if meta.get("baseline") else (None, None)
    keys = ["model", "method", "pattern", *meta["varying"], *(["n"] if "n" in table.columns else [])]
    shown = [c.label for c in meta["columns"]]
    lines = [f"**Runs.** {caption}", "", "| " + " | ".join(keys + shown) + " |",
             "|" + "---|" * len(keys) + "---:|" * len(shown)]
    for _, row in table.iterrows():
        cells = [_num(row[k]) for k in keys]
        for label in shown:
            cell = _num(row[label])
            ratio = row.get(f"{label} / {value}") if value else None
            if label in meta.get("ratios", []) and _number(ratio):
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _captions(frame: pd.DataFrame, metric_filter) -> str:
    protocols = sorted(set(frame[metric_filter(frame)].protocol))
    return "; ".join(protocols)


def markdown_ppl(table: pd.DataFrame, caption: str) -> str:
    if table.empty:
        return ""
    groups = list(dict.fromkeys(c.rsplit(" | ", 1)[0] for c in table.columns if " | " in c))
    title = {g: g.replace(" | ", " ") for g in groups}
    has_paper = any(c.endswith("| paper") for c in table.columns)
    head = ["method", "pattern"]
    for group in groups:
        head.append(f"{title[group]} ours (vs dense)")
        if f"{group} | paper" in table.columns:
            head.append(f"{title[group]} paper")
    lines = [f"**Perplexity (lower is better).** {caption}" + (" Paper: published value, same method and pattern."
                                                                 if has_paper else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for _, row in table.iterrows():
        cells = [row["method"], row["pattern"]]
        for group in groups:
            value, delta = row.get(f"{group} | ours"), row.get(f"{group} | delta")
            cells.append(_fmt(value) + _spread(row.get(f"{group} | sd"), row.get(f"{group} | n"))
                         + (f" ({delta:+.2f})" if delta is not None and not pd.isna(delta)
                            and row["pattern"] != DENSE else ""))
            if f"{group} | paper" in table.columns:
                cells.append(_fmt(row.get(f"{group} | paper")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_by_sparsity(tables: dict, captions: dict, spreads: dict | None = None) -> str:
    out = []
    for (model, dataset), pivot in tables.items():
        out.append(f"**{model}, perplexity on {dataset}** ({captions[(model, dataset)]})\n")
        cols = list(pivot.columns)
        out.append("| method | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        sd, n = (spreads or {}).get((model, dataset), (None, None))
        for method, row in pivot.iterrows():
            out.append(f"| {method} | " + " | ".join(
                _fmt(row[c]) + (_spread(sd.loc[method, c], n.loc[method, c]) if n is not None else "")
                for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def markdown_zeroshot(table: pd.DataFrame, caption: str) -> str:
    if table.empty:
        return ""
    cols = [c for c in table.columns if c not in ("model", "method", "pattern")]
    lines = [f"**Zero-shot accuracy (%, higher is better).** {caption}", "",
             "| model | method | pattern | " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * len(cols)]
    for _, row in table.iterrows():
        cells = [_fmt(row[c]) if c != "delta avg" else ("" if pd.isna(row[c]) or row["pattern"] == DENSE
                                                         else f"{row[c]:+.2f}") for c in cols]
        lines.append(f"| {row['model']} | {row['method']} | {row['pattern']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (numbers with two decimals, dashes for missing cells)."""
    if table.empty:
        return ""
    shown = table.rename(columns=lambda c: str(c).replace(" | ", " "))
    for col in shown.columns:
        if shown[col].dtype.kind == "f" or shown[col].dtype == object and col not in ("method", "pattern", "model"):
            shown[col] = [_fmt(v) if isinstance(v, (int, float)) or v is None else v for v in shown[col]]
    return shown.to_latex(index=False, caption=caption.replace("%", r"\%").replace("_", r"\_"), label=label,
                          escape=True, column_format="ll" + "r" * (len(shown.columns) - 2))


# ---------------------------------------------------------------------------------------------
# plots


def _x(pattern: str) -> float:
    if pattern == DENSE:
        return 0.0
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return 100 * (1 - n / m)
    return float(pattern.split("%")[0])


def plot_vs_sparsity(frame: pd.DataFrame, metric: str, dataset: str | None, ylabel: str, path: Path) -> bool:
    """One panel per (model, dataset): a line per method over the unstructured ratios, N:M patterns as
    markers in the method's colour (offset right of their sparsity so they do not hide the line), dense
    as a dashed line; one legend for the figure. Log y when the values span more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    part = frame[(frame.metric == metric) & ((frame.dataset == dataset) if dataset else frame.dataset.notna())]
    if part.empty:
        return False
    panels = sorted(set(zip(part.model, part.dataset, strict=True)))
    methods = [m for m in method_order(part.method[part.pattern != DENSE])]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    nm_patterns = pattern_order(p for p in part.pattern if ":" in p)
    nm_marker = dict(zip(nm_patterns, "sDP^vX", strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 2.2, 3.6), squeeze=False)
    for ax, (model, data) in zip(axes[0], panels, strict=True):
        cell = part[(part.model == model) & (part.dataset == data)]
        cell = cell.groupby(["method", "pattern"], as_index=False)["value"].mean()
        for style, (_, dense) in zip(itertools.cycle(("--", ":", "-.")), cell[cell.pattern == DENSE].groupby("method")):
            ax.axhline(dense.value.mean(), color="black", linestyle=style, linewidth=1)  # one per dense cell
        for method in methods:
            rows = cell[cell.method == method]
            line = rows[~rows.pattern.str.contains(":")].assign(x=lambda d: d.pattern.map(_x)).sort_values("x")
            if not line.empty:
                ax.plot(line.x, line.value, marker="o", color=colors[method])
            for _, nm in rows[rows.pattern.str.contains(":")].iterrows():
                offset = 1.2 * (1 + nm_patterns.index(nm.pattern))
                ax.scatter([_x(nm.pattern) + offset], [nm.value], marker=nm_marker[nm.pattern], s=40,
                           color=colors[method], edgecolors="black", linewidths=0.5, zorder=3)
        # ticks at the measured unstructured ratios and at each N:M marker, labelled by its pattern
        ratios = sorted({_x(p) for p in cell.pattern if p != DENSE and ":" not in p})
        nm_here = [p for p in nm_patterns if p in set(cell.pattern)]
        ax.set_xticks([*ratios, *(_x(p) + 1.2 * (1 + nm_patterns.index(p)) for p in nm_here)],
                      [*(f"{r:g}%" for r in ratios), *nm_here])
        values = cell.value[cell.value > 0]
        if metric == "ppl" and len(values) and values.max() / values.min() > 10:
            ax.set_yscale("log")
        ax.set_title(f"{model} | {data}", fontsize=10)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="black", linestyle="--", label="dense")]
    handles += [Line2D([], [], color=colors[m], marker="o", label=m) for m in methods]
    handles += [Line2D([], [], color="gray", marker=nm_marker[p], linestyle="none", markeredgecolor="black",
                       label=f"{p} ({_x(p):.0f}% sparse)") for p in nm_patterns]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.1 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the command


def _published_note(published: str | None, report_cfg: dict, maps: tuple[str, ...]) -> str:
    """The caption's sentence naming the published numbers and, for tiny stand-ins, the ``maps`` that place them."""
    if not published:
        return ""
    note = f" Published numbers: conf/experiment/{published}.published.csv"
    pairs = {k: v for m in maps for k, v in (report_cfg.get(m) or {}).items()}
    if pairs:
        note += (" (shape check only: the paper's numbers shown beside stand-ins: "
                 + ", ".join(f"{k} <- {v}" for k, v in pairs.items()) + ")")
    return note + "."


def build_report(folder: Path, out: Path | None = None, published: str | None = None,
                 wandb_mode: str | None = None, include_stale: bool = False, columns_: list[str] | None = None,
                 baseline: str | None = None) -> dict:
    """Write every table and plot for the records under ``folder``; return what was written.

    Stale records (another code fingerprint than the newest of their cell) and duplicates (same cell, seed
    and code) are listed in ``stale.md`` and noted in the captions; stale ones are left out unless
    ``include_stale``, duplicates always (the newest is kept). ``columns_`` / ``baseline``: the runs table's
    (default: the records' ``report.columns`` / ``report.baseline``; neither: no runs table; a baseline alone:
    :data:`runners.columns.DEFAULT`)."""
    folder = Path(folder)
    records = load_records(folder)
    if not records:
        raise FileNotFoundError(f"no result records under {folder}")
    out = Path(out) if out else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    records, stale, duplicates = select_records(records, include_stale)
    report_cfg = records[0]["config"].get("report") or {}
    label_variants(records, report_cfg.get("label_keys") or ())  # cells sharing a position told apart, never averaged
    note = ""
    if stale:
        note += (f" {len(stale)} stale record(s) (older code fingerprint than the newest of their cell) "
                 + ("included (--include-stale)" if include_stale else "left out") + ": stale.md.")
    if duplicates:
        note += f" {len(duplicates)} duplicate record(s) (same cell, seed and code) left out, the newest kept: stale.md."
    (out / "stale.md").unlink(missing_ok=True)
    if stale or duplicates:
        (out / "stale.md").write_text(markdown_stale(stale, duplicates, include_stale))
    frame = tidy(records)
    seeds = frame.groupby(["cell", "dataset", "metric"])["seed"].nunique() if not frame.empty else pd.Series(dtype=int)
    if len(seeds) and seeds.max() > 1:
        note += " Several seeds: mean ± sd (n = seeds)."
    published = published or report_cfg.get("published")
    paper = load_published(published, report_cfg.get("model_map"), report_cfg.get("dataset_map"))
    written: dict = {"tables": {}, "plots": [], "records": len(records), "published": published,
                     "stale": stale, "duplicates": duplicates}
    frame.to_csv(out / "records.csv", index=False)

    ppl = ppl_table(frame, paper)
    if not ppl.empty:
        caption = "Protocols: " + _captions(frame, lambda f: f.metric == "ppl") + "." + note
        caption += _published_note(published, report_cfg, ("model_map", "dataset_map"))
        (out / "ppl.md").write_text(markdown_ppl(ppl, caption))
        ppl.to_csv(out / "ppl.csv", index=False)
        (out / "ppl.tex").write_text(latex(ppl, "Perplexity. " + caption, "tab:ppl"))
        written["tables"]["ppl"] = ppl
        spreads: dict = {}
        by_sparsity = ppl_by_sparsity(frame, spreads)
        captions = {key: _captions(frame[(frame.model == key[0]) & (frame.dataset == key[1])],
                                   lambda f: f.metric == "ppl") + ("; " + note.strip() if note else "")
                    for key in by_sparsity}
        (out / "ppl_by_sparsity.md").write_text(markdown_by_sparsity(by_sparsity, captions, spreads))
        flat = pd.concat([p.reset_index().assign(model=k[0], dataset=k[1]) for k, p in by_sparsity.items()],
                         ignore_index=True)
        flat.to_csv(out / "ppl_by_sparsity.csv", index=False)
        (out / "ppl_by_sparsity.tex").write_text("\n".join(
            latex(p.reset_index().rename(columns={"index": "method"}), f"{k[0]}, perplexity, {captions[k]}",
                  f"tab:ppl-{k[0]}-{k[1]}") for k, p in by_sparsity.items()))
        written["tables"]["ppl_by_sparsity"] = flat
        if plot_vs_sparsity(frame, "ppl", None, "perplexity", out / "ppl_vs_sparsity.png"):
            written["plots"].append(out / "ppl_vs_sparsity.png")

    zs = zeroshot_table(frame, paper)
    if not zs.empty:
        caption = _captions(frame, lambda f: f.metric == "acc") + "; average over the tasks shown." + note
        (out / "zeroshot.md").write_text(markdown_zeroshot(zs, caption))
        zs.to_csv(out / "zeroshot.csv", index=False)
        (out / "zeroshot.tex").write_text(latex(zs, "Zero-shot accuracy (\\%). " + caption, "tab:zeroshot"))
        written["tables"]["zeroshot"] = zs
        if plot_vs_sparsity(frame, "acc", "average", "zero-shot average acc", out / "zeroshot_vs_sparsity.png"):
            written["plots"].append(out / "zeroshot_vs_sparsity.png")

    images = image_table(frame, paper)
    if not images.empty:
        caption = "Samples: " + _captions(frame, lambda f: f.metric == "fid") + "." + note
        caption += _published_note(published, report_cfg, ("model_map",))
        (out / "image.md").write_text(markdown_image(images, caption))
        images.to_csv(out / "image.csv", index=False)
        (out / "image.tex").write_text(latex(images, "Image generation. " + caption, "tab:image"))
        written["tables"]["image"] = images
        written["plots"] += sample_grids(records, folder, out)
        if plot_vs_sparsity(frame, "fid", "image", "FID", out / "fid_vs_sparsity.png"):
            written["plots"].append(out / "fid_vs_sparsity.png")

    speed = speed_table(records)
    if not speed.empty:
        (out / "speed.md").write_text(markdown_speed(speed))
        speed.to_csv(out / "speed.csv", index=False)
        (out / "speed.tex").write_text(latex(speed.drop(columns="setup"), "Inference speed, pruned vs dense. "
                                             + "; ".join(sorted(set(speed.setup))), "tab:speed"))
        written["tables"]["speed"] = speed

    image_speed = image_speed_table(records)
    if not image_speed.empty:
        (out / "image_speed.md").write_text(markdown_image_speed(image_speed))
        image_speed.to_csv(out / "image_speed.csv", index=False)
        written["tables"]["image_speed"] = image_speed

    (out / "allocation.md").unlink(missing_ok=True)
    allocation = allocation_table(records)
    if not allocation.empty:
        (out / "allocation.md").write_text(markdown_allocation(allocation))
        allocation.to_csv(out / "allocation.csv", index=False)
        written["tables"]["allocation"] = allocation

    specs = list(columns_ if columns_ is not None else report_cfg.get("columns") or [])
    baseline = baseline if baseline is not None else report_cfg.get("baseline")
    if baseline and not specs:  # a baseline alone: the usual cost columns
        specs = list(columns.DEFAULT)
    (out / "runs.md").unlink(missing_ok=True)
    if specs:
        runs, meta = runs_table(records, specs, baseline)
        caption = runs_caption(records, meta) + note
        (out / "runs.md").write_text(markdown_runs(runs, meta, caption))
        runs.to_csv(out / "runs.csv", index=False)
        (out / "runs.tex").write_text(latex(runs, "Runs. " + caption, "tab:runs"))
        written["tables"]["runs"] = runs

    opts = _wandb_options(records[0], folder, wandb_mode)
    if opts is not None:
        from . import tracking

        written["wandb"] = tracking.log_report(opts, f"report-{folder.name}", written["tables"],
                                               {p.stem: p for p in written["plots"]})
    (out / "report.json").write_text(json.dumps(
        {"records": len(records), "published": published, "tables": sorted(written["tables"]),
         "stale": [r.get("path") for r in stale], "duplicates": [r.get("path") for r in duplicates],
         "include_stale": include_stale,
         "plots": [str(p) for p in written["plots"]], "wandb": written.get("wandb")}, indent=2) + "\n")
    written["out"] = out
    return written


def _wandb_options(record: dict, folder: Path, mode: str | None) -> dict | None:
    section = dict(record["config"].get("wandb") or {"mode": "offline"})
    if mode:
        section["mode"] = mode
    if section.get("mode", "disabled") == "disabled":
        return None
    return {"mode": section["mode"], "project": section.get("project") or "prunelab", "entity": section.get("entity"),
            "dir": section.get("dir") or str(folder), "tags": list(section.get("tags") or []), "group": folder.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a sweep folder, e.g. outputs/<sweep>")
    parser.add_argument("--out", default=None, help="where to write (default <folder>/report)")
    parser.add_argument("--published", default=None,
                        help="published numbers to compare with (conf/experiment/<NAME>.published.csv); "
                             "default: the records' report.published")
    parser.add_argument("--wandb", default=None, choices=("offline", "online", "disabled"),
                        help="W&B mode for the report run (default: the records' wandb.mode)")
    parser.add_argument("--columns", default=None,
                        help="a runs table (runs.md) with these comma-separated values per run: aliases (ppl, prune_s, "
                             "peak_host_mb, ...: runners/columns.py) or dotted record paths; default: the records' "
                             "report.columns")
    parser.add_argument("--baseline", default=None,
                        help="the runs table's ratios to this run: a pruner (magnitude) or <config key>=<value> "
                             "(eval.zeroshot.backend=memory); default: the records' report.baseline")
    parser.add_argument("--include-stale", action="store_true",
                        help="keep records whose code fingerprint differs from the newest of their cell "
                             "(listed in stale.md either way)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"prunelab: error: {folder} is not a folder", file=sys.stderr)
        return 2
    if args.published and not published_path(args.published).is_file():
        print(f"prunelab: error: --published {args.published}: no file {published_path(args.published)}",
              file=sys.stderr)
        return 2
    specs = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns is not None else None
    for flag, check in (("--columns", lambda: [columns.check_column(c) for c in specs or []]),
                        ("--baseline", lambda: args.baseline is not None and columns.parse_baseline(args.baseline))):
        try:
            check()
        except ValueError as err:
            print(f"prunelab: error: {flag} {err}", file=sys.stderr)
            return 2
    try:
        written = build_report(folder, args.out, args.published, args.wandb, args.include_stale, specs, args.baseline)
    except FileNotFoundError as err:
        print(f"prunelab: error: {err}", file=sys.stderr)
        return 2
    except OptionError as err:  # the records' report.columns / baseline, or a baseline that no record matches
        given = (specs if err.key == "columns" else args.baseline) is not None
        print(f"prunelab: error: {'--' if given else 'report.'}{err.key} {err}", file=sys.stderr)
        return 2
    print(f"{written['records']} records -> {written['out']}")
    for name in ("stale.md", "ppl.md", "ppl_by_sparsity.md", "zeroshot.md", "speed.md", "allocation.md", "runs.md"):
        if (written["out"] / name).exists():
            print(f"\n{(written['out'] / name).read_text()}")
    for plot in written["plots"]:
        print(f"plot: {plot}")
    if written.get("wandb"):
        print(f"W&B: {written['wandb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
