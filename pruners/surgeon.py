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
  every shot and removed weights stay removed (:class:`pruners.masks.MaskState`).

``pruner=lobd`` is the L-OBD baseline (``I ⊗ A``, :func:`lobd_element_costs`). Not yet here (docs/methods.md §5):
rows / columns (structured), labels sampled
from the model, the perplexity of intermediate shots, the block-by-block memory scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .base import ModuleResult, Pruner, register
from .masks import MaskState, PackedMask, Pattern, global_prune_masks, lowest_k
from .settings import EngineSettings
from .taps import accumulate_gradient_stats, model_on_device, prunable_modules

UNSTRUCTURED_DAMP_G = 0.1  # the reference scripts' --damp_g for element / 2:4 pruning (the code's default: 0.01)


# --- curvature ---------------------------------------------------------------------------------------------------
class KroneckerFactors:
    """Running sums for ``A = Σ a a^T / T`` and ``G = Σ g g^T / T`` over the ``T`` tokens seen (docs/methods.md §5.1).

    ``a`` gets a trailing ones entry when the module has a bias. ``g`` is taken as the gradient of the
    *per-sequence* mean loss (the reference runs one sequence per backward): the taps hand out gradients of the
    mean over all ``sequences`` windows, so they are scaled by ``sequences`` here. (The overall scale of ``G ⊗ A``
    changes no mask and no update; it is kept for comparisons with the reference's factors.)"""

    def __init__(self, d_in: int, d_out: int, bias: bool, sequences: int, device, dtype=torch.float32):
        self.bias = bias
        self.scale = float(sequences)
        self.A = torch.zeros(d_in + int(bias), d_in + int(bias), device=device, dtype=dtype)
        self.G = torch.zeros(d_out, d_out, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, activation: torch.Tensor, grad: torch.Tensor) -> None:
        a = activation.reshape(-1, activation.shape[-1]).to(self.A.dtype)
        g = grad.reshape(-1, grad.shape[-1]).to(self.G.dtype).nan_to_num(0.0) * self.scale
        if self.bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, device=a.device, dtype=a.dtype)], dim=1)
        self.A.addmm_(a.T, a)
        self.G.addmm_(g.T, g)
        self.tokens += a.shape[0]

    def factors(self, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, A)``, averaged and (``balanced``) balanced (:func:`balance`)."""
        count = max(self.tokens, 1)
        G, A = self.G / count, self.A / count
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
    """``(M + damp · mean(diag M) · I)^-1`` in float64 through Cholesky (the reference's ``utils.inv``). A dead
    input or output (a zero row and column) is left as it is: the damping makes the matrix positive definite, and
    its inverse diagonal ``1 / (damp · mean)`` is large, so that weights on a dead input cost little and are
    removed first (the reference drops such rows and columns from the matrices instead). An all-zero ``M``
    (no signal at all) is damped with mean 1."""
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
        w = (W + total)[r, c] if addupdate else W[r, c]
        C = Ginv[r][:, r] * Ainv[c][:, c]
        coeff = torch.linalg.solve(C, w)
        M = torch.zeros_like(W)
        M.index_put_((r, c), coeff, accumulate=True)
        total -= Ginv @ M @ Ainv
    W = W + total
    W[full] = 0.0
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


@dataclass
class KroneckerPruner(Pruner):
    """The shared driver of ``surgeon`` and ``kobd``: curvature, costs, one global threshold per shot, update."""

    needs_calibration = True
    needs_gradients = True
    scope = "model"
    balanced: ClassVar[bool] = True  # the KFAC factors' Frobenius balancing (L-OBD uses A as it is)
    shots: int = 5

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.shots < 1:
            raise ValueError(f"pruner.shots={self.shots} must be >= 1")

    def curvature(self, model, modules: dict[str, nn.Linear], calib_ids: torch.Tensor,
                  settings: EngineSettings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (G, A)}`` of every module from one forward + backward pass over the calibration windows."""
        factors = {name: KroneckerFactors(linear.in_features, linear.out_features, linear.bias is not None,
                                          calib_ids.shape[0], settings.device, settings.stats_dtype)
                   for name, linear in modules.items()}
        accumulate_gradient_stats(model, modules, calib_ids, settings,
                                  lambda name, a, g: factors[name].add(a, g))
        return {name: f.factors(self.balanced) for name, f in factors.items()}

    def element_costs(self, W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, d_in: int):
        """``(costs [d_out, d_in], what update() needs or None)`` of one module's augmented ``W``."""
        raise NotImplementedError

    def update(self, W: torch.Tensor, mask: torch.Tensor, extra) -> torch.Tensor:
        """``W`` (augmented, float64) with the masked weights removed: zeroed, no compensation (OBD)."""
        W = W.clone()
        W[:, : mask.shape[1]][mask] = 0.0
        return W

    def prune_model(self, model, adapter, pattern: Pattern, calib_ids, settings: EngineSettings
                    ) -> dict[str, ModuleResult]:
        modules = prunable_modules(adapter)
        state = MaskState()
        losses: dict[str, float] = {}
        with model_on_device(model, settings.device):
            for shot in tqdm(range(1, self.shots + 1), desc=f"{self.name} {pattern.describe()}", unit="shot",
                             disable=not settings.progress):
                curvature = self.curvature(model, modules, calib_ids, settings)
                costs, extras = {}, {}
                for name, linear in modules.items():
                    G, A = curvature.pop(name)
                    costs[name], extras[name] = self.element_costs(_augmented(linear), G, A, linear.in_features)
                masks = self.shot_masks(costs, pattern, shot)
                for name, linear in modules.items():
                    mask = masks[name].to(linear.weight.device)
                    if name in state:
                        mask |= state.prune_mask(name, linear.weight.device)
                    state.register(name, mask)
                    losses[name] = float(costs[name][mask].sum())
                    _write(linear, self.update(_augmented(linear), mask, extras[name]))
                del costs, extras
                state.enforce(model)
        results = {}
        for name in modules:
            mask = state.prune_mask(name)
            results[name] = ModuleResult(int(mask.sum()), mask.numel(), losses.get(name), mask=PackedMask.pack(mask))
        return results

    def shot_masks(self, costs: dict[str, torch.Tensor], pattern: Pattern, shot: int) -> dict[str, torch.Tensor]:
        """The removed weights after shot ``shot``: one threshold over every module at ``s_t = t S / T``
        (unstructured), or over N:M group costs at the fraction ``t / T`` of all groups (every group pruned at the
        last shot). Removed weights cost 0, so they stay below the threshold."""
        if pattern.kind == "nm":
            groups = {name: nm_group_costs(c, pattern.n, pattern.m) for name, c in costs.items()}
            chosen = global_prune_masks(groups, shot / self.shots)
            return {name: nm_prune_mask(costs[name], chosen[name].to(costs[name].device), pattern.n, pattern.m)
                    for name in costs}
        masks = global_prune_masks(costs, pattern.ratio * shot / self.shots)  # (on the CPU)
        return {name: mask.to(costs[name].device) for name, mask in masks.items()}


@register
@dataclass
class Surgeon(KroneckerPruner):
    """``pruner=surgeon``: Kronecker-factored OBS costs, one global threshold, correlated updates, ``shots`` shots."""

    name = "surgeon"
    shots: int = 5  # shots to the target (the reference scripts: 5 / 10 / 20 / 40 for element and 2:4)
    damp_g: float | None = None  # relative damping of G; null = 0.1 for unstructured / N:M (the reference scripts)
    damp_a: float = 0.01  # relative damping of A
    max_correlate: int = 2000  # removed entries solved jointly per chunk of rows (0 = all at once)
    addupdate: bool = True  # each chunk's update sees the earlier chunks' (the reference scripts' --addupdate)

    def check(self, pattern: Pattern) -> None:
        super().check(pattern)
        if self.max_correlate < 0:
            raise ValueError(f"pruner.max_correlate={self.max_correlate} must be >= 0 (0 = all at once)")
        for key in ("damp_g", "damp_a"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"pruner.{key}={value} must be positive")

    def element_costs(self, W, G, A, d_in):
        damp_g = UNSTRUCTURED_DAMP_G if self.damp_g is None else float(self.damp_g)
        Ginv, Ainv = damped_inverse(G, damp_g), damped_inverse(A, self.damp_a)
        return obs_element_costs(W[:, :d_in], Ginv, Ainv), (Ginv, Ainv)

    def update(self, W, mask, extra):
        Ginv, Ainv = extra
        return correlated_update(W, mask, Ginv, Ainv, self.max_correlate, self.addupdate)


@register
@dataclass
class KOBD(KroneckerPruner):
    """``pruner=kobd``: the LLM Surgeon repository's K-OBD baseline: diagonal Kronecker-factored costs
    ``w^2 G_rr A_cc / 2``, the same global threshold and shots, no weight update."""

    name = "kobd"
    shots: int = 1

    def element_costs(self, W, G, A, d_in):
        return kobd_element_costs(W[:, :d_in], G, A), None


def lobd_element_costs(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """L-OBD cost (the input factor only, ``G = I``): ``w_rc^2 A_cc / 2``."""
    return W.double() ** 2 * torch.diagonal(A).double()[None, : W.shape[1]] / 2


@register
@dataclass
class LOBD(KroneckerPruner):
    """``pruner=lobd``: the LLM Surgeon repository's L-OBD baseline (``--curvature activations --obd``): ``F ≈ I ⊗ A``
    with ``A`` the mean of ``a a^T`` as it is (no balancing), costs ``w^2 A_cc / 2``, the same global threshold and
    shots, no weight update. (The gradient pass still runs; ``G`` is not used.)"""

    name = "lobd"
    balanced = False
    shots: int = 1

    def element_costs(self, W, G, A, d_in):
        return lobd_element_costs(W[:, :d_in], A), None
