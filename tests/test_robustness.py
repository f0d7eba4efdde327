"""Context corruption and the steps sweep: the noise is what its spec says, seeded, and targets are never
touched; a corrupted context costs the exact oracle likelihood; Euler samples converge to the dopri5
solve at first order."""

import pytest
import torch

from flownp.jobs.baselines.oracle import OraclePredictor
from flownp.core.config import ModelConfig
from flownp.jobs.evaluate import evaluate_predictor, synthetic_law
from flownp.core.model import FlowNP
from flownp.jobs.robustness import SALT, corrupt_context, corrupted, parse_noise, robustness_summary, steps_sweep
from flownp.core.solvers import SolverConfig
from ingest.normalize import Normalizer
from ingest.store import Store
from ingest.tasks import TaskBatch, TaskConfig, TaskSampler


def batch(b=2, n_ctx=4000, n_tgt=5, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return TaskBatch(r(b, n_ctx, 2), r(b, n_ctx, 4), r(b, n_tgt, 2), r(b, n_tgt, 4), torch.zeros(b, dtype=torch.long),
                     torch.zeros(b, n_ctx, dtype=torch.long), torch.zeros(b, n_tgt, dtype=torch.long))


@pytest.mark.parametrize("spec", ["gauss:0.1", "gaussian", "gaussian:-1", "salt-pepper:1.5", "gaussian:nan",
                                  "salt-pepper:x"])
def test_bad_noise_specs_are_refused(spec):
    with pytest.raises(ValueError, match="context noise"):
        parse_noise(spec)


def test_gaussian_noise_has_the_asked_std_and_spares_targets():
    b = batch()
    n = corrupt_context(b, "gaussian:0.3", torch.Generator().manual_seed(1))
    assert abs(float((n.yc - b.yc).std()) - 0.3) < 0.01
    assert torch.equal(n.yt, b.yt) and torch.equal(n.xc, b.xc) and torch.equal(n.xt, b.xt)
    assert torch.equal(corrupt_context(b, "gaussian:0", torch.Generator()).yc, b.yc)


def test_salt_pepper_hits_the_asked_fraction_with_outliers():
    b = batch()
    n = corrupt_context(b, "salt-pepper:0.1", torch.Generator().manual_seed(1))
    hit = n.yc != b.yc
    assert abs(float(hit.float().mean()) - 0.1) < 0.01
    assert torch.all(n.yc[hit].abs() == SALT)
    assert abs(float((n.yc[hit] > 0).float().mean()) - 0.5) < 0.05


def test_corruption_is_seeded():
    a, b = corrupted([batch()], "salt-pepper:0.2", seed=3), corrupted([batch()], "salt-pepper:0.2", seed=3)
    c = corrupted([batch()], "salt-pepper:0.2", seed=4)
    assert torch.equal(a[0].yc, b[0].yc) and not torch.equal(a[0].yc, c[0].yc)


def test_corrupted_context_costs_the_oracle_likelihood(tiny_store):
    store = Store.open(tiny_store)
    _, test = store.load("test")
    batches = [TaskSampler(test, store.region.circle_xy, TaskConfig(60, 60, 40, 4, seed=2))[0]]
    pred = OraclePredictor(synthetic_law(store), store.normalizer)
    clean = evaluate_predictor(pred, batches, store.normalizer, n_samples=8)
    drops = []
    for spec in ("gaussian:0.05", "gaussian:0.5", "salt-pepper:0.2"):
        noisy = evaluate_predictor(pred, corrupted(batches, spec, 0), store.normalizer, n_samples=8)
        s = robustness_summary(clean, noisy)
        assert s["tar_ll_drop"] == pytest.approx(clean["tar_ll"] - noisy["tar_ll"])
        drops.append(s["tar_ll_drop"])
    assert 0 < drops[0] < drops[1], drops  # more noise, more loss
    assert drops[2] > 1.0, drops


def test_euler_samples_converge_to_the_dopri5_solve_at_first_order():
    torch.manual_seed(0)
    model = FlowNP(ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, embed_hidden=32,
                               head_hidden=64)).double().eval()
    norm = Normalizer.from_dict({"variables": ["sp", "t2m", "u10", "v10"], "mean": [100.0, 5.0, 0.0, 0.0],
                                 "std": [1.0, 6.0, 3.5, 3.5], "methods": ["standard"] * 2 + ["scale"] * 2,
                                 "source": "test"})
    b = batch(n_ctx=30, n_tgt=20)
    b = TaskBatch(*(x.double() if x.is_floating_point() else x for x in (getattr(b, f) for f in b.__dataclass_fields__)))
    out = steps_sweep(model, [b], norm, (4, 8, 16, 32), n_samples=2,
                      reference=SolverConfig("dopri5", rtol=1e-10, atol=1e-10))
    err = {int(k): v["t2m"] for k, v in out["rmse_to_reference"].items()}
    assert err[4] > err[8] > err[16] > err[32] > 0
    assert 1.6 < err[16] / err[32] < 2.4, err  # halving the step halves the error
    assert out["reference_nfe_mean"] > 0
