"""The lines ``python -m runners.run`` prints for each run: what was pruned, the metrics, time and memory, and
where the record is."""

from __future__ import annotations


def summary(record: dict) -> str:
    allocation = f" ({record['pattern']['allocation']})" if record["pattern"].get("allocation") else ""
    head = f"{record['model']['name']} | {record['pruner']}{allocation} | {record['pattern']['label']}"
    if record.get("status") == "skipped":
        return f"{head} | skipped: already recorded at {record['path']} (force=true recomputes)"
    ppl = ", ".join(f"{k} {v['value']:.2f}" for k, v in record["metrics"]["ppl"].items())
    zeroshot = record["metrics"].get("zeroshot")
    structure, speed = record.get("structure"), record["metrics"].get("speed")
    if structure and record["pattern"]["kind"] == "rowcol":  # zeroed rows / columns, then the silent units cut out
        head_line = (f"{head} | sparsity {record['sparsity']['overall']:.2%} of "
                     f"{record['sparsity']['prunable_parameters']:,} prunable weights | parameters "
                     f"{structure['parameters_before']:,} -> {structure['parameters_after']:,} "
                     f"({structure['parameters_after'] / structure['parameters_before'] - 1:+.1%}: silent units removed)")
    elif structure:
        head_line = (f"{head} | parameters {structure['parameters_before']:,} -> {structure['parameters_after']:,} "
                     f"({structure['parameters_after'] / structure['parameters_before'] - 1:+.1%}; "
                     f"{structure['unit_scope']} {-structure['removed_fraction']:+.1%} of "
                     f"{structure['unit_parameters_before']:,})")
    else:
        head_line = (f"{head} | sparsity {record['sparsity']['overall']:.2%} of "
                     f"{record['sparsity']['prunable_parameters']:,} prunable weights")
    warning = (record.get("sparsity") or {}).get("warning")
    lines = [
        head_line,
        *([f"  warning: {warning}"] if warning else []),
        *([f"  perplexity: {ppl}"] if ppl else []),  # (eval=none: no line)
        *(["  zero-shot: " + ", ".join(f"{k} {v['acc']:.4f}" for k, v in zeroshot["tasks"].items())
           + f" | average acc {zeroshot['average']['acc']:.4f}"] if zeroshot else []),
        *([_image_line(record["metrics"]["image"])] if record["metrics"].get("image") else []),
        *([_speed_line(speed)] if speed else []),
        f"  time: {_prune_time(record)}, total {record['timings_s']['total']:.1f}s | "
        f"peak host {record['memory']['peak_host_rss_mb']:.0f} MB",
        *([f"  pruned weights from {record['pruned_from']['path']} (not pruned again; force=true prunes)"]
          if record.get("pruned_from") else []),
        *([f"  saved model: {record['saved_model']}"] if record.get("saved_model") else []),
    ]
    if record.get("status") == "reused":
        lines.append(f"  reused from {record['reused_from']}")
    if "path" in record:
        lines.append(f"  record: {record['path']}")
    return "\n".join(lines)


def _prune_time(record: dict) -> str:
    if "prune" in record["timings_s"] or not record.get("pruned_from"):
        return f"prune {record['timings_s'].get('prune', 0.0):.1f}s"
    source = record["pruned_from"]
    return f"prune reused ({source['timings_s'].get('prune', 0.0):.1f}s in {source['run_id']})"


def _image_line(image: dict) -> str:
    size = "x".join(str(n) for n in image["resolution"])
    if image.get("fid") is None:  # features=none: samples only
        return f"  images: {image['samples']} samples at {size} written ({image.get('npz') or image.get('grid')})"
    shown = [(k, label, digits) for k, label, digits in (("fid", "FID", 2), ("sfid", "sFID", 2), ("is", "IS", 2),
                                                         ("precision", "precision", 3), ("recall", "recall", 3),
                                                         ("class_accuracy", "class accuracy", 3))
             if image.get(k) is not None]  # (an Inception reference: FID, precision and recall only)
    values = ", ".join(f"{label} {image[k]:.{digits}f}" for k, label, digits in shown)
    return f"  images: {values} | {image['samples']} samples at {size}, {image['features']} features vs {image['reference']}"


def _speed_line(speed: dict) -> str:
    d, p, x = speed["dense"], speed["pruned"], speed["speedup"]
    setup = p["setup"]
    if "ms_per_image" in p:
        return (f"  speed: {d['ms_per_image']:.2f} -> {p['ms_per_image']:.2f} ms/image ({x['generate']:.2f}x) | "
                f"batch {setup['batch_size']}, {setup['tokens_per_image']} tokens per image, guidance "
                f"{setup['cfg_scale']}, {setup['device']}, {setup['threads']} thread{'s' if setup['threads'] != 1 else ''}")
    if x["decode"] is None:  # (evaluators/speed.py: a host too busy to time the decode)
        decode = "decode not timed (the longer generation was no slower)"
    else:
        decode = f"decode {d['decode_ms_per_token']:.2f} -> {p['decode_ms_per_token']:.2f} ms/token ({x['decode']:.2f}x)"
    return (f"  speed: {decode}, prefill {d['prefill_ms']:.1f} -> {p['prefill_ms']:.1f} ms ({x['prefill']:.2f}x) | "
            f"batch {setup['batch_size']}, prompt {setup['prompt_len']}, {setup['new_tokens']} new tokens, "
            f"{setup['device']}, {setup['threads']} thread{'s' if setup['threads'] != 1 else ''}")
