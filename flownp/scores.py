"""Scores of a predictive distribution given by samples (one place for the evaluation job, the benches and the
Python API): CRPS, and interval coverage that is exact for any number of samples.

Why rank coverage: the empirical 5-95% quantile interval of S draws from the TRUE law covers a new value only
about (S - 1) / (S + 1) of the time at 90% nominal (0.73 at S = 8, 0.81 at S = 16), so a coverage goal read off
it rewards over-dispersed models. The rank of the truth among the samples is uniform on {0, ..., S} for
exchangeable draws; spreading each rank uniformly over its 1 / (S + 1) slice of [0, 1] (the randomised PIT of a
Talagrand rank histogram, taken in expectation) gives a coverage whose mean is exactly the nominal level for a
calibrated predictor at every S.
"""

from __future__ import annotations

import torch


def crps_from_samples(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """CRPS per element: E|X - y| - 0.5 E|X - X'| with the sorted-sample formula.
    samples (B, S, n, D), truth (B, n, D) -> (B, n, D), in the units of the inputs."""
    s = samples.shape[1]
    term1 = (samples - truth[:, None]).abs().mean(1)
    xs = samples.sort(dim=1).values
    w = (2 * torch.arange(1, s + 1, dtype=samples.dtype, device=samples.device) - s - 1).view(1, s, 1, 1)
    term2 = (w * xs).sum(1) / (s * s)  # = 0.5 E|X - X'|
    return term1 - term2


def rank_coverage(samples: torch.Tensor, truth: torch.Tensor, level: float) -> torch.Tensor:
    """Expected coverage of the central `level` interval (0 < level < 1) by the randomised PIT of the truth's
    rank among the samples: the fraction of the truth's rank slice [r_lo, r_hi + 1] / (S + 1) inside
    [(1 - level) / 2, (1 + level) / 2], where r_lo counts samples below the truth and r_hi samples at or below
    it (ties share the slice). Its mean over points is `level` exactly for a calibrated predictor, below it for
    an over-confident one. samples (B, S, n, D), truth (B, n, D) -> (B, n, D) in [0, 1]."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = samples.shape[1]
    r_lo = (samples < truth[:, None]).sum(1).double()
    r_hi = (samples <= truth[:, None]).sum(1).double()
    a, b = r_lo / (s + 1), (r_hi + 1) / (s + 1)
    lo, hi = (1.0 - level) / 2, (1.0 + level) / 2
    inside = (torch.minimum(b, torch.tensor(hi, dtype=b.dtype)) - torch.maximum(a, torch.tensor(lo, dtype=a.dtype)))
    return (inside.clamp(min=0.0) / (b - a)).to(samples.dtype)


def quantile_interval_coverage(samples: torch.Tensor, truth: torch.Tensor, level: float) -> torch.Tensor:
    """1 where the truth lies inside the samples' empirical central `level` quantile interval (torch.quantile,
    linear interpolation), else 0: the coverage reported before rank coverage, biased low for few samples
    (module docstring). samples (B, S, n, D), truth (B, n, D) -> (B, n, D)."""
    q = torch.quantile(samples, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype), dim=1)
    return ((truth >= q[0]) & (truth <= q[1])).to(samples.dtype)
