"""A job's check reaches every solve of an LFM and a distilled sampler (issue 16 item 5): a `Job` cancelled
after k evaluations stops the request at the next one, inside the block or map it was in, for sampling
and for scoring (the teacher's solve). Counted: one check per context encoding and per velocity evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.core.solvers import SolverConfig
from flownp.inference import Task, extrapolate, log_likelihood, task
from service.engine import Cancelled
from tests.test_service_common import values
from tests.tiny_samplers import BLOCKS, CancelAfter, loaded

EULER3 = SolverConfig("euler", 3)


def _task(lm, with_values: bool = False) -> Task:
    r = lm.region
    idx = np.random.default_rng(0).permutation(r.n_points)
    c, t = idx[:60], idx[60:66]
    era5 = lambda i: np.stack(list(values(r.circle_lat[i], r.circle_lon[i]).values()), -1)  # noqa: E731
    return task(lm.space, r.circle_lat[c], r.circle_lon[c], era5(c), r.circle_lat[t], r.circle_lon[t],
                era5(t) if with_values else None)


def _sample(lm, check, sampler=None, with_ll=False):
    return extrapolate(lm, _task(lm), num_samples=2, solver=EULER3, seed=0, with_ll=with_ll,
                       ll_solver=SolverConfig("midpoint", 1), estimator="auto", check=check, sampler=sampler)


def test_every_block_evaluation_of_an_lfm_sample_is_checked():
    """Uncancelled: one check per block encoding and per Euler step, in every block."""
    lm, count = loaded("lfm"), CancelAfter(10**9)
    out = _sample(lm, count)
    assert out["nfe"] == BLOCKS * 3 and count.calls == BLOCKS * (1 + 3)
    assert out["sampler"]["name"] == "lfm" and out["sampler"]["blocks"] == BLOCKS


@pytest.mark.parametrize("k", [1, 5])  # in the first block; in the second (the first took 4 checks)
def test_a_cancelled_job_stops_an_lfm_sample_at_its_next_evaluation(k):
    lm, job = loaded("lfm"), CancelAfter(k)
    with pytest.raises(Cancelled):
        _sample(lm, job)
    assert job.calls == k + 1


def test_a_cancelled_job_stops_an_lfm_likelihood_in_its_blocks():
    lm = loaded("lfm")
    full = CancelAfter(10**9)
    _sample(lm, full, with_ll=True)
    sampling = BLOCKS * 4
    assert full.calls > sampling + BLOCKS  # the likelihood's blocks were checked too (encodings + steps)
    job = CancelAfter(sampling + 2)  # inside the likelihood's first block
    with pytest.raises(Cancelled):
        _sample(lm, job, with_ll=True)
    assert job.calls == sampling + 3


@pytest.mark.parametrize("teacher", ["lfm", "flownp"])
def test_a_cancelled_job_stops_a_distilled_sample_between_its_maps(teacher):
    lm = loaded("distilled", teacher)
    full = CancelAfter(10**9)
    out = _sample(lm, full)
    maps = out["sampler"]["maps"]
    assert out["sampler"]["name"] == "distilled" and out["nfe"] == maps == 2 and full.calls == 2 * maps
    job = CancelAfter(2)  # map 1 done (encoding + evaluation): map 2 never runs
    with pytest.raises(Cancelled):
        _sample(lm, job)
    assert job.calls == 3


@pytest.mark.parametrize("teacher", ["lfm", "flownp"])
def test_a_cancelled_job_stops_the_teachers_scoring_of_a_distilled_model(teacher):
    lm = loaded("distilled", teacher)
    t = _task(lm, with_values=True)
    full = CancelAfter(10**9)
    res = log_likelihood(lm, t, solver=EULER3, estimator="auto", check=full)
    assert res["scored_by"] == f"teacher ({teacher})" and res["exact_density"] is False
    assert full.calls == res["blocks"] * (1 + 3)
    job = CancelAfter(1)
    with pytest.raises(Cancelled):
        log_likelihood(lm, t, solver=EULER3, estimator="auto", check=job)
    assert job.calls == 2


def test_the_teachers_sampler_of_a_distilled_model_is_checked_too():
    lm, job = loaded("distilled", "lfm"), CancelAfter(5)
    with pytest.raises(Cancelled):
        _sample(lm, job, sampler="lfm")
    assert job.calls == 6
