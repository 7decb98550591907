"""The LLM Surgeon (van der Ouderaa et al., ICLR'24) and its K-OBD baseline: Kronecker-factored curvature, one
global threshold over the whole model, correlated OBS updates, several shots (docs/methods.md §5).

Per prunable linear ``W`` (``[d_out, d_in]``, with its bias as an extra column when it has one) the loss
curvature is the Kronecker-factored empirical Fisher ``F = G ⊗ A``: ``A = E[a a^T]`` over the module's inputs
(a ones entry appended for the bias), ``G = E[g g^T]`` over the gradients of the next-token loss w.r.t. its
outputs (:class:`KroneckerFactors`, classic KFAC with the reference's Frobenius balancing, :func:`balance`).
With ``G^-1``, ``A^-1`` damped relative to their mean diagonals (:func:`damped_inverse`):

- element costs (OBS, the Surgeon): ``L_rc = w_rc^2 / (2 [G^-1]_rr [A^-1]_cc)`` (:func:`obs_element_costs`);
  K-OBD: ``L_rc = w_rc^2 G_rr A_cc / 2`` (:func:`kobd_element_costs`);
- one threshold over every module's costs (unstructured), or over N:M group costs (the sum of the ``m - n``
  smallest element costs of each group of ``m`` consecutive inputs, groups in full-matrix coordinates, so every
  produced mask is a valid N:M mask; :func:`nm_prune_mask`);
- the correlated update for the removed set ``Q`` (chunks of whole rows, at most ``max_correlate`` entries):
  ``C = G^-1[Q_r, Q_r] ∘ A^-1[Q_c, Q_c]``, ``m = C^-1 w_Q``, ``ΔW = -G^-1 M A^-1`` with ``M`` holding ``m`` at
  ``Q`` (:func:`correlated_update`); K-OBD does not update;
- shots: the target grows linearly, ``s_t = t S / T``; curvature is re-estimated on the pruned model before
  every shot and removed weights stay removed (:class:`pruners.masks.MaskState`);
- rows + columns (``sparsity=rowcol``): row costs ``w_r^T A w_r / (2 [G^-1]_rr)``, column costs
  ``w_c^T G w_c / (2 [A^-1]_cc)`` (:func:`obs_row_costs`, :func:`obs_column_costs`), one threshold with the joint
  removed-weight count (:func:`rowcol_prune_masks`), the row then column updates (:func:`rowcol_update`);
- whole units (``sparsity=structured``): a unit's cost is the sum of the row and column costs of the slices it owns
  (:func:`unit_layout`, :func:`unit_costs`), one threshold over all units with their parameter counts
  (:func:`units_prune_masks`), the rows + columns update on what they own, and after the last shot the zeroed units
  are removed from the model through the adapter, so the result always shrinks;
- dead rows and columns (all zero, or a zero curvature diagonal) are left out of ``G`` and ``A``, cost 0 and are
  zero afterwards, as in the reference (:func:`live_structures`).

``pruner=lobd`` is the L-OBD baseline (``I ⊗ A``, :func:`lobd_element_costs`).

Memory (docs/methods.md §5.9): the curvature pass goes block by block with recomputation (:mod:`pruners.taps`),
each block's factors leave the device once complete (host memory, or files under ``engine.offload_dir``, in
``pruner.factor_dtype``), and costs and updates bring one module's factors back at a time; the model stays on the
host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import ModuleResult, Pruner, register
from .masks import MaskState, PackedMask, Pattern, global_prune_masks, lowest_k
from .resume import pack_masks, resume_shots, unpack_masks
from .settings import EngineSettings
from .structured import remove_kept
from .taps import Offload, accumulate_gradient_stats, prunable_modules

UNSTRUCTURED_DAMP_G = 0.1  # the reference scripts' --damp_g for element / 2:4 pruning (the code's default: 0.01)


# --- curvature ---------------------------------------------------------------------------------------------------
FACTOR_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


class KroneckerCurvature:
    """Running sums for ``A = Σ a a^T / T`` per group of linears reading one input (q / k / v, gate / up: one ``A``
    serves them all) and ``G = Σ g g^T / T`` per linear, over the ``T`` tokens seen (docs/methods.md §5.1).

    Fed by the gradient taps (:func:`pruners.taps.accumulate_gradient_stats`: ``g`` is the gradient of each
    window's own mean loss, as the reference runs one sequence per backward). ``a`` gets a trailing ones entry when
    a linear of the group has a bias (a linear without one reads ``A`` without it). A block's sums are built on the
    device in ``stats_dtype``; when the block is complete (:meth:`block_done`) they move to ``store`` (host memory
    or files) in ``storage_dtype``, and :meth:`factors` brings one linear's ``(G, A)`` back. (The overall scale of
    ``G ⊗ A`` changes no mask and no update; it is kept for comparisons with the reference's factors.)"""

    def __init__(self, modules: dict[str, nn.Linear], store: Offload, stats_dtype=torch.float32,
                 storage_dtype: torch.dtype | None = None):
        self.modules = modules
        self.store = store
        self.stats_dtype = stats_dtype
        self.storage_dtype = storage_dtype or stats_dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.a_key: dict[str, tuple[str, bool]] = {}

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        if key not in self.sums:
            self.sums[key] = x.new_zeros(x.shape[1], x.shape[1])
        self.sums[key].addmm_(x.T, x)

    def add(self, index: int, names: tuple[str, ...], activation: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """One batch of one group: its input ``[batch, seqlen, d_in]`` and each linear's output gradient."""
        bias = any(self.modules[name].bias is not None for name in names)
        key = f"A:{names[0]}"
        a = activation.reshape(-1, activation.shape[-1]).to(self.stats_dtype)
        if bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device, dtype=a.dtype)], dim=1)
        self._accumulate(key, a)
        self.tokens[key] = self.tokens.get(key, 0) + a.shape[0]
        for name, grad in zip(names, grads, strict=True):
            self.a_key[name] = (key, bias)
            self._accumulate(f"G:{name}", grad.reshape(-1, grad.shape[-1]).to(self.stats_dtype).nan_to_num(0.0))

    def block_done(self, index: int) -> None:
        """The block's sums are complete (for this pass): off the device, into the store."""
        for key, total in self.sums.items():
            self.store.add(key, total, self.storage_dtype)
        self.sums.clear()

    def factors(self, name: str, balanced: bool = True, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, A)`` of one linear on ``device`` in ``stats_dtype``, averaged and (``balanced``) balanced
        (:func:`balance`)."""
        key, bias = self.a_key[name]
        count = max(self.tokens[key], 1)
        A = self.store.get(key, device, self.stats_dtype) / count
        if bias and self.modules[name].bias is None:
            A = A[:-1, :-1]
        G = self.store.get(f"G:{name}", device, self.stats_dtype) / count
        return balance(G, A) if balanced else (G, A)


def balance(G: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's Frobenius balancing: both factors scaled to the norm ``sqrt(‖G‖ ‖A‖)``, so ``G ⊗ A`` is
    unchanged; both zero if either is."""
    g, a = torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(A)
    if g == 0 or a == 0:
        return torch.zeros_like(G), torch.zeros_like(A)
    common = torch.sqrt(g * a)
    return G * (common / g), A * (common / a)


def damped_inverse(M: torch.Tensor, damp: float) -> torch.Tensor:
    """``(M + damp · mean(diag M) · I)^-1`` in float64 through Cholesky (the reference's ``utils.inv``). The
    pruners leave dead rows and columns out before inverting (:func:`live_structures`); one that remains is made
    positive definite by the damping. An all-zero ``M`` (no signal at all) is damped with mean 1."""
    M = M.double().clone()
    diag = torch.diagonal(M)
    mean = diag.mean() if diag.numel() else torch.tensor(1.0, dtype=M.dtype)
    if mean <= 0:
        mean = torch.tensor(1.0, dtype=M.dtype)
    diag += damp * mean
    L = torch.linalg.cholesky(M)
    return torch.cholesky_inverse(L)


# --- costs and masks ---------------------------------------------------------------------------------------------
def obs_element_costs(W: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each weight alone: ``w_rc^2 / (2 [G^-1]_rr [A^-1]_cc)`` (docs/methods.md §5.2)."""
    return W.double() ** 2 / (2 * torch.diagonal(Ginv)[:, None] * torch.diagonal(Ainv)[None, : W.shape[1]])


def kobd_element_costs(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """K-OBD cost (diagonal Kronecker-factored Fisher, no update): ``w_rc^2 G_rr A_cc / 2``."""
    return W.double() ** 2 * torch.diagonal(G).double()[:, None] * torch.diagonal(A).double()[None, : W.shape[1]] / 2


def obs_row_costs(W: torch.Tensor, A: torch.Tensor, Ginv: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each row (output) of ``W`` alone: ``w_r^T A w_r / (2 [G^-1]_rr)`` (docs/methods.md §5.2);
    ``W`` and ``A`` with the bias column, so a removed row takes its bias along."""
    W = W.double()
    return (W @ A.double() * W).sum(1) / (2 * torch.diagonal(Ginv))


def obs_column_costs(W: torch.Tensor, G: torch.Tensor, Ainv: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each column (input) of ``W`` alone: ``w_c^T G w_c / (2 [A^-1]_cc)``."""
    W = W.double()
    return (G.double() @ W * W).sum(0) / (2 * torch.diagonal(Ainv))


def kobd_row_costs(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """K-OBD row cost (no update): ``(w_r^T A w_r) G_rr / 2``."""
    W = W.double()
    return (W @ A.double() * W).sum(1) * torch.diagonal(G).double() / 2


def kobd_column_costs(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """K-OBD column cost (no update): ``(w_c^T G w_c) A_cc / 2``."""
    W = W.double()
    return (G.double() @ W * W).sum(0) * torch.diagonal(A).double() / 2


def nm_group_costs(costs: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of ``m`` consecutive inputs of a row (full-matrix coordinates): the sum of its ``m - n`` smallest
    element costs, ``[d_out, d_in / m]`` (docs/methods.md §5.3)."""
    rows, cols = costs.shape
    if cols % m:
        raise ValueError(f"N:M with m={m} needs d_in divisible by m (a linear has d_in={cols})")
    return costs.view(rows, cols // m, m).sort(dim=-1).values[..., : m - n].sum(-1)


def nm_prune_mask(costs: torch.Tensor, group_mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inside every pruned group (``group_mask``, ``[d_out, d_in / m]``) its ``m - n`` cheapest weights."""
    rows, cols = costs.shape
    inner = lowest_k(costs.reshape(-1, m), m - n).view(rows, cols // m, m)
    return (inner & group_mask[..., None]).view(rows, cols)


def rowcol_prune_masks(costs: dict[str, tuple[torch.Tensor, torch.Tensor]], ratio: float
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One threshold over every module's row and column costs such that the weights removed stay within
    ``int(ratio · total)`` (docs/methods.md §5.3). Per module of ``R`` rows and ``C`` column candidates, removing
    ``r`` rows and ``c`` columns removes ``r C + c R - r c`` weights; walking a module's costs in increasing order
    that count is made monotone (running maximum, as the reference's ``cummax``), and the modules' counts add up
    along the merged order. The threshold is the largest cost at which the total stays within the target; every
    row and column at or below it is removed. Returns ``{name: (row_mask [R], column_mask [C])}``."""
    keys, steps, total = [], [], 0
    for row_costs, col_costs in costs.values():
        R, C = row_costs.numel(), col_costs.numel()
        total += R * C
        merged = torch.cat([row_costs, col_costs]).double().cpu()
        order = merged.argsort(stable=True)
        is_row = (order < R).double()
        rows, cols = is_row.cumsum(0), (1 - is_row).cumsum(0)
        removed = (rows * C + cols * R - rows * cols).cummax(0).values
        keys.append(merged[order])
        steps.append(torch.diff(removed, prepend=removed.new_zeros(1)))
    all_keys = torch.cat(keys)
    order = all_keys.argsort(stable=True)
    removed = torch.cat(steps)[order].cumsum(0)
    within = (removed <= int(ratio * total)).nonzero()
    threshold = all_keys[order][within.max()].item() if within.numel() else float("-inf")
    return {name: (row_costs.cpu() <= threshold, col_costs.cpu() <= threshold)
            for name, (row_costs, col_costs) in costs.items()}


def rowcol_mask(rows: torch.Tensor, cols: torch.Tensor, d_in: int) -> torch.Tensor:
    """The weight mask ``[d_out, d_in]`` of removed rows and columns (a bias column candidate is dropped)."""
    return rows[:, None] | cols[None, :d_in]


@dataclass
class UnitSlices:
    """One unit group of one block as the curvature sees it: per prunable linear it owns slices of, the axis
    (0 rows, 1 columns) and ``index [count, width]`` (:class:`models.base.UnitGroup`, full module names)."""

    block: int
    kind: str
    count: int
    params: int  # parameters per unit (all it owns, not only the linears' slices)
    slices: list[tuple[str, int, torch.Tensor]]


def unit_layout(adapter, modules: dict[str, nn.Linear]) -> list[UnitSlices]:
    """Every block's coarse unit groups (heads / KV groups, MLP neurons, Mamba channels), with the slices of the
    prunable linears they own (other owned parameters, e.g. Mamba's conv, do not enter the costs)."""
    prefix, layout = adapter.blocks_prefix(), []
    for index, block in enumerate(adapter.blocks()):
        for group in adapter.structure_groups(block):
            slices = [(f"{prefix}.{index}.{path.removesuffix('.weight')}", axis, idx)
                      for path, (axis, idx) in group.owned.items()
                      if path.endswith(".weight") and f"{prefix}.{index}.{path.removesuffix('.weight')}" in modules]
            layout.append(UnitSlices(index, group.kind, group.count, group.params_per_unit(block), slices))
    return layout


def unit_costs(layout: list[UnitSlices], costs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per unit group ``[count]``: the sum of the row costs of the rows and the column costs of the columns each unit
    owns (``costs[name] = (row costs, column costs)``, :meth:`KroneckerPruner.rowcol_costs`) [docs/methods.md §5.3]."""
    out = []
    for group in layout:
        total = torch.zeros(group.count, dtype=torch.float64)
        for name, axis, index in group.slices:
            values = costs[name][axis].double().cpu()
            total += values[index.reshape(-1)].view(index.shape).sum(1)
        out.append(total)
    return out


def units_prune_masks(costs: list[torch.Tensor], params: list[int], ratio: float, total: int, keep: int = 1,
                      removed: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One ranking of every group's units by cost, cheapest first: a unit is removed if it still fits, i.e. the
    removed parameters stay within ``int(ratio · total)`` (one that does not fit is passed over, a cheaper smaller
    one after it may still fit); the ``keep`` costliest units of every group still present are never removed.
    ``removed``: the units removed by earlier shots, which stay removed (and count). Returns per group the
    ``[count]`` mask of removed units."""
    keys, sizes = [], []
    for index, (cost, size) in enumerate(zip(costs, params, strict=True)):
        cost = cost.double().clone()
        gone = removed[index].bool() if removed is not None else torch.zeros(cost.numel(), dtype=torch.bool)
        alive = (~gone).nonzero().flatten()
        cost[alive[torch.argsort(cost[alive], descending=True, stable=True)[:keep]]] = float("inf")
        cost[gone] = float("-inf")
        keys.append(cost)
        sizes.append(torch.full((cost.numel(),), size, dtype=torch.float64))
    all_keys, all_sizes = torch.cat(keys), torch.cat(sizes)
    chosen = torch.zeros(all_keys.numel(), dtype=torch.bool)
    budget, used = int(ratio * total), 0.0
    for unit in all_keys.argsort(stable=True).tolist():
        key, size = all_keys[unit].item(), all_sizes[unit].item()
        if key == float("inf"):
            break
        if key == float("-inf") or used + size <= budget:
            chosen[unit] = True
            used += size
    return list(torch.split(chosen, [c.numel() for c in costs]))


def unit_removals(layout: list[UnitSlices], removed: list[torch.Tensor],
                  shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rows and columns of every linear that the removed units own: ``{name: (rows [R], columns [C])}``."""
    out = {name: (torch.zeros(r, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)) for name, (r, c) in shapes.items()}
    for group, mask in zip(layout, removed, strict=True):
        for name, axis, index in group.slices:
            out[name][axis][index[mask].reshape(-1)] = True
    return out


# --- the correlated update ---------------------------------------------------------------------------------------
def row_chunks(mask: torch.Tensor, max_correlate: int) -> list[torch.Tensor]:
    """Rows with removed entries, grouped consecutively into chunks of at most ``max_correlate`` removed entries
    (a row with more is a chunk of its own; 0 = one chunk), as the reference groups them."""
    counts = mask.sum(1).tolist()
    chunks, current, size = [], [], 0
    for row, count in enumerate(counts):
        if not count:
            continue
        if current and max_correlate and size + count > max_correlate:
            chunks.append(torch.tensor(current, device=mask.device))
            current, size = [], 0
        current.append(row)
        size += count
    if current:
        chunks.append(torch.tensor(current, device=mask.device))
    return chunks


def spd_solve(C: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C^-1 b`` for a symmetric positive definite ``C`` (a Hadamard product of two damped inverses is one):
    Cholesky, or LU where rounding has made it indefinite."""
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return torch.cholesky_solve(b[:, None], L)[:, 0]
    return torch.linalg.solve(C, b)


def chunk_solve(Gr: torch.Tensor, Ainv: torch.Tensor, r_local: torch.Tensor, c: torch.Tensor, w: torch.Tensor,
                tol: float = 1e-10, max_iter: int = 100) -> torch.Tensor:
    """``C^-1 w`` for one chunk, ``C = G^-1[Q_r, Q_r] ∘ A^-1[Q_c, Q_c]`` with ``Gr = G^-1`` over the chunk's rows
    and the entries ``(r_local, c)`` in row order (docs/methods.md §5.4). ``C`` is the principal submatrix of
    ``Gr ⊗ A^-1`` at the entries, so ``C v`` is ``Gr V A^-1`` read at the entries (``V``: ``v`` scattered), which
    costs far less than ``C`` itself; conjugate gradients on it, preconditioned by the blocks of ``C`` that
    couple a row with itself (``Gr_ii A^-1[S_i, S_i]``, Cholesky), converge in a few steps where rows are weakly
    coupled, and a chunk of one row is solved by its block directly. The residual is driven below ``tol`` relative
    to ``w``; a chunk that does not get there within ``max_iter`` steps is solved directly (Cholesky of ``C``)."""
    k, d = Gr.shape[0], Ainv.shape[0]
    counts = torch.bincount(r_local, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(r_local.numel(), device=w.device) - starts[r_local]  # place of each entry in its row's block
    width = int(counts.max())
    if k * width * width > r_local.numel() ** 2:  # very uneven rows: the padded blocks would outgrow C itself
        return spd_solve(Gr[r_local][:, r_local] * Ainv[c][:, c], w)
    blocks = torch.eye(width, dtype=w.dtype, device=w.device).repeat(k, 1, 1)  # padded with the identity
    for i, (start, count) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        cols = c[start:start + count]  # (the entries come row by row)
        blocks[i, :count, :count] = Gr[i, i] * Ainv[cols][:, cols]
    L, info = torch.linalg.cholesky_ex(blocks)
    if bool(info.any()):
        return spd_solve(Gr[r_local][:, r_local] * Ainv[c][:, c], w)

    def precondition(v):
        V = v.new_zeros(k, width, 1)
        V[r_local, pos, 0] = v
        return torch.cholesky_solve(V, L)[r_local, pos, 0]

    if k == 1:
        return precondition(w)

    def apply(v):
        V = w.new_zeros(k, d)
        V[r_local, c] = v
        return (Gr @ V @ Ainv)[r_local, c]

    x = precondition(w)
    r = w - apply(x)
    z = precondition(r)
    p = z.clone()
    rz = r @ z
    bound = tol * w.norm()
    for _ in range(max_iter):
        if r.norm() <= bound:
            return x
        Ap = apply(p)
        alpha = rz / (p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        z = precondition(r)
        rz, rz_old = r @ z, rz
        p = z + (rz / rz_old) * p
    if r.norm() <= bound:
        return x
    return spd_solve(Gr[r_local][:, r_local] * Ainv[c][:, c], w)


def correlated_update(W: torch.Tensor, mask: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor,
                      max_correlate: int = 2000, addupdate: bool = True) -> torch.Tensor:
    """The OBS update that removes the masked weights of ``W`` (``[d_out, d_in (+1 bias column)]``; the mask covers
    the first ``d_in`` columns), chunk by chunk (docs/methods.md §5.4): for the chunk's entries ``Q``,
    ``C = G^-1[Q_r, Q_r] ∘ A^-1[Q_c, Q_c]``, ``m = C^-1 w_Q``, ``ΔW = -G^-1 M A^-1``. ``addupdate``: each chunk
    sees the updates of the chunks before it (the reference's ``--addupdate``). Returns the updated ``W``
    (float64) with the masked entries exactly zero; one chunk holding every entry is the joint optimum of
    ``vec(ΔW)^T (G ⊗ A) vec(ΔW)`` under the constraint."""
    W = W.double()
    full = torch.zeros_like(W, dtype=torch.bool)
    full[:, : mask.shape[1]] = mask
    total = torch.zeros_like(W)
    for rows in row_chunks(full, max_correlate):
        sub = full[rows]
        r_local, c = sub.nonzero(as_tuple=True)
        r = rows[r_local]
        w = W[r, c] + total[r, c] if addupdate else W[r, c]
        M = W.new_zeros(rows.numel(), W.shape[1])  # the chunk's rows of M
        M[r_local, c] = chunk_solve(Ginv[rows][:, rows], Ainv, r_local, c, w)
        total -= Ginv[:, rows] @ (M @ Ainv)
    W = W + total
    W[full] = 0.0
    return W


def _split(indices: torch.Tensor, max_correlate: int) -> list[torch.Tensor]:
    if not indices.numel():
        return []
    return list(torch.split(indices, max_correlate)) if max_correlate else [indices]


def rowcol_update(W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor,
                  max_correlate: int = 0, addupdate: bool = False) -> torch.Tensor:
    """The OBS update that removes whole rows ``R`` and columns ``C`` of ``W`` (``[d_out, d_in (+1 bias column)]``)
    under ``F = G ⊗ A`` (docs/methods.md §5.4): rows ``ΔW = -G^-1[:, R] (G^-1[R, R])^-1 W[R, :]`` (``A`` cancels),
    then columns ``ΔW = -W[:, C] (A^-1[C, C])^-1 A^-1[C, :]`` (``G`` cancels), each in chunks of ``max_correlate``
    rows / columns (0 = all at once); ``addupdate``: each chunk starts from ``W`` plus the updates before it,
    otherwise every chunk from ``W`` as it came. Returns the updated ``W`` (float64) with the rows and columns
    exactly zero. ``cols`` may leave out the bias column (``d_in`` long)."""
    W = W.double()
    full_cols = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    full_cols[: cols.numel()] = cols.to(W.device)
    rows = rows.to(W.device)
    total = torch.zeros_like(W)
    for R in _split(rows.nonzero().flatten(), max_correlate):
        target = W[R] + total[R] if addupdate else W[R]
        total -= Ginv[:, R] @ torch.linalg.solve(Ginv[R][:, R], target)
    for C in _split(full_cols.nonzero().flatten(), max_correlate):
        target = W[:, C] + total[:, C] if addupdate else W[:, C]
        total -= torch.linalg.solve(Ainv[C][:, C], target.T).T @ Ainv[C]
    W = W + total
    W[rows] = 0.0
    W[:, full_cols] = 0.0
    return W


# --- the methods -------------------------------------------------------------------------------------------------
def _augmented(linear: nn.Linear) -> torch.Tensor:
    """``[W | b]`` (float64): the bias is a column of the matrix the curvature covers."""
    W = linear.weight.data.double()
    if linear.bias is not None:
        W = torch.cat([W, linear.bias.data.double()[:, None]], dim=1)
    return W


def _write(linear: nn.Linear, W: torch.Tensor) -> None:
    d_in = linear.weight.shape[1]
    linear.weight.data.copy_(W[:, :d_in].to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_(W[:, d_in].to(linear.bias.dtype))


def script_defaults(pattern: Pattern, damp_g: float | None, max_correlate: int | None, addupdate: bool | None
                    ) -> dict:
    """``damp_g``, ``max_correlate``, ``addupdate`` with each null replaced by the reference scripts' flag for
    ``pattern`` (element and 2:4: ``--damp_g 0.1 --max_correlate 2000 --addupdate``; rows + columns
    (``scripts/structured/surgeon.sh``): the code's defaults 0.01, 0, off)."""
    rowcol = pattern.kind in ("rowcol", "structured")  # (whole units: the rows + columns script's flags)
    return {"damp_g": damp_g if damp_g is not None else (0.01 if rowcol else UNSTRUCTURED_DAMP_G),
            "max_correlate": max_correlate if max_correlate is not None else (0 if rowcol else 2000),
            "addupdate": addupdate if addupdate is not None else not rowcol}


def live_structures(W: torch.Tensor, G: torch.Tensor | None, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The live rows and columns of the augmented ``W``: not all zero, and with a nonzero curvature diagonal
    (``G = None``: the method does not use ``G``, as L-OBD's ``I ⊗ A``). The rest is dead, as in the reference
    (``Pruner.WGA``): left out of ``G`` and ``A`` before anything is inverted (a removed row or column is fixed at
    zero, so the costs and updates of the others are those of the remaining variables), costing 0, and zero
    afterwards."""
    rows = W.ne(0).any(1)
    if G is not None:
        rows &= torch.diagonal(G).ne(0).to(W.device)
    cols = W.ne(0).any(0) & torch.diagonal(A).ne(0).to(W.device)
    return rows, cols


def _scatter(sub: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """A live-rows (x live-columns) tensor in full coordinates, zero elsewhere."""
    if cols is None:
        full = sub.new_zeros(rows.numel())
        full[rows] = sub
        return full
    full = sub.new_zeros(rows.numel(), cols.numel())
    full[rows[:, None] & cols[None, :]] = sub.reshape(-1)
    return full


def _padded(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A mask over the candidate columns widened to the augmented matrix (the bias column: not removed)."""
    if mask.shape[-1] == width:
        return mask.clone()
    out = mask.new_zeros(*mask.shape[:-1], width)
    out[..., : mask.shape[-1]] = mask
    return out


@dataclass
class KroneckerPruner(Pruner):
    """The shared driver of ``surgeon``, ``kobd`` and ``lobd``: curvature, costs, one global threshold per shot,
    update. A subclass gives the costs (:meth:`element_costs`, :meth:`rowcol_costs`) and, for OBS, the updates."""

    needs_calibration = True
    needs_gradients = True
    scope = "model"
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "rowcol", "structured")
    balanced: ClassVar[bool] = True  # the KFAC factors' Frobenius balancing (L-OBD uses A as it is)
    uses_g: ClassVar[bool] = True  # G enters the costs (L-OBD: no, so a zero diagonal of G kills no row)
    calls_on_shot: ClassVar[bool] = True  # hands each intermediate shot to settings.on_shot (eval.shots_every)
    resumes: ClassVar[bool] = True  # each shot kept (engine.resume; pruners/resume.py: resume_shots)
    shots: int = 5
    prune_bias: bool = False  # biases are candidates and count toward the target (unstructured, rows + columns)
    fisher_samples: int = 0  # 0: the empirical Fisher (true labels); k: labels sampled from the model, k per token
    factor_dtype: str | None = None  # dtype the completed factors wait in (float32 | bfloat16 | ...); null = stats dtype
    min_units: int = 1  # sparsity=structured: units of each kind every block keeps

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if not isinstance(self.min_units, int) or self.min_units < 1:
            raise ValueError(f"pruner.min_units={self.min_units} must be an integer >= 1")
        if self.shots < 1:
            raise ValueError(f"pruner.shots={self.shots} must be >= 1")
        if self.fisher_samples < 0:
            raise ValueError(f"pruner.fisher_samples={self.fisher_samples} must be >= 0 (0 = the true labels)")
        if self.factor_dtype is not None and self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"pruner.factor_dtype={self.factor_dtype} is not one of: {', '.join(FACTOR_DTYPES)} "
                             "(or null: engine.stats_dtype)")
        if self.prune_bias and pattern.kind in ("nm", "structured"):
            raise ValueError(f"pruner.prune_bias=true: {pattern.kind} sparsity chooses weights or whole units, not "
                             "bias entries; use it with unstructured or rowcol sparsity")

    @contextmanager
    def curvature(self, model, adapter, modules: dict[str, nn.Linear], calib_ids: torch.Tensor,
                  settings: EngineSettings, shot: int = 1) -> Iterator[KroneckerCurvature]:
        """Every linear's Kronecker factors from one forward + backward pass over the calibration windows, block by
        block (:func:`pruners.taps.accumulate_gradient_stats`), kept off the device (``engine.offload_dir``: files)
        for the body. The label draws of ``fisher_samples`` are seeded with the shot."""
        storage = FACTOR_DTYPES[self.factor_dtype] if self.factor_dtype is not None else None
        with Offload(settings.offload_dir) as store:
            curvature = KroneckerCurvature(modules, store, settings.stats_dtype, storage)
            accumulate_gradient_stats(model, adapter, calib_ids, settings, curvature.add, curvature.block_done,
                                      self.fisher_samples, seed=shot)
            yield curvature

    def prepare(self, G: torch.Tensor, A: torch.Tensor, pattern: Pattern):
        """What the costs and the update of one module need beyond ``G`` and ``A`` (the Surgeon: the damped
        inverses), or None."""
        return None

    def element_costs(self, W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, extra, pattern: Pattern):
        """Costs ``[d_out, columns]`` of one module's augmented ``W``; ``columns`` are the candidate columns (the bias
        column only with ``prune_bias``)."""
        raise NotImplementedError

    def rowcol_costs(self, W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, extra, pattern: Pattern):
        """``(row costs [d_out], column costs [columns])``."""
        raise NotImplementedError

    def update(self, W: torch.Tensor, mask: torch.Tensor, extra, pattern: Pattern) -> torch.Tensor:
        """``W`` (augmented, float64) with the masked weights removed: zeroed, no compensation (OBD)."""
        W = W.clone()
        W[:, : mask.shape[1]][mask] = 0.0
        return W

    def rowcol_update(self, W: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, extra, pattern: Pattern
                      ) -> torch.Tensor:
        """``W`` with the rows and columns removed: zeroed, no compensation (OBD)."""
        W = W.clone()
        W[rows.to(W.device)] = 0.0
        W[:, : cols.numel()][:, cols.to(W.device)] = 0.0
        return W

    def _columns(self, linear: nn.Linear) -> int:
        """The candidate columns of ``[W | b]``: the weights, and the bias with ``prune_bias``."""
        return linear.in_features + int(self.prune_bias and linear.bias is not None)

    def _live(self, curvature: KroneckerCurvature, name: str, linear: nn.Linear, pattern: Pattern, device):
        """One module's augmented ``W``, its live rows and columns, and ``W``, ``G``, ``A`` and the method's extra
        restricted to them, on ``device``."""
        G, A = curvature.factors(name, self.balanced, device)
        W = _augmented(linear).to(device)
        rows, cols = live_structures(W, G if self.uses_g else None, A)
        Gs, As = G[rows][:, rows], A[cols][:, cols]
        del G, A
        return W, rows, cols, W[rows][:, cols], Gs, As, self.prepare(Gs, As, pattern)

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        """Per shot: the curvature (block by block, off the device), every module's costs (one module on the
        device at a time), one global threshold, then every module's update (its factors fetched again). The model
        stays on the host; only what one module or block needs is on ``settings.device``."""
        modules = prunable_modules(adapter)
        state = MaskState()
        losses: dict[str, float] = {}
        device = settings.device
        lines = pattern.kind in ("rowcol", "structured")  # rows and columns (whole units: the ones they own)
        layout = unit_layout(adapter, modules) if pattern.kind == "structured" else None
        owned = {name for group in layout for name, _, _ in group.slices} if layout is not None else None
        candidates = {name: m for name, m in modules.items() if owned is None or name in owned}
        removed_units, unit_losses = None, None
        first, kept, after_shot = resume_shots(settings, self.shots)  # (engine.resume: after the last shot kept)
        if kept is not None:
            for name, linear in modules.items():
                linear.weight.data.copy_(kept["weights"][name])
                if linear.bias is not None:
                    linear.bias.data.copy_(kept["biases"][name])
            for name, mask in unpack_masks(kept["masks"]).items():
                state.register(name, mask)
            losses, removed_units, unit_losses = kept["losses"], kept["removed_units"], kept["unit_losses"]
            del kept  # (a second copy of every pruned weight otherwise, beside the curvature, until the prune ends)
        for shot in tqdm(range(first, self.shots + 1), desc=f"{self.name} {pattern.describe()}", unit="shot",
                         initial=first - 1, total=self.shots, disable=not settings.progress):
            with self.curvature(model, adapter, modules, calib_ids, settings, shot) as curvature:
                costs = {}
                for name, linear in candidates.items():
                    W, rows, cols, Ws, Gs, As, extra = self._live(curvature, name, linear, pattern, device)
                    if lines:
                        row_costs, col_costs = self.rowcol_costs(Ws, Gs, As, extra, pattern)
                        costs[name] = (_scatter(row_costs, rows).cpu(),
                                       _scatter(col_costs, cols)[: self._columns(linear)].cpu())
                    else:
                        element = self.element_costs(Ws, Gs, As, extra, pattern)
                        # (fp32 on the host: 4 bytes per weight; the threshold compares fp32 anyway; N:M keeps fp64
                        # for the choice inside each group)
                        element = _scatter(element, rows, cols)[:, : self._columns(linear)]
                        costs[name] = (element if pattern.kind == "nm" else element.float()).cpu()
                    del W, Ws, Gs, As, extra
                if layout is not None:
                    chosen, removed_units, unit_losses = self.unit_shot_masks(costs, layout, pattern, shot,
                                                                              removed_units, unit_losses)
                else:
                    chosen = self.shot_masks(costs, pattern, shot)
                for name, (removed, loss) in chosen.items():
                    linear = modules[name]
                    d_in = linear.in_features
                    W, rows, cols, Ws, Gs, As, extra = self._live(curvature, name, linear, pattern, device)
                    if lines:
                        removed = (removed[0].to(device), _padded(removed[1], W.shape[1]).to(device))
                    else:
                        removed = _padded(removed, W.shape[1]).to(device)
                    if name in state and not lines:  # removed stays removed (it costs 0, but ties at 0 need not
                        # all fit); rows / columns: a removed row / column is zero, so dead (~rows, ~cols)
                        removed[:, :d_in].logical_or_(state.prune_mask(name, device))
                    if lines:
                        state.register(name, rowcol_mask(removed[0] | ~rows, removed[1] | ~cols, d_in).cpu())
                        Ws = self.rowcol_update(Ws, removed[0][rows], removed[1][cols], extra, pattern)
                    else:
                        state.register(name, (removed | ~(rows[:, None] & cols[None, :]))[:, :d_in].cpu())
                        Ws = self.update(Ws, removed[rows][:, cols], extra, pattern)
                    losses[name] = loss
                    _write(linear, _scatter(Ws, rows, cols))  # dead rows and columns are zero
                    del W, Ws, Gs, As, extra
                del costs
            state.enforce(model)
            if settings.on_shot is not None and shot < self.shots:
                settings.on_shot(shot, self.shots)
            if after_shot is not None and shot < self.shots:  # (engine.resume: a killed run goes on after it)
                after_shot(shot, {"weights": {n: m.weight.detach().cpu() for n, m in modules.items()},
                                  "biases": {n: m.bias.detach().cpu() for n, m in modules.items() if m.bias is not None},
                                  "masks": pack_masks(state.masks), "losses": losses,
                                  "removed_units": removed_units, "unit_losses": unit_losses})
        if layout is not None:  # the zeroed units leave the model
            return self.remove_units(adapter, layout, removed_units, unit_losses)
        results = {}
        for name in modules:
            mask = state.prune_mask(name)
            results[name] = ModuleResult(int(mask.sum()), mask.numel(), losses.get(name), mask=PackedMask.pack(mask))
        return results

    def unit_shot_masks(self, costs: dict, layout: list[UnitSlices], pattern: Pattern, shot: int,
                        before: list[torch.Tensor] | None, losses: list[float] | None
                        ) -> tuple[dict, list[torch.Tensor], list[float]]:
        """``sparsity=structured``: the units removed after shot ``shot`` (one ranking over every unit's summed row
        and column costs at ``s_t = t S / T`` of the unit parameters, :func:`units_prune_masks`; the units removed
        ``before`` stay removed), as ``{name: ((rows, columns), summed cost)}`` over the linears they own, per unit
        group its removed mask, and per group the summed costs of its removed units over the shots (``losses``)."""
        per_unit = unit_costs(layout, costs)
        total = sum(group.count * group.params for group in layout)
        removed = units_prune_masks(per_unit, [group.params for group in layout], pattern.ratio * shot / self.shots,
                                    total, self.min_units, before)
        new = removed if before is None else [now & ~then for now, then in zip(removed, before, strict=True)]
        losses = [(losses[i] if losses is not None else 0.0) + float(per_unit[i][mask].sum())
                  for i, mask in enumerate(new)]
        shapes = {name: (row_costs.numel(), col_costs.numel()) for name, (row_costs, col_costs) in costs.items()}
        out = {}
        for name, (rows, cols) in unit_removals(layout, removed, shapes).items():
            row_costs, col_costs = costs[name]
            out[name] = ((rows, cols), float(row_costs[rows.to(row_costs.device)].sum()
                                             + col_costs[cols.to(col_costs.device)].sum()))
        return out, removed, losses

    def remove_units(self, adapter, layout: list[UnitSlices], removed: list[torch.Tensor], losses: list[float]
                     ) -> dict:
        """Remove every zeroed unit through the adapter (its outputs are zero and unread, so the logits do not
        change); the results are recorded under each group's reader, as the structured pruners', each with the
        summed costs of the group's removed units over the shots as its loss."""
        prefix, blocks, results = adapter.blocks_prefix(), adapter.blocks(), {}
        for group, mask, loss in zip(layout, removed, losses, strict=True):
            block = blocks[group.block]
            unit_group = adapter.unit_group(block, group.kind)  # (as the block is after its other groups' removals)
            name, result = remove_kept(adapter, block, unit_group, ~mask, prefix, group.block, loss)
            results[name] = result
        return results

    def shot_masks(self, costs: dict, pattern: Pattern, shot: int) -> dict:
        """``{name: (removed, summed cost)}`` after shot ``shot``: one threshold over every module at
        ``s_t = t S / T`` over element costs (unstructured; ``removed`` a mask over the candidate columns) or row
        and column costs (rowcol, :func:`rowcol_prune_masks`; ``removed`` = ``(rows, columns)``), or over N:M group
        costs at the fraction ``t / T`` of all groups (every group pruned at the last shot). Removed weights cost 0,
        so they stay below the threshold."""
        if pattern.kind == "rowcol":
            chosen = rowcol_prune_masks(costs, pattern.ratio * shot / self.shots)
            out = {}
            for name, (rows, cols) in chosen.items():
                row_costs, col_costs = costs[name]
                rows, cols = rows.to(row_costs.device), cols.to(col_costs.device)
                out[name] = ((rows, cols), float(row_costs[rows].sum() + col_costs[cols].sum()))
            return out
        if pattern.kind == "nm":
            groups = {name: nm_group_costs(c, pattern.n, pattern.m) for name, c in costs.items()}
            chosen = global_prune_masks(groups, shot / self.shots)
            masks = {name: nm_prune_mask(costs[name], chosen[name].to(costs[name].device), pattern.n, pattern.m)
                     for name in costs}
        else:
            masks = global_prune_masks(costs, pattern.ratio * shot / self.shots)  # (on the CPU)
        return {name: (mask, float(costs[name][mask].double().sum())) for name, mask in masks.items()}


@register
@dataclass
class Surgeon(KroneckerPruner):
    """``pruner=surgeon``: Kronecker-factored OBS costs, one global threshold, correlated updates, ``shots`` shots."""

    name = "surgeon"
    shots: int = 5  # shots to the target (the reference scripts: 5 / 10 / 20 / 40 for element and 2:4, 40 rowcol)
    damp_g: float | None = None  # relative damping of G; null = 0.1 unstructured / N:M, 0.01 rowcol (the scripts)
    damp_a: float = 0.01  # relative damping of A
    max_correlate: int | None = None  # entries (rows / columns) solved jointly per chunk; null = 2000 (0 rowcol)
    addupdate: bool | None = None  # each chunk's update sees the earlier chunks'; null = true (false rowcol)

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.max_correlate is not None and self.max_correlate < 0:
            raise ValueError(f"pruner.max_correlate={self.max_correlate} must be >= 0 (0 = all at once)")
        for key in ("damp_g", "damp_a"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"pruner.{key}={value} must be positive")

    def resolved(self, pattern: Pattern) -> dict:
        """The settings a null key stands for under ``pattern`` (:func:`script_defaults`)."""
        return script_defaults(pattern, self.damp_g, self.max_correlate, self.addupdate)

    def prepare(self, G, A, pattern):
        return damped_inverse(G, self.resolved(pattern)["damp_g"]), damped_inverse(A, self.damp_a)

    def element_costs(self, W, G, A, extra, pattern):
        Ginv, Ainv = extra
        return obs_element_costs(W, Ginv, Ainv)

    def rowcol_costs(self, W, G, A, extra, pattern):
        Ginv, Ainv = extra
        return obs_row_costs(W, A, Ginv), obs_column_costs(W, G, Ainv)

    def update(self, W, mask, extra, pattern):
        r = self.resolved(pattern)
        return correlated_update(W, mask, *extra, r["max_correlate"], r["addupdate"])

    def rowcol_update(self, W, rows, cols, extra, pattern):
        r = self.resolved(pattern)
        return rowcol_update(W, rows, cols, *extra, r["max_correlate"], r["addupdate"])


@register
@dataclass
class KOBD(KroneckerPruner):
    """``pruner=kobd``: the LLM Surgeon repository's K-OBD baseline: diagonal Kronecker-factored costs
    (``w^2 G_rr A_cc / 2`` per weight; ``(w_r^T A w_r) G_rr / 2`` per row, ``(w_c^T G w_c) A_cc / 2`` per column),
    the same global threshold and shots, no weight update."""

    name = "kobd"
    shots: int = 1  # the reference scripts: 1 (unstructured), 40 (rows + columns)

    def element_costs(self, W, G, A, extra, pattern):
        return kobd_element_costs(W, G, A)

    def rowcol_costs(self, W, G, A, extra, pattern):
        return kobd_row_costs(W, G, A), kobd_column_costs(W, G, A)


def lobd_element_costs(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """L-OBD cost (the input factor only, ``G = I``): ``w_rc^2 A_cc / 2``; a row's or column's cost is the sum of
    its entries' (the reference's ``Activations`` curvature)."""
    return W.double() ** 2 * torch.diagonal(A).double()[None, : W.shape[1]] / 2


@register
@dataclass
class LOBD(KroneckerPruner):
    """``pruner=lobd``: the LLM Surgeon repository's L-OBD baseline (``--curvature activations --obd``): ``F ≈ I ⊗ A``
    with ``A`` the mean of ``a a^T`` as it is (no balancing), costs ``w^2 A_cc / 2`` (rows and columns: summed),
    the same global threshold and shots, no weight update. (The gradient pass still runs; ``G`` is not used.)"""

    name = "lobd"
    balanced = False
    uses_g = False
    shots: int = 1

    def element_costs(self, W, G, A, extra, pattern):
        return lobd_element_costs(W, A)

    def rowcol_costs(self, W, G, A, extra, pattern):
        costs = lobd_element_costs(W, A)
        return costs.sum(1), costs.sum(0)
