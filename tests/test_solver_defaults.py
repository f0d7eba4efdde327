"""A model's measured solver defaults: chosen from a solver study within stated tolerances, recorded in the
manifest, used by the Python API when a call names none, and true for the shipped default model."""

from __future__ import annotations

import numpy as np
import torch

from flownp.core.likelihood import log_likelihood
from flownp.core.sampling import sample
from flownp.core.solvers import SolverConfig
from flownp.default_model import LL_TOLERANCE, SAMPLE_TOLERANCE, choose_solvers, read_manifest
from flownp.inference import default_model, parse_solver


def _study(ll_err: dict[str, float], smp_err: dict[str, float]) -> dict:
    regime = {"ll_max_abs_error": ll_err,
              "ll_seconds_per_task": {s: float(i + 1) for i, s in enumerate(ll_err)},
              "sample_rmse": {k: {v: e for v in SAMPLE_TOLERANCE} for k, e in smp_err.items()}}
    return {"splits": 2, "reference": "dopri5:1e-7", "regimes": {"dense": regime, "sparse": regime}}


def test_choose_solvers_takes_the_cheapest_within_tolerance() -> None:
    st = _study({"euler:1": 0.5, "euler:2": 0.003, "midpoint:8": 0.0},
                {"euler:1": 0.2, "euler:2": 5e-4, "euler:8": 1e-5})
    ch = choose_solvers(st)
    assert ch["sample"] == "euler:2"            # euler:1 misses the sample tolerance
    assert ch["log_likelihood"] == "euler:2"    # cheaper than midpoint:8, within 0.01 nats
    assert ch["measured"]["ll_max_abs_error"] == {"dense": 0.003, "sparse": 0.003}


def test_choose_solvers_leaves_a_part_to_the_global_default_when_nothing_meets_it() -> None:
    ch = choose_solvers(_study({"euler:1": 0.5}, {"euler:1": 0.2}))
    assert ch["sample"] is None and ch["log_likelihood"] is None
    assert ch["measured"]["sample_rmse_all"]["dense"]["euler:1"]["sp"] == 0.2  # how far it was stays on record
    assert "sample_rmse_all" not in choose_solvers(_study({"euler:1": 0.0}, {"euler:1": 0.0}))["measured"]
    assert choose_solvers({"regimes": {}}) is None


def test_loaded_model_uses_its_recorded_solver_else_the_fallback() -> None:
    lm = default_model()
    man = read_manifest()
    fallback = SolverConfig("midpoint", 7)
    assert lm.solver("log_likelihood", fallback) == parse_solver(man["solvers"]["log_likelihood"])
    for bad in ({"log_likelihood": "dopri5:1e-5"}, {"log_likelihood": "midpoint:500"}, {"log_likelihood": "nope:2"},
                None):
        lm.info["solvers"] = bad  # adaptive (cost unknown), beyond max_steps, unknown, absent
        assert lm.solver("log_likelihood", fallback, max_steps=256) == fallback


def _fresh_task(lm):
    g = torch.Generator().manual_seed(3)
    n_ctx, n_tgt = 80, 24
    x = torch.rand(1, n_ctx + n_tgt, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[..., :1]) + torch.cos(2 * x[..., 1:]) + 0.05 * torch.randn(1, n_ctx + n_tgt, 4, generator=g)
    xc, yc, xt, yt = x[:, :n_ctx], y[:, :n_ctx], x[:, n_ctx:], y[:, n_ctx:]
    return xc, yc, xt, yt, lm.model.task_transform(xc, yc, xt), g


def _ll_error(model, xc, yc, xt, yt, tr, solver) -> float:
    ll = lambda s: float(log_likelihood(model, xc, yc, xt, yt, solver=s, estimator="exact",  # noqa: E731
                                        transform=tr).per_point[0])
    return abs(ll(solver) - ll(SolverConfig("dopri5", rtol=1e-7, atol=1e-7)))


def test_the_check_catches_a_flow_that_is_not_constant() -> None:
    """Negative control for the test below: re-draw the default model's velocity head (every layer, so no
    dead unit can keep the field constant, docs/results.md §5.5), and Euler 1 no longer agrees with dopri5
    within the tolerance (so a recorded Euler 1 could not pass that test on a flow that is not straight)."""
    lm = default_model()  # a fresh copy: nothing to restore
    xc, yc, xt, yt, tr, g = _fresh_task(lm)
    with torch.no_grad():
        for layer in (m for m in lm.model.head.modules() if isinstance(m, torch.nn.Linear)):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.weight.shape[1] ** 0.5)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
    assert _ll_error(lm.model, xc, yc, xt, yt, tr, SolverConfig("euler", 1)) > LL_TOLERANCE


def test_the_shipped_defaults_hold_on_a_fresh_task() -> None:
    """The default model's recorded solvers agree with dopri5 on a task the study never saw: the
    likelihood within the manifest's tolerance, and the samples within its per-variable tolerance."""
    lm = default_model()
    man = read_manifest()["solvers"]
    assert man["tolerances"]["log_likelihood_nats_per_point"] == LL_TOLERANCE
    xc, yc, xt, yt, tr, g = _fresh_task(lm)
    n_tgt = xt.shape[1]
    assert _ll_error(lm.model, xc, yc, xt, yt, tr, parse_solver(man["log_likelihood"])) <= LL_TOLERANCE
    tol = man["tolerances"]["sample_rmse_model_units"]
    per_regime = tol if "dense" in tol else {"dense": tol, "sparse": tol}  # relative (per regime) or absolute
    if man["sample"] is None:  # no sampler met its tolerance on the real map: all of them on record
        rows = man["measured"]["sample_rmse_all"]
        assert all(any(r[k][v] > per_regime[g][v] for g, r in rows.items() for v in SAMPLE_TOLERANCE)
                   for k in rows["dense"]), rows
        return
    y0 = torch.randn(1, 4, n_tgt, 4, generator=g)
    a = sample(lm.model, xc, yc, xt, n_samples=4, solver=parse_solver(man["sample"]), y0=y0, transform=tr).samples
    b = sample(lm.model, xc, yc, xt, n_samples=4, solver=SolverConfig("dopri5", rtol=1e-6, atol=1e-6), y0=y0,
               transform=tr).samples
    std = np.asarray(lm.normalizer.std)  # normalised -> model units per variable
    rmse = ((a - b).pow(2).mean((0, 1, 2)).sqrt().numpy() * std)
    # the tolerance of the regime of this context size (80 points: sparse, 50-300), the tightest outside both
    real = read_manifest()["real_map"]
    inside = [g for g in per_regime if g in real and real[g]["n_ctx"][0] <= xc.shape[1] <= real[g]["n_ctx"][1]]
    tol = (per_regime[inside[0]] if inside else
           {v: min(r[v] for r in per_regime.values()) for v in SAMPLE_TOLERANCE})
    for v, r in zip(SAMPLE_TOLERANCE, rmse):
        assert r <= tol[v], (v, r, tol[v])


def test_a_study_without_samples_never_picks_a_sampler() -> None:
    st = _study({"euler:1": 0.0}, {})
    assert choose_solvers(st)["sample"] is None and choose_solvers(st)["log_likelihood"] == "euler:1"


def test_choose_solvers_cli_prints_the_choice_and_falls_back_per_part(tmp_path, capsys) -> None:
    import json

    from flownp.default_model import main

    path = tmp_path / "study.json"
    path.write_text(json.dumps(_study({"euler:1": 0.5, "euler:2": 0.003}, {"euler:1": 0.2})))
    main(["choose-solvers", str(path), "--fallback", "euler:8,midpoint:2"])
    assert capsys.readouterr().out.split() == ["euler:8", "euler:2"]  # no sampler meets it: the fallback


def test_sample_tolerance_relative_to_the_models_own_rmse_and_the_more_accurate_at_equal_cost() -> None:
    """Relative to the model's RMSE (ERA5 units, converted to model units: sp Pa -> kPa), a sampler the
    absolute 1 Pa rule refuses qualifies; of two at the same evaluations the more accurate is taken."""
    from flownp.default_model import SAMPLE_RELATIVE_TOLERANCE, model_rmse, sample_tolerances

    st = _study({"midpoint:8": 0.005}, {"euler:8": 3e-3, "midpoint:4": 2e-3, "euler:16": 5e-4})
    assert choose_solvers(st)["sample"] == "euler:16"  # absolute: sp within 1 Pa needs 16 evaluations
    real = {"note": "one map", "dense": {"rmse": {"sp": 100.0, "t2m": 0.1, "u10": 0.1, "v10": 0.1}},
            "sparse": {"rmse": {"sp": 300.0, "t2m": 0.3, "u10": 0.3, "v10": 0.3}}}
    rmse = model_rmse(real)
    tol = sample_tolerances(["dense", "sparse"], rmse)
    assert tol["dense"]["sp"] == SAMPLE_RELATIVE_TOLERANCE * 100.0 * 1e-3  # Pa -> kPa
    ch = choose_solvers(st, model_rmse=rmse)  # dense t2m: 0.005 K allowed, euler:8 and midpoint:4 within
    assert ch["sample"] == "midpoint:4" and ch["tolerances"]["sample_rule"].startswith("0.05 x")
    tight = {k: {"rmse": {v: x / 10 for v, x in r["rmse"].items()}} for k, r in real.items() if k != "note"}
    assert choose_solvers(st, model_rmse=model_rmse(tight))["sample"] == "euler:16"
    # at equal evaluations the likelihood solver wins over a more accurate sampler: one solve serves both
    st2 = _study({"midpoint:4": 0.005}, {"euler:8": 1e-3, "midpoint:4": 2e-3})
    assert choose_solvers(st2, model_rmse=rmse)["sample"] == "midpoint:4"
    for r in st2["regimes"].values():
        r["one_solve_ll_max_abs_error"] = {"midpoint:4": {"one_solve": 0.01}}
    assert choose_solvers(st2, model_rmse=rmse)["measured"]["samples_ll_max_abs_error"] == {
        "dense": {"one_solve": 0.01}, "sparse": {"one_solve": 0.01}}


def test_record_solvers_rewrites_only_the_manifests_solvers(tmp_path) -> None:
    import json
    import shutil

    from flownp.default_model import default_paths, main

    shutil.copy(default_paths()[1], tmp_path / "default.json")
    before = json.loads((tmp_path / "default.json").read_text())
    st = _study({"midpoint:4": 0.005}, {"midpoint:4": 1e-5})
    (tmp_path / "study.json").write_text(json.dumps(st))
    main(["record-solvers", str(tmp_path / "study.json"), "--models", str(tmp_path)])
    after = json.loads((tmp_path / "default.json").read_text())
    assert after["solvers"]["sample"] == "midpoint:4" and after["solvers"]["log_likelihood"] == "midpoint:4"
    assert {k: v for k, v in after.items() if k != "solvers"} == {k: v for k, v in before.items() if k != "solvers"}
