"""CNP and TNP-A: symmetry, autoregressive structure, checkpoints, a short training that learns, and
evaluation through the same code as FlowNP."""

import math

import pytest
import torch

from flownp.jobs.baselines.neural import NeuralBaselineConfig, NeuralBaselinePredictor, load_baseline, tnpa_mask
from flownp.jobs.evaluate import evaluate_predictor, make_baseline
from flownp.jobs.train import TrainConfig, Trainer
from ingest.store import Store
from ingest.tasks import TaskBatch, TaskConfig, TaskSampler


def tiny(kind: str) -> NeuralBaselineConfig:
    return NeuralBaselineConfig(kind=kind, d_model=16, n_layers=2, n_heads=2, d_ff=32, space_freqs=4)


def data(b=2, nc=6, nt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, d, generator=g) for n, d in ((nc, 2), (nc, 4), (nt, 2), (nt, 4))]


def test_config_round_trips_and_rejects_bad_kind():
    c = tiny("tnpa")
    assert NeuralBaselineConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="kind"):
        NeuralBaselineConfig(kind="anp")


@pytest.mark.parametrize("kind", ["cnp", "tnpa"])
def test_invariant_to_context_order(kind):
    torch.manual_seed(0)
    m = tiny(kind).build()
    xc, yc, xt, yt = data()
    p = torch.randperm(xc.shape[1])
    torch.testing.assert_close(m.log_likelihood(xc, yc, xt, yt), m.log_likelihood(xc[:, p], yc[:, p], xt, yt),
                               rtol=1e-5, atol=1e-5)


def test_cnp_is_equivariant_in_target_order():
    torch.manual_seed(0)
    m = tiny("cnp").build()
    xc, yc, xt, yt = data()
    p = torch.randperm(xt.shape[1])
    mean, std = m(xc, yc, xt)
    mean_p, std_p = m(xc, yc, xt[:, p])
    torch.testing.assert_close(mean[:, p], mean_p)
    torch.testing.assert_close(std[:, p], std_p)


def test_tnpa_mask_is_causal():
    m = tnpa_mask(2, 3)
    assert m.shape == (8, 8)
    assert m[:, :2].all() and not m[:2, 2:].any()          # everyone sees the context; it sees only itself
    assert m[3, 2] and m[3, 3] and not m[3, 4]               # valued target 1 sees valued 0, 1
    assert not m[5, 2] and m[6, 2] and not m[6, 3]          # query 0 sees no target, query 1 sees target 0
    assert not m[:, 5:].any()                               # nobody attends to a query


def test_tnpa_likelihood_is_the_sum_of_its_conditionals():
    """Joint autoregressive density = sum over i of log p(y_i | context, y_<i), each computed from the
    prefix alone: the mask leaks nothing from later targets."""
    torch.manual_seed(0)
    m = tiny("tnpa").build().eval()
    xc, yc, xt, yt = data(nt=6)
    full = m.log_likelihood(xc, yc, xt, yt)
    parts = []
    for i in range(xt.shape[1]):
        mean, std = m(xc, yc, xt[:, : i + 1], yt[:, : i + 1])
        z = (yt[:, i] - mean[:, i]) / std[:, i]
        parts.append((-0.5 * z**2 - std[:, i].log() - 0.5 * math.log(2 * math.pi)).sum(-1))
    torch.testing.assert_close(full, torch.stack(parts, 1).sum(1), rtol=1e-5, atol=1e-4)


def test_tnpa_needs_target_values():
    with pytest.raises(ValueError, match="yt"):
        tiny("tnpa").build()(*data()[:3])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnp", "tnpa"])
def test_short_training_beats_the_prior_and_reloads(kind, tiny_store, tmp_path):
    c = TrainConfig(steps=150, batch_size=8, lr=3e-3, warmup=10, ckpt_every=150, n_ctx_min=100,
                    n_ctx_max=100, n_tgt=40, ema_decay=0.9, log_every=50, val_batches=1, seed=1)
    store = Store.open(tiny_store)
    Trainer(store, tmp_path, tiny(kind), c).run(progress=False)
    pred = make_baseline(f"{kind}:{tmp_path / 'last.pt'}")
    assert isinstance(pred, NeuralBaselinePredictor) and pred.model.config == tiny(kind)
    # new tasks (another draw of context/target points) on the training maps: the tiny store's single
    # train year is too small for these models to generalise across years in 150 steps
    _, train = store.load("train")
    b = TaskSampler(train, store.region.circle_xy, TaskConfig(100, 100, 40, 16, seed=11))[0]
    prior = (-0.5 * b.yt.pow(2) - 0.5 * math.log(2 * math.pi)).sum((1, 2)) / 40
    gain = float((pred.log_likelihood(b) / 40 - prior).mean())
    assert gain > 0.7, gain  # nats per target point over N(0, I) (about 1.2 measured; untrained about 0)
    res = evaluate_predictor(pred, [b], store.normalizer, n_samples=4)
    assert res["predictor"]["ll_kind"].startswith("marginal" if kind == "cnp" else "joint")
    assert ("rmse" in res) == (kind == "cnp")  # TNP-A offers no samples
    with pytest.raises(ValueError, match="not a"):
        make_baseline(f"{'tnpa' if kind == 'cnp' else 'cnp'}:{tmp_path / 'last.pt'}")


def test_load_refuses_a_flownp_checkpoint(tmp_path):
    from flownp.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "x.pt", {"kind": "pretrain", "model_config": {}, "model": {}})
    with pytest.raises(ValueError, match="neural-baseline"):
        load_baseline(str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="checkpoint"):
        make_baseline("cnp")


def test_batch_type_is_what_evaluate_passes():
    # the predictor accepts the TaskBatch that evaluate_predictor iterates over
    xc, yc, xt, yt = data()
    b = TaskBatch(xc, yc, xt, yt, torch.zeros(2, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long),
                  torch.zeros(2, 5, dtype=torch.long))
    p = NeuralBaselinePredictor(tiny("cnp").build())
    assert p.log_likelihood(b).shape == (2,) and p.sample(b, 3, torch.Generator()).shape == (2, 3, 5, 4)
