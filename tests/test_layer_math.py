"""Layer-level checks of the OBS machinery on a layer input captured from a bundled model."""

import pytest
import torch

from pruners.magnitude import magnitude_score
from pruners.masks import Pattern, select_prune_mask
from pruners.sparsegpt import sparsegpt_prune
from pruners.stats import ColumnSquares, damped_inverse_cholesky
from pruners.wanda import wanda_score

from .conftest import hessian_of, layer_error


@pytest.mark.parametrize("pattern", [Pattern("unstructured", 0.5), Pattern("unstructured", 0.7), Pattern("nm", 0.5, 2, 4)],
                         ids=["50%", "70%", "2:4"])
def test_reconstruction_error_orders_magnitude_wanda_sparsegpt_lstsq(captured_layer, pattern):
    W, X = captured_layer
    W32 = W.float()
    norms = ColumnSquares(X.shape[1], "cpu")
    norms.add(X.float())
    mag = W32.masked_fill(select_prune_mask(magnitude_score(W32), pattern, "row"), 0)
    wan = W32.masked_fill(select_prune_mask(wanda_score(W32, norms.norm), pattern, "row"), 0)
    U, _ = damped_inverse_cholesky(hessian_of(X).matrix, 0.01)
    sgpt, mask, _ = sparsegpt_prune(W32, U, pattern, 128)
    errors = {name: layer_error(W, w.double(), X) for name, w in (("magnitude", mag), ("wanda", wan), ("sparsegpt", sgpt))}
    assert errors["magnitude"] >= errors["wanda"] >= errors["sparsegpt"], errors
    # the exact least-squares refit of SparseGPT's own mask, on the first 64 rows (per row, kept columns only)
    rows = slice(0, 64)
    refit = torch.zeros_like(W[rows])
    for r in range(64):
        keep = ~mask[r]
        refit[r, keep] = torch.linalg.lstsq(X[:, keep], X @ W[r], driver="gelsd").solution
    optimum = layer_error(W[rows], refit, X)
    assert layer_error(W[rows], sgpt[rows].double(), X) >= optimum * (1 - 1e-6)


def test_sparsegpt_at_zero_sparsity_leaves_weights_unchanged(captured_layer):
    W, X = captured_layer
    U, _ = damped_inverse_cholesky(hessian_of(X).matrix)
    out, mask, loss = sparsegpt_prune(W.float(), U, Pattern("unstructured", 0.0))
    assert not mask.any() and loss == 0.0
    assert torch.equal(out, W.float())


def test_hessian_running_mean_equals_batch_formula(captured_layer):
    _, X = captured_layer
    stat = hessian_of(X, torch.float64)
    assert torch.allclose(stat.matrix, 2 * X.T @ X / X.shape[0], rtol=1e-10, atol=1e-12)
    assert stat.count == X.shape[0]


def test_damped_inverse_cholesky_handles_dead_inputs():
    X = torch.randn(200, 12, dtype=torch.float64)
    X[:, 3] = 0  # a dead input feature
    H = 2 * X.T @ X / 200
    U, dead = damped_inverse_cholesky(H, 0.01)
    assert dead.tolist() == [i == 3 for i in range(12)]
    fixed = H.clone()
    fixed[3, 3] = 1
    damped = fixed + 0.01 * torch.mean(torch.diag(fixed)) * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), atol=1e-8)
    assert torch.equal(U, torch.triu(U))


def test_sparsegpt_loss_estimate_matches_measured_error_for_one_block():
    """With a single block and no lazy updates, the OBS loss equals the (damped) quadratic error."""
    torch.manual_seed(0)
    X = torch.randn(400, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    W = torch.randn(5, 16, dtype=torch.float64)
    H = 2 * X.T @ X / 400
    U, _ = damped_inverse_cholesky(H, 0.0)
    out, _, loss = sparsegpt_prune(W, U.double(), Pattern("unstructured", 0.5), 16)
    delta = (W - out.double())
    quadratic = 0.5 * torch.einsum("ri,ij,rj->", delta, H, delta).item()
    assert loss == pytest.approx(quadratic, rel=1e-3)
