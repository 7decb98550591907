import pytest
import torch

from pruners.masks import (
    Pattern,
    lowest_k,
    prune_n_of_m,
    prune_per_matrix,
    prune_per_row,
    satisfies_n_of_m,
    select_prune_mask,
    sparsity,
)


def test_per_row_prunes_exactly_k_lowest_of_every_row():
    score = torch.rand(7, 40)
    mask = prune_per_row(score, 0.3)
    assert (mask.sum(1) == 12).all()
    # every pruned score is <= every kept score of the same row
    for r in range(7):
        assert score[r][mask[r]].max() <= score[r][~mask[r]].min()


def test_per_matrix_prunes_exactly_k_lowest_overall():
    score = torch.rand(9, 33)
    mask = prune_per_matrix(score, 0.6)
    assert mask.sum() == int(9 * 33 * 0.6)
    assert score[mask].max() <= score[~mask].min()
    assert mask.sum(1).float().std() > 0  # not per-row: rows differ


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_n_of_m_keeps_the_n_largest_of_each_group(n, m):
    score = torch.rand(6, 8 * m)
    mask = prune_n_of_m(score, n, m)
    groups_mask = mask.view(6, 8, m)
    assert (groups_mask.sum(-1) == m - n).all()
    weight = score.masked_fill(mask, 0)
    assert satisfies_n_of_m(weight, n, m)
    groups = score.view(6, 8, m)
    kept_min = groups.masked_fill(groups_mask, float("inf")).min(-1).values
    pruned_max = groups.masked_fill(~groups_mask, float("-inf")).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_n_of_m_rejects_a_dimension_that_is_not_a_multiple_of_m():
    with pytest.raises(ValueError, match="multiple of m=8"):
        prune_n_of_m(torch.rand(2, 12), 4, 8)


def test_satisfies_n_of_m_detects_a_violation():
    w = torch.ones(2, 8)
    w[:, ::2] = 0
    assert satisfies_n_of_m(w, 2, 4)
    w[0, 0] = 1.0
    assert not satisfies_n_of_m(w, 2, 4)


def test_lowest_k_zero_and_sparsity():
    assert not lowest_k(torch.rand(3, 4), 0).any()
    assert sparsity(torch.tensor([0.0, 1.0, 0.0, 2.0])) == 0.5


@pytest.mark.parametrize("cfg,err", [
    ({"kind": "unstructured", "ratio": 1.0}, r"outside \[0, 1\)"),
    ({"kind": "unstructured", "ratio": -0.1}, r"outside \[0, 1\)"),
    ({"kind": "nm", "n": 4, "m": 4}, "0 < n < m"),
    ({"kind": "nm", "n": 0, "m": 4}, "0 < n < m"),
    ({"kind": "blocky"}, "not one of"),
])
def test_pattern_rejects_impossible_settings(cfg, err):
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match=err):
        Pattern.from_config(OmegaConf.create(cfg))


def test_pattern_target_and_select():
    from omegaconf import OmegaConf

    p = Pattern.from_config(OmegaConf.create({"kind": "nm", "n": 1, "m": 4}))
    assert p.target_sparsity == 0.75 and p.describe() == "1:4"
    mask = select_prune_mask(torch.rand(4, 16), p)
    assert mask.float().mean() == 0.75
