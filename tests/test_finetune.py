"""MLE fine-tuning of reconstructions: the couplings do what the method says (inversion lowers the K-step
reconstruction error, random pairs collapse samples to the mean), gradients through the decoder agree
across memory modes, checkpoints record their base and resume exactly, bad settings are refused."""

import json

import pytest
import torch

from flownp.checkpoint import load_checkpoint, model_from_checkpoint
from flownp.core.config import ModelConfig
from flownp.jobs.finetune import FinetuneConfig, FineTuner, euler_decode, invert
from ingest.io import sha256_file
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from flownp.jobs.train import TrainConfig, Trainer
from ingest.store import Store
from ingest.tasks import TaskConfig, TaskSampler

TINY = ModelConfig(d_model=32, n_heads=2, n_layers=2, d_ff=64, embed_hidden=32, head_hidden=64)
K = 2  # coarse enough that the pretrained field's K-step reconstruction error is visible


def tcfg(**kw):
    base = dict(steps=6, batch_size=4, n_ctx_min=60, n_ctx_max=60, n_tgt=24, warmup=1, ckpt_every=3,
                log_every=1, val_batches=1, seed=5, lr=1e-3, schedule="constant", ema_decay=0.5)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_ckpt(tiny_store, tmp_path_factory):
    """A tiny FlowNP pretrained briefly (it need not be good, only a smooth, non-trivial field)."""
    out = tmp_path_factory.mktemp("base")
    c = TrainConfig(steps=150, batch_size=8, lr=2e-3, warmup=10, ckpt_every=150, n_ctx_min=60, n_ctx_max=60,
                    n_tgt=24, ema_decay=0.9, log_every=50, seed=1)
    Trainer(Store.open(tiny_store), out, TINY, c).run(progress=False)
    return out / "last.pt"


def fixed_batch(store_path, n=8, seed=21):
    store = Store.open(store_path)
    _, train = store.load("train")
    return TaskSampler(train, store.region.circle_xy, TaskConfig(60, 60, 24, n, seed=seed))[0]


@torch.no_grad()
def recon_mse(model, frozen, batch) -> float:
    z = invert(frozen, batch, 32)
    return float((euler_decode(model, batch.xc, batch.yc, batch.xt, z, K) - batch.yt).pow(2).mean())


@torch.no_grad()
def spread(model, batch) -> float:
    s = sample(model, batch.xc, batch.yc, batch.xt, n_samples=8, solver=SolverConfig("euler", K),
               generator=torch.Generator().manual_seed(0)).samples
    return float(s.std(1).mean())


def test_couplings_do_what_they_claim(tiny_store, base_ckpt, tmp_path):
    batch = fixed_batch(tiny_store)
    base = model_from_checkpoint(load_checkpoint(base_ckpt))
    r0, s0 = recon_mse(base, base, batch), spread(base, batch)
    out = {}
    for coupling in ("inversion", "random"):
        ft = FinetuneConfig(coupling=coupling, k_steps=K, inversion_steps=16, sigma=0.1)
        t = FineTuner(Store.open(tiny_store), tmp_path / coupling, base_ckpt, ft, tcfg(steps=60, ckpt_every=60))
        t.run(progress=False)
        out[coupling] = (recon_mse(t.model, base, batch), spread(t.model, batch))
    (ri, si), (rr, sr) = out["inversion"], out["random"]
    # measured: r0 0.0044 -> ri 0.0016; s0 0.86 -> si 0.88, sr 0.53
    assert ri < 0.6 * r0, (ri, r0)      # the deterministic coupling teaches K coarse steps to reconstruct
    assert sr < 0.75 * s0, (sr, s0)     # random pairs: the optimum is the conditional mean, samples collapse
    assert si > 0.9 * s0, (si, s0)      # the inversion coupling keeps the spread
    assert sr < 0.75 * si


def test_decoder_gradients_agree_across_memory_modes():
    torch.manual_seed(0)
    m = __import__("flownp.core.model", fromlist=["FlowNP"]).FlowNP(TINY)
    xc, yc, xt = torch.randn(2, 10, 2), torch.randn(2, 10, 4), torch.randn(2, 7, 2)
    z, y1 = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    grads = {}
    for mode in ("backprop", "checkpoint", "adjoint"):
        m.zero_grad()
        (euler_decode(m, xc, yc, xt, z, 8, mode) - y1).pow(2).sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in m.parameters()])
    assert torch.allclose(grads["backprop"], grads["checkpoint"], atol=1e-6, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(grads["backprop"], grads["adjoint"], dim=0)
    assert cos > 0.95, float(cos)  # the adjoint solves the continuous adjoint: close, not bitwise


def test_checkpoint_records_base_and_resumes_exactly(tiny_store, base_ckpt, tmp_path):
    ft = FinetuneConfig(k_steps=2, inversion_steps=4, learn_sigma=True, cfm_weight=0.1)
    store = Store.open(tiny_store)
    full = FineTuner(store, tmp_path / "full", base_ckpt, ft, tcfg())
    full.run(progress=False)
    part = FineTuner(store, tmp_path / "part", base_ckpt, ft, tcfg())
    part.run(progress=False, stop_at=5)  # "crash" after step 5; last.pt is step 3
    again = FineTuner(store, tmp_path / "part", base_ckpt, ft, tcfg())
    again.resume(tmp_path / "part" / "last.pt")
    assert again.step == 3
    again.run(progress=False)
    for pa, pb in zip(full.module.parameters(), again.module.parameters()):
        assert torch.equal(pa, pb)
    ck = load_checkpoint(tmp_path / "full" / "last.pt")
    assert ck["kind"] == "finetune" and ck["finetune_config"] == ft.to_dict()
    assert ck["base_checkpoint"]["sha256"] == sha256_file(base_ckpt)
    assert ck["train_config"]["schedule"] == "constant"
    assert not torch.allclose(ck["log_sigma"], torch.full((4,), 0.1).log())  # sigma was learned
    rows = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all("recon_mse" in r and "sigma" in r for r in rows if "loss" in r)
    m = model_from_checkpoint(ck)  # rebuilds the fine-tuned FlowNP as it was trained
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in full.model.parameters())


@pytest.mark.parametrize("kind", ["schur", "mlp", "schur-lowrank", "contracting-local"])
def test_gav_finetune_trains_only_the_residual_and_reloads(tiny_store, base_ckpt, tmp_path, kind):
    from flownp.core.gav import GAVFlowNP

    rank = 1 if kind.endswith("-lowrank") else None
    centre = "local" if kind.endswith("-local") else "mlp"
    kind = kind.removesuffix("-lowrank").removesuffix("-local")
    ft = FinetuneConfig(mode="gav", k_steps=2, inversion_steps=4,
                        gav={"kind": kind, "hidden": 8, "cayley_rank": rank, "centre": centre, "centre_width": 8})
    t = FineTuner(Store.open(tiny_store), tmp_path, base_ckpt, ft, tcfg(steps=4, ckpt_every=4))
    before = {k: v.clone() for k, v in t.model.residual.state_dict().items()}
    t.run(progress=False)
    base = model_from_checkpoint(load_checkpoint(base_ckpt))
    for a, b in zip(base.parameters(), t.model.base.parameters()):
        assert torch.equal(a, b)  # the base stayed frozen
    assert any(not torch.equal(before[k], v) for k, v in t.model.residual.state_dict().items())
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["gav_config"]["kind"] == kind and ck["gav_config"]["cayley_rank"] == rank
    assert ck["gav_config"]["centre"] == centre
    m = model_from_checkpoint(ck, ema=False)
    assert hasattr(m.residual, "local") == (centre == "local")
    assert isinstance(m, GAVFlowNP)
    for a, b in zip(m.parameters(), t.model.parameters()):
        assert torch.equal(a, b)


def test_gav_checkpoints_as_bases_and_a_changed_base(tiny_store, base_ckpt, tmp_path):
    from flownp.core.gav import GAVFlowNP

    store = Store.open(tiny_store)
    gav = FineTuner(store, tmp_path / "gav", base_ckpt, FinetuneConfig(mode="gav", k_steps=2, inversion_steps=2),
                    tcfg(steps=2, ckpt_every=2))
    gav.run(progress=False)
    with pytest.raises(ValueError, match="already has a GAV residual"):
        FineTuner(store, tmp_path / "gav2", tmp_path / "gav" / "last.pt", FinetuneConfig(mode="gav"), tcfg())
    # MLE fine-tuning of a GAV model tunes all of it and reloads as a GAV model
    mle = FineTuner(store, tmp_path / "mle", tmp_path / "gav" / "last.pt", FinetuneConfig(k_steps=2, inversion_steps=2),
                    tcfg(steps=2, ckpt_every=2))
    assert all(p.requires_grad for p in mle.model.parameters())
    mle.run(progress=False)
    assert isinstance(model_from_checkpoint(load_checkpoint(tmp_path / "mle" / "last.pt")), GAVFlowNP)
    # a run resumed against a base whose file changed is refused
    changed = tmp_path / "base-copy.pt"
    changed.write_bytes(base_ckpt.read_bytes())
    FineTuner(store, tmp_path / "r", changed, FinetuneConfig(k_steps=2, inversion_steps=2),
              tcfg(steps=2, ckpt_every=2)).run(progress=False)
    ck = torch.load(base_ckpt, weights_only=True)
    ck["step"] = 999
    torch.save(ck, changed)
    t = FineTuner(store, tmp_path / "r", changed, FinetuneConfig(k_steps=2, inversion_steps=2), tcfg())
    with pytest.raises(ValueError, match="another base"):
        t.resume(tmp_path / "r" / "last.pt")


@pytest.mark.parametrize("kw, match", [
    ({"mode": "lora"}, "mode"), ({"coupling": "ot"}, "coupling"), ({"grad": "magic"}, "grad"),
    ({"k_steps": 0}, "k_steps"), ({"sigma": 0.0}, "sigma"), ({"cfm_weight": -1.0}, "cfm_weight"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kw)


def test_finetune_config_round_trips():
    ft = FinetuneConfig(mode="gav", coupling="random", k_steps=8, learn_sigma=True, gav={"kind": "contracting"})
    assert FinetuneConfig.from_dict(json.loads(json.dumps(ft.to_dict()))) == ft


def test_checkpoints_record_the_smallest_context_over_the_lineage(tiny_store, base_ckpt, tmp_path):
    """Fine-tuned on larger contexts than its base (60): the model was still trained on 60-point contexts,
    and the service and the Python API accept them (the last stage's task_config alone would say 200)."""
    import hashlib

    from flownp.api import Extrapolator
    from flownp.checkpoint import lineage_n_ctx_min
    from service.engine import load_models
    from service.settings import Settings

    store, ft = Store.open(tiny_store), FinetuneConfig(k_steps=2, inversion_steps=2)
    FineTuner(store, tmp_path / "ft1", base_ckpt, ft, tcfg(steps=1, ckpt_every=1, n_ctx_min=200,
                                                           n_ctx_max=220)).run(progress=False)
    ck1 = load_checkpoint(tmp_path / "ft1" / "last.pt")
    assert ck1["task_config"]["n_ctx_min"] == 200 and ck1["base_checkpoint"]["n_ctx_min"] == 60
    assert ck1["trained_n_ctx_min"] == 60 == lineage_n_ctx_min(ck1)
    # a fine-tune of the fine-tune: its base's record carries the pretraining's minimum along
    FineTuner(store, tmp_path / "ft2", tmp_path / "ft1" / "last.pt", ft,
              tcfg(steps=1, ckpt_every=1, n_ctx_min=300, n_ctx_max=300)).run(progress=False)
    path = tmp_path / "ft2" / "last.pt"
    ck2 = load_checkpoint(path)
    assert (ck2["task_config"]["n_ctx_min"], ck2["base_checkpoint"]["n_ctx_min"], ck2["trained_n_ctx_min"]) == \
        (300, 60, 60)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (lm,) = load_models(Settings(checkpoint=path, checkpoint_sha256=sha)).values()
    assert lm.trained_min_context == 60 and lm.min_context(Settings()) == 60
    assert Extrapolator.from_checkpoint(path).min_context == 60


def test_control_starts_from_the_fine_tunes_weights_and_trains_by_flow_matching(tiny_store, base_ckpt, tmp_path):
    """The continued-pretraining control of a fine-tune: the same starting weights (hashes recorded in both
    checkpoints, equal to the base's own), the same steps and tasks, the flow-matching objective."""
    from flownp.jobs.finetune import check_same_start, state_dict_sha256
    from flownp.jobs.train import fm_loss

    store = Store.open(tiny_store)
    runs = {}
    for name, ft in (("ft", FinetuneConfig(k_steps=2, inversion_steps=2)),
                     ("ctl", FinetuneConfig(k_steps=2, inversion_steps=2, control=True))):
        t = FineTuner(store, tmp_path / name, base_ckpt, ft, tcfg(steps=3, ckpt_every=3))
        assert (t.objective is fm_loss) == ft.control and (t.module is t.model) == ft.control
        t.run(progress=False)
        runs[name] = load_checkpoint(tmp_path / name / "last.pt")
    ft_ck, ctl_ck = runs["ft"], runs["ctl"]
    want = state_dict_sha256(model_from_checkpoint(load_checkpoint(base_ckpt)).state_dict())
    assert ft_ck["start_base_sha256"] == ctl_ck["start_base_sha256"] == want
    assert ft_ck["start_sha256"] == ctl_ck["start_sha256"] == want  # mle: the model trained is the base itself
    assert ctl_ck["finetune_config"]["control"] and ctl_ck["log_sigma"] is None
    check_same_start(ft_ck, ctl_ck)
    # the control moved its weights, by another objective than the fine-tune's
    for ck in (ft_ck, ctl_ck):
        assert state_dict_sha256(ck["model"]) != want
    assert state_dict_sha256(ft_ck["model"]) != state_dict_sha256(ctl_ck["model"])
    rows = [json.loads(x) for x in (tmp_path / "ctl" / "log.jsonl").read_text().splitlines()]
    assert all("recon_mse" not in r for r in rows) and any("val_loss_ema" in r for r in rows)
    # the control resumes like any run
    again = FineTuner(store, tmp_path / "ctl", base_ckpt, FinetuneConfig(k_steps=2, inversion_steps=2, control=True),
                      tcfg(steps=3, ckpt_every=3))
    again.resume(tmp_path / "ctl" / "last.pt")
    assert again.step == 3


def test_a_control_from_a_different_start_is_detected(tiny_store, base_ckpt, tmp_path):
    """A control run from other weights (a perturbed copy of the base), or with other steps, or a fine-tune
    passed as the control, is refused by check_same_start."""
    from flownp.jobs.finetune import check_same_start, state_dict_sha256

    store = Store.open(tiny_store)
    other = tmp_path / "other.pt"
    ck = torch.load(base_ckpt, weights_only=True)
    key = next(iter(ck["ema"]))
    ck["ema"][key] = ck["ema"][key] + 1e-6  # one weight, barely moved
    torch.save(ck, other)
    assert state_dict_sha256(ck["ema"]) != state_dict_sha256(load_checkpoint(base_ckpt)["ema"])
    ft = FinetuneConfig(k_steps=2, inversion_steps=2)
    ctl = FinetuneConfig(k_steps=2, inversion_steps=2, control=True)
    FineTuner(store, tmp_path / "ft", base_ckpt, ft, tcfg(steps=2, ckpt_every=2)).run(progress=False)
    FineTuner(store, tmp_path / "bad", other, ctl, tcfg(steps=2, ckpt_every=2)).run(progress=False)
    FineTuner(store, tmp_path / "long", base_ckpt, ctl, tcfg(steps=3, ckpt_every=3)).run(progress=False)
    FineTuner(store, tmp_path / "good", base_ckpt, ctl, tcfg(steps=2, ckpt_every=2)).run(progress=False)
    a, bad, long, good = (load_checkpoint(tmp_path / n / "last.pt") for n in ("ft", "bad", "long", "good"))
    check_same_start(a, good)
    with pytest.raises(ValueError, match="did not start from the fine-tune's weights"):
        check_same_start(a, bad)
    with pytest.raises(ValueError, match="other optimiser steps"):
        check_same_start(a, long)
    with pytest.raises(ValueError, match="needs a fine-tune and a control"):
        check_same_start(a, a)
    tampered = {**good, "start_sha256": "0" * 64}
    with pytest.raises(ValueError, match="start_sha256"):
        check_same_start(a, tampered)


def test_a_gav_control_builds_the_same_residual_and_trains_only_it(tiny_store, base_ckpt, tmp_path):
    """The control of a GAV fine-tune starts from the same base and the same fresh residual (equal
    start_sha256) and, like the fine-tune, leaves the frozen base untouched."""
    from flownp.jobs.finetune import check_same_start

    store = Store.open(tiny_store)
    gav = {"kind": "schur", "hidden": 8}
    for name, control in (("ft", False), ("ctl", True)):
        FineTuner(store, tmp_path / name, base_ckpt, FinetuneConfig(mode="gav", k_steps=2, inversion_steps=2,
                                                                     gav=gav, control=control),
                  tcfg(steps=2, ckpt_every=2)).run(progress=False)
    a, b = (load_checkpoint(tmp_path / n / "last.pt") for n in ("ft", "ctl"))
    assert a["start_sha256"] == b["start_sha256"] != a["start_base_sha256"]
    check_same_start(a, b)
    base = model_from_checkpoint(load_checkpoint(base_ckpt))
    for x, y in zip(base.parameters(), model_from_checkpoint(b, ema=False).base.parameters()):
        assert torch.equal(x, y)
