"""APT (joint multi-weight OBS): optimality for a fixed mask, SparseGPT as its B=1 case, N:M by joint loss."""

import itertools

import pytest
import torch

from pruners import Pattern, build_pruner
from pruners.apt import apt_prune, joint_removal_coefficients, nm_mask_by_joint_loss
from pruners.masks import satisfies_n_of_m
from pruners.sparsegpt import sparsegpt_prune
from pruners.stats import damped_inverse_cholesky

from .conftest import hessian_of, layer_error, pruned_ppl


def lstsq_refit(W, X, prune_mask):
    refit = torch.zeros_like(W)
    for r in range(W.shape[0]):
        keep = ~prune_mask[r]
        refit[r, keep] = torch.linalg.lstsq(X[:, keep], X @ W[r], driver="gelsd").solution
    return refit


def test_full_row_apt_equals_the_least_squares_optimum_for_a_fixed_mask(captured_layer):
    W, X = captured_layer
    W, X = W[:48], X  # 48 rows keep the per-row lstsq quick
    H = hessian_of(X, torch.float64).matrix
    U, _ = damped_inverse_cholesky(H, 0.0)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    apt, out_mask, _ = apt_prune(W, U, Pattern("unstructured", 0.6), blocksize=0, prune_mask=mask)
    assert torch.equal(out_mask, mask) and (apt[mask] == 0).all()
    optimum = layer_error(W, lstsq_refit(W, X, mask), X)
    assert layer_error(W, apt, X) == pytest.approx(optimum, rel=1e-6)


@pytest.mark.parametrize("blocksize", [0, 128, 32])
def test_apt_error_is_at_most_sparsegpt_error_on_the_same_mask(captured_layer, blocksize):
    W, X = captured_layer
    U, _ = damped_inverse_cholesky(hessian_of(X).matrix, 0.01)
    sgpt, mask, _ = sparsegpt_prune(W.float(), U, Pattern("unstructured", 0.5), 128)
    apt, _, _ = apt_prune(W.float(), U, Pattern("unstructured", 0.5), blocksize=blocksize, prune_mask=mask)
    assert layer_error(W, apt.double(), X) <= layer_error(W, sgpt.double(), X)


def test_blocksize_1_reproduces_sparsegpt(captured_layer):
    W, X = captured_layer
    U, _ = damped_inverse_cholesky(hessian_of(X, torch.float64).matrix, 0.01)
    for pattern in (Pattern("unstructured", 0.5), Pattern("unstructured", 0.7)):
        sgpt, sgpt_mask, sgpt_loss = sparsegpt_prune(W, U, pattern, blocksize=1)
        apt, apt_mask, apt_loss = apt_prune(W, U, pattern, blocksize=1)
        assert torch.equal(sgpt_mask, apt_mask)
        assert torch.allclose(sgpt, apt, rtol=1e-9, atol=1e-12)
        assert apt_loss == pytest.approx(sgpt_loss, rel=1e-9)


def test_joint_removal_coefficients_solve_each_rows_own_system():
    torch.manual_seed(0)
    A = torch.randn(10, 10, dtype=torch.float64)
    S = A @ A.T + torch.eye(10, dtype=torch.float64)
    w = torch.randn(4, 10, dtype=torch.float64)
    mask = torch.rand(4, 10) < 0.5
    X = joint_removal_coefficients(S, w, mask)
    for r in range(4):
        P = mask[r].nonzero().flatten()
        expected = torch.zeros(10, dtype=torch.float64)
        expected[P] = torch.linalg.solve(S[P][:, P], w[r, P])
        assert torch.allclose(X[r], expected, atol=1e-10)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_selection_minimizes_the_joint_loss_per_group(n, m):
    torch.manual_seed(1)
    A = torch.randn(2 * m, 2 * m, dtype=torch.float64)
    S = A @ A.T + 0.5 * torch.eye(2 * m, dtype=torch.float64)
    w = torch.randn(3, 2 * m, dtype=torch.float64)
    mask = nm_mask_by_joint_loss(w, S, n, m)
    assert satisfies_n_of_m(w.masked_fill(mask, 0), n, m)
    for r in range(3):
        for g in range(2):
            cols = range(g * m, (g + 1) * m)
            losses = {P: (w[r, list(P)] @ torch.linalg.solve(S[list(P)][:, list(P)], w[r, list(P)])).item()
                      for P in itertools.combinations(cols, m - n)}
            chosen = tuple(c for c in cols if mask[r, c])
            assert losses[chosen] == pytest.approx(min(losses.values()))


def test_apt_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of m=8"):
        build_pruner({"name": "apt", "blocksize": 12}).check(Pattern("nm", 0.5, 4, 8))
    with pytest.raises(ValueError, match="not one of: matrix, row"):
        build_pruner({"name": "apt", "group": "column"}).check(Pattern("unstructured", 0.5))
    build_pruner({"name": "apt", "blocksize": 0}).check(Pattern("nm", 0.5, 4, 8))  # full row: any m


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-mamba"])
def test_apt_perplexity_is_at_most_sparsegpt_at_50_percent_and_2_of_4(name):
    for pattern in (Pattern("unstructured", 0.5), Pattern("nm", 0.5, 2, 4)):
        ppl = {p: pruned_ppl(name, p, pattern) for p in ("sparsegpt", "apt")}
        assert ppl["apt"] <= ppl["sparsegpt"], (pattern, ppl)
