"""Sparsity patterns and mask selection, shared by every method (docs/methods.md §12, "comparison group").

Conventions: a *prune mask* is ``True`` where a weight is removed. Scores are "higher = keep".
``N:M`` follows the hardware notation: at most ``n`` non-zeros in every ``m`` consecutive weights of a
row along the input dimension (2:4 keeps 2 of 4, i.e. 50% sparsity); the reference scripts'
``prunen`` is ``m - n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RATIO_KINDS = ("unstructured", "structured", "heads", "rowcol", "experts")  # the kinds set by sparsity.ratio
PATTERN_KINDS = ("unstructured", "nm", "structured", "heads", "rowcol", "experts")
UNIT_KINDS = ("structured", "heads")  # the kinds that remove whole units (structured pruners)
SHRINKING_KINDS = (*UNIT_KINDS, "experts")  # the kinds whose matrices shrink (experts: whole MoE experts go)
_LABEL_SUFFIX = {"structured": " struct", "heads": " heads", "rowcol": " rowcol", "experts": " experts"}


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``ratio``, N:M (``n`` kept of every ``m``), structured: ``ratio`` of the
    attention + MLP parameters removed as whole heads / channels (structured pruners only), heads: ``ratio`` of the
    attention heads (KV groups under GQA) removed, the MLPs untouched (structured pruners), or rowcol: ``ratio`` of
    the targeted weights removed as whole rows and columns of the linears, zeroed (the LLM Surgeon's structured
    mode), or experts: ``ratio`` of every mixture-of-experts layer's experts removed with their router rows."""

    kind: str  # "unstructured" | "nm" | "structured" | "heads" | "rowcol" | "experts"
    ratio: float = 0.0
    n: int | None = None
    m: int | None = None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.n / self.m if self.kind == "nm" else self.ratio

    @property
    def removes_units(self) -> bool:
        """Whether whole units go (the matrices shrink): structured, heads and experts."""
        return self.kind in SHRINKING_KINDS

    @property
    def unit_scope(self) -> str:
        """What a ratio of removed units counts: ``"all"`` (the attention + MLP units), ``"attention"`` (``heads``)
        or ``"experts"`` (the MoE layers' experts)."""
        return {"heads": "attention", "experts": "experts"}.get(self.kind, "all")

    @property
    def attention_only(self) -> bool:
        """Whether only attention units go (``heads``)."""
        return self.kind == "heads"

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    def describe(self) -> str:
        """The pattern's label (:func:`pattern_label`): ``50%``, ``2:4``, ``30% struct``."""
        return pattern_label(self.kind, self.ratio, self.n, self.m)

    @classmethod
    def from_config(cls, cfg) -> Pattern:
        kind = cfg.kind
        if kind in RATIO_KINDS:
            ratio = float(cfg.ratio)
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"sparsity.ratio={ratio} is outside [0, 1)")
            return cls(kind, ratio=ratio)
        if kind == "nm":
            n, m = int(cfg.n), int(cfg.m)
            if not (m >= 2 and 0 < n < m):
                raise ValueError(f"sparsity N:M needs 0 < n < m (got n={n}, m={m})")
            return cls("nm", ratio=1.0 - n / m, n=n, m=m)
        raise ValueError(f"sparsity.kind='{kind}' is not one of: {', '.join(PATTERN_KINDS)}")


# --- pattern labels: one format (records, run ids, reports, published numbers), one parser ------------------


def pattern_label(kind: str, ratio: float | None = None, n: int | None = None, m: int | None = None) -> str:
    """The one label of a pattern: ``dense``, ``50%`` (unstructured), ``2:4`` (N:M), ``30% struct`` (structured),
    ``20% heads`` (attention heads only), ``30% rowcol`` (rows and columns), ``25% experts`` (MoE experts).
    A ratio prints with as many digits as it has (``69.5%``), so two ratios never share a label."""
    if kind == "dense":
        return "dense"
    if kind == "nm":
        return f"{int(n)}:{int(m)}"
    percent = f"{round(float(ratio) * 100, 8):.12g}%"
    if kind in _LABEL_SUFFIX:
        return percent + _LABEL_SUFFIX[kind]
    if kind == "unstructured":
        return percent
    raise ValueError(f"pattern kind '{kind}' is not one of: dense, {', '.join(PATTERN_KINDS)}")


def parse_pattern_label(label: str) -> dict:
    """The inverse of :func:`pattern_label`: ``{kind, ratio, n, m}``; ValueError for anything else."""
    text = str(label).strip()
    try:
        if text == "dense":
            return {"kind": "dense", "ratio": 0.0, "n": None, "m": None}
        if ":" in text:
            n, m = (int(part) for part in text.split(":"))
            if not 0 < n < m:
                raise ValueError
            out = {"kind": "nm", "ratio": 1.0 - n / m, "n": n, "m": m}
            if pattern_label(**out) != text:  # '02:4', '2: 4'
                raise ValueError(f"pattern label '{label}': write it as '{pattern_label(**out)}'")
            return out
        kind = next((k for k, suffix in _LABEL_SUFFIX.items() if text.endswith(suffix)), "unstructured")
        number = text.removesuffix(_LABEL_SUFFIX.get(kind, ""))
        if not number.endswith("%"):
            raise ValueError
        ratio = float(number[:-1]) / 100
        if not 0.0 <= ratio < 1.0:
            raise ValueError
    except ValueError:
        raise ValueError(f"pattern label '{label}' is not one of the forms: dense, 50%, 2:4, 30% struct, "
                         f"20% heads, 30% rowcol, 25% experts") from None
    out = {"kind": kind, "ratio": ratio, "n": None, "m": None}
    if pattern_label(**out) != text:  # e.g. '050%', '50.0%': not the canonical spelling
        raise ValueError(f"pattern label '{label}': write it as '{pattern_label(**out)}'")
    return out


def pattern_slug(label: str) -> str:
    """A label in file and run-id form: ``50pct``, ``2of4``, ``30pct-struct``, ``20pct-heads``, ``30pct-rowcol``,
    ``25pct-experts``, ``dense``."""
    return label.replace("%", "pct").replace(":", "of").replace(" ", "-")


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries of each row of a 2-D score (stable sort, as Wanda)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
        mask.scatter_(1, idx, True)
    return mask


def prune_per_row(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """``int(d_in * ratio)`` lowest of every row (Wanda's comparison group)."""
    return lowest_k(score, int(score.shape[1] * ratio))


def prune_per_matrix(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """``int(numel * ratio)`` lowest of the whole matrix (magnitude; SparseGPT inside one column block)."""
    return lowest_k(score.reshape(1, -1), int(score.numel() * ratio)).view_as(score)


def prune_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, in every group of ``m`` consecutive columns, the ``m - n`` lowest."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M needs the input dimension ({cols}) to be a multiple of m={m}")
    grouped = score.reshape(rows * cols // m, m)
    return lowest_k(grouped, m - n).view(rows, cols)


def select_prune_mask(score: torch.Tensor, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """Prune mask for ``pattern``; ``group`` is the unstructured comparison group (``row`` | ``matrix``)."""
    if pattern.kind == "nm":
        return prune_n_of_m(score, pattern.n, pattern.m)
    if group == "row":
        return prune_per_row(score, pattern.ratio)
    if group == "matrix":
        return prune_per_matrix(score, pattern.ratio)
    raise ValueError(f"unknown comparison group '{group}'")


def sparsity(weight: torch.Tensor) -> float:
    return (weight == 0).sum().item() / weight.numel()


def satisfies_n_of_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` consecutive weights of a row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


# --- persistent masks (docs/architecture.md §1, "Masks") -----------------------------------------------

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass(frozen=True)
class PackedMask:
    """A prune mask (``True`` = removed) stored as bits on the CPU: 1/8 of a bool tensor's memory."""

    bits: torch.Tensor  # uint8 [ceil(numel / 8)]
    shape: tuple[int, ...]
    pruned: int  # number of True entries

    @classmethod
    def pack(cls, prune_mask: torch.Tensor) -> PackedMask:
        flat = prune_mask.detach().reshape(-1).to(torch.bool)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        weights = _BIT_WEIGHTS.to(flat.device)
        bits = (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
        return cls(bits.cpu(), tuple(prune_mask.shape), int(prune_mask.sum()))

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    def unpack(self, device=None) -> torch.Tensor:
        bits = self.bits.to(device) if device is not None else self.bits
        flat = (bits.unsqueeze(1) & _BIT_WEIGHTS.to(bits.device)) != 0
        return flat.reshape(-1)[: self.numel].view(self.shape)


class MaskState:
    """Per prunable module (full name, as in ``model.named_modules``), the prune mask of its weight.

    Every method's pruning step registers here (through :class:`pruners.base.ModuleResult.mask`); a
    method that updates weights after pruning (several shots, a reconstruction step) calls
    :meth:`enforce` so removed weights stay zero, and :meth:`merge` so a later shot can only add
    removed weights. Structured removals are physical: :attr:`units` keeps which units each reader kept.
    """

    def __init__(self):
        self.masks: dict[str, PackedMask] = {}
        self.units: dict[str, tuple[str, list[int]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def names(self) -> list[str]:
        return list(self.masks)

    def register(self, name: str, prune_mask: torch.Tensor | PackedMask, merge: bool = True) -> None:
        """Record ``prune_mask`` for ``name``; with ``merge`` (default) the union with what is recorded."""
        new = prune_mask if isinstance(prune_mask, PackedMask) else PackedMask.pack(prune_mask)
        old = self.masks.get(name)
        if old is not None and merge:
            if old.shape != new.shape:
                raise ValueError(f"mask for {name}: shape {new.shape} differs from the recorded {old.shape}")
            bits = old.bits | new.bits
            pruned = int(PackedMask(bits, old.shape, 0).unpack().sum())
            new = PackedMask(bits, old.shape, pruned)
        self.masks[name] = new

    def prune_mask(self, name: str, device=None) -> torch.Tensor:
        return self.masks[name].unpack(device)

    def merge(self, other: MaskState) -> MaskState:
        """Union in place (a second shot only adds removed weights); returns self."""
        for name, mask in other.masks.items():
            self.register(name, mask, merge=True)
        self.units.update(other.units)
        return self

    def contains(self, other: MaskState) -> bool:
        """Whether every weight ``other`` removes is removed here too."""
        for name, mask in other.masks.items():
            if name not in self.masks:
                return False
            if bool((mask.bits & ~self.masks[name].bits).any()):
                return False
        return True

    @torch.no_grad()
    def enforce(self, model: torch.nn.Module) -> None:
        """Re-zero every masked weight of ``model`` (after any update that may have written into it)."""
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            weight = modules[name].weight
            weight.data.masked_fill_(mask.unpack(weight.device), 0)

    def sparsity(self) -> dict[str, float]:
        """Per module, the fraction of its weights the masks remove."""
        return {name: mask.pruned / max(mask.numel, 1) for name, mask in self.masks.items()}

    @classmethod
    def from_results(cls, results: dict) -> MaskState:
        """From a method's per-module results (``ModuleResult.mask`` / ``kept_units``)."""
        state = cls()
        for name, result in results.items():
            if getattr(result, "mask", None) is not None:
                state.register(name, result.mask)
            if getattr(result, "kept_units", None) is not None:
                state.units[name] = (result.unit_kind, list(result.kept_units))
        return state


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the fp32 ``values`` (``-0.0`` as ``0.0``; NaN above ``+inf``, as a sort puts it)."""
    values = values.detach().float().reshape(-1) + 0.0
    bits = values.view(torch.int32).long()
    bits = torch.where(values.isnan(), 0x7FC00000, bits)  # (a NaN's sign bit is often set: all NaNs sort last)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def global_prune_masks(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """One threshold over every module (whole-model methods' global comparison group): the
    ``int(total * ratio)`` lowest scores of all modules together, compared in fp32, ties taken in module order and
    then element order (what a stable sort of the concatenation takes), as prune masks on the CPU.

    Nothing is concatenated or sorted: the k-th lowest value is found by bisection over the fp32 order (at most
    33 counting passes over the modules, one module's keys at a time), so the memory beyond the scores is a
    module's keys and the masks (1 byte per weight): a 7B model's costs can be thresholded beside them."""
    names = list(scores)
    total = sum(scores[name].numel() for name in names)
    k = int(total * ratio)
    if k <= 0:
        return {name: torch.zeros(scores[name].shape, dtype=torch.bool) for name in names}
    if k >= total:
        return {name: torch.ones(scores[name].shape, dtype=torch.bool) for name in names}

    def at_most(key: int) -> int:
        return sum(int((_order_keys(scores[name].cpu()) <= key).sum()) for name in names)

    low, high = -(2**31), 2**31 - 1  # the smallest key with at_most(key) >= k lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if at_most(mid) >= k:
            high = mid
        else:
            low = mid + 1
    masks, ties_left = {}, k - at_most(low - 1)  # entries equal to the threshold still to take, in order
    for name in names:
        keys = _order_keys(scores[name].cpu())
        mask = keys < low
        if ties_left > 0:
            tied = (keys == low).nonzero().flatten()[:ties_left]
            mask[tied] = True
            ties_left -= tied.numel()
        masks[name] = mask.view(scores[name].shape)
    return masks


@torch.no_grad()
def check_masks_against_weights(model: torch.nn.Module, masks: MaskState) -> dict[str, float]:
    """Per-module sparsity from the masks; RuntimeError if a weight the mask removes is non-zero
    (ValueError if a mask does not fit the model)."""
    modules = dict(model.named_modules())
    bad = []
    for name, mask in masks.masks.items():
        if name not in modules:
            raise ValueError(f"mask for {name}: the model has no such module")
        weight = modules[name].weight
        if tuple(weight.shape) != mask.shape:
            raise ValueError(f"mask for {name}: shape {mask.shape} differs from the weight's {tuple(weight.shape)}")
        nonzero = int((weight.detach()[mask.unpack(weight.device)] != 0).sum())
        if nonzero:
            bad.append(f"{name} ({nonzero} weights)")
    if bad:
        raise RuntimeError("weights are non-zero where the prune mask removed them: " + ", ".join(bad))
    return masks.sparsity()
