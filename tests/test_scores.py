"""Sample scores (flownp.scores): rank coverage is exactly nominal for calibrated samples at any sample count,
where the empirical quantile interval is not, and it orders over- and under-confident predictors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flownp.scores import quantile_interval_coverage, rank_coverage


def _draws(n_samples: int, n_points: int = 40000, spread: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (spread * torch.randn(1, n_samples, n_points, 1, generator=g, dtype=torch.float64),
            torch.randn(1, n_points, 1, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("n_samples", [2, 8, 16])
@pytest.mark.parametrize("level", [0.5, 0.9])
def test_rank_coverage_of_calibrated_samples_is_the_level_at_any_sample_count(n_samples, level):
    s, y = _draws(n_samples)
    got = float(rank_coverage(s, y, level).mean())
    assert abs(got - level) < 0.01, got  # 4e4 points: Monte Carlo s.e. < 0.003


def test_quantile_interval_coverage_is_biased_low_for_few_samples():
    """The negative control: the metric reported before rank coverage reads 0.73 for 8 true draws."""
    s, y = _draws(8)
    assert 0.70 < float(quantile_interval_coverage(s, y, 0.9).mean()) < 0.76


def test_rank_coverage_orders_over_and_under_confident_samples():
    wide, y = _draws(16, spread=1.5)
    narrow, _ = _draws(16, spread=0.6)
    assert float(rank_coverage(wide, y, 0.9).mean()) > 0.95
    assert float(rank_coverage(narrow, y, 0.9).mean()) < 0.82


def test_rank_coverage_of_a_point_mass_by_hand_ties_share_their_slice():
    s = torch.zeros(1, 4, 3, 1, dtype=torch.float64)
    y = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(1, 3, 1)
    got = rank_coverage(s, y, 0.9).flatten()
    # below all 4 samples: rank slice [0, 1/5], of which [0.05, 0.2] is inside -> 0.75; above all: [4/5, 1]
    # -> 0.75; a tie with all 4 spreads over [0, 1] -> 0.9
    torch.testing.assert_close(got, torch.tensor([0.75, 0.9, 0.75], dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_rank_coverage_is_invariant_to_the_order_of_the_samples_and_lies_in_0_1(n_samples, seed):
    s, y = _draws(n_samples, n_points=50, seed=seed)
    perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    a, b = rank_coverage(s, y, 0.9), rank_coverage(s[:, perm], y, 0.9)
    torch.testing.assert_close(a, b)
    assert bool(((a >= 0) & (a <= 1)).all())


def test_rank_coverage_rejects_a_level_outside_0_1():
    s, y = _draws(4, n_points=3)
    with pytest.raises(ValueError, match="level"):
        rank_coverage(s, y, 1.0)
