"""What a pruning run did to the model, measured on the model itself (docs/architecture.md §5): the sparsity
section of a record (overall, per block, per module, and how far it is off the target) and, for structured runs,
the structure section (parameters and units before / after, which units each block kept)."""

from __future__ import annotations

from models.onload import each_block
from models.shrink import shrink_silent_units

from .allocation import Allocation
from .masks import Pattern
from .masks import sparsity as measured_sparsity


def sparsity_section(adapter, pattern: Pattern, allocation: Allocation, prunes: bool) -> dict:
    """Measured sparsity: overall and per module over every prunable linear; per block (achieved) over the
    linears the allocation targets (``sparsity.targets`` / ``ignore``; all by default), as its ratios are."""
    per_module, per_block, zeros, total = {}, [], 0, 0
    prefix = adapter.blocks_prefix()
    for index, block in each_block(adapter):  # (an onloaded model's blocks, read one at a time)
        block_zeros, block_total = 0, 0
        for name, linear in adapter.prunable_linears(block).items():
            value = measured_sparsity(linear.weight)
            per_module[f"{prefix}.{index}.{name}"] = round(value, 6)
            count = round(value * linear.weight.numel())
            zeros, total = zeros + count, total + linear.weight.numel()
            if allocation.selects(name):
                block_zeros, block_total = block_zeros + count, block_total + linear.weight.numel()
        per_block.append(round(block_zeros / block_total, 6) if block_total else None)
    section = {"target": pattern.target_sparsity if prunes else 0.0, "overall": round(zeros / max(total, 1), 6),
               "prunable_parameters": total, "per_block": per_block, "per_module": per_module}
    if prunes and pattern.kind in ("unstructured", "nm"):
        widths = [linear.in_features for block in adapter.blocks() for linear in adapter.prunable_linears(block).values()]
        section.update(sparsity_deviation(section["overall"], section["target"], pattern.kind,
                                          allocation.is_default, min(widths, default=1)))
    return section


def sparsity_deviation(overall: float, target: float, kind: str, uniform: bool, narrowest: int) -> dict:
    """``{"deviation": overall - target}``, plus ``"warning"`` where the measured sparsity misses the target by more
    than rounding: above it by more than 0.1 point (a method's int() rounding never adds zeros: extra ones are e.g.
    dead input columns zeroed on top of the target, docs/architecture.md §5), or below it by more than one weight per
    row of the narrowest linear (``1 / narrowest``; N:M: exact; a non-uniform allocation: 1 point)."""
    deviation = overall - target
    under = 1e-6 if kind == "nm" and uniform else (1.0 / narrowest if uniform else 0.01)
    out = {"deviation": round(deviation, 6)}
    if deviation > 1e-3 or -deviation > under + 1e-6:
        side = "above" if deviation > 0 else "below"
        why = " (zeros beyond the method's choice: e.g. dead input columns zeroed on top of it)" if deviation > 0 else ""
        out["warning"] = (f"measured sparsity {overall:.2%} is {abs(deviation) * 100:.2f} points {side} the target "
                          f"{target:.2%}{why}; per module: sparsity.per_module in the record")
    return out


def unit_counts(model, adapter, scope: str = "all") -> dict:
    """Parameter and unit counts; ``unit_parameters``: those a structured ratio counts (``scope``:
    :attr:`pruners.masks.Pattern.unit_scope`: the attention units' alone for ``heads``, the experts for ``experts``)."""
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "unit_parameters": adapter.unit_parameters(scope),
            "blocks": [adapter.block_counts(block) for block in adapter.blocks()]}


def structure_section(model, adapter, pattern: Pattern, before: dict, module_results: dict) -> tuple[dict, dict]:
    """Structured runs: parameter counts before / after, per-block kept units (and which), and the
    sparsity section in the same terms (removed fraction of the unit-owned parameters)."""
    after = unit_counts(model, adapter, pattern.unit_scope)
    removed = 1 - after["unit_parameters"] / before["unit_parameters"]
    prefix = adapter.blocks_prefix()
    blocks = []
    for index, (was, now) in enumerate(zip(before["blocks"], after["blocks"], strict=True)):
        entry = {kind: {"kept": now[kind], "of": was[kind]} for kind in was}
        for name, result in module_results.items():
            if result.kept_units is not None and name.startswith(f"{prefix}.{index}."):
                entry[result.unit_kind]["kept_units"] = result.kept_units
        blocks.append(entry)
    structure = {"parameters_before": before["parameters"], "parameters_after": after["parameters"],
                 "unit_parameters_before": before["unit_parameters"], "unit_parameters_after": after["unit_parameters"],
                 "unit_scope": adapter.unit_scope if pattern.unit_scope == "all" else pattern.unit_scope,
                 "removed_fraction": round(removed, 6), "blocks": blocks}
    sparsity = {"target": pattern.ratio, "overall": round(removed, 6),
                "prunable_parameters": before["unit_parameters"],
                "per_module": {name: round(r.pruned / r.total, 6) for name, r in module_results.items()}}
    return structure, sparsity


def account(model, adapter, pattern: Pattern, allocation: Allocation, prunes: bool, before: dict | None,
            module_results: dict, ratios) -> tuple[dict | None, dict]:
    """(structure, sparsity) sections of a run that just pruned ``model``: structured runs in units
    (:func:`structure_section`, ``before`` from :func:`unit_counts`); the others in zeroed weights, with the
    allocation's per-linear ratios (no structure: ``rowcol`` runs get theirs from :func:`shrink_section`)."""
    if prunes and pattern.removes_units:
        return structure_section(model, adapter, pattern, before, module_results)
    sparsity = sparsity_section(adapter, pattern, allocation, prunes)
    uncalibrated = sorted(name for name, r in module_results.items() if getattr(r, "uncalibrated", False))
    if uncalibrated:  # (MoE experts no calibration token reached: pruned by magnitude, models/moe.py)
        sparsity["uncalibrated_modules"] = uncalibrated
    if prunes:
        sparsity["allocation"] = ratios.to_record(allocation) if ratios is not None else {"kind": "uniform"}
    return None, sparsity


def shrink_section(model, adapter) -> dict:
    """``rowcol`` runs: cut out the units their zeroed rows / columns freed (:func:`models.shrink.shrink_silent_units`)
    and return the structure section saying what that removed."""
    units_before = adapter.unit_parameters()
    structure = shrink_silent_units(model, adapter)
    structure.update(unit_parameters_before=units_before, unit_parameters_after=adapter.unit_parameters(),
                     unit_scope=adapter.unit_scope)
    structure["removed_fraction"] = round(1 - structure["unit_parameters_after"] / units_before, 6)
    return structure
