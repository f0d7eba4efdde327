"""Cost of the exact divergence on one request (the real map's first dense split, 8 samples of about 245
targets, the default model): forward tangents (`FlowNP.velocity_jacobian`, flownp.core.tangents) against
the y_dim reverse-mode VJPs they replace, per evaluation and over a whole likelihood solve, both measured
in this run, with the largest difference between the two (they compute the same number).

    python bench/divergence_cost.py [--checkpoint PATH | default] [--samples 8] [--solver midpoint:4]
        [--threads 2] [--repeats 5]

Also prints the plain velocity's cost (the floor: one evaluation without any derivative) and the share of
a midpoint solve's evaluations that need the divergence (its first stages do not: flownp.core.solvers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, timeit  # noqa: E402
from request_latency import real_request  # noqa: E402

from flownp.checkpoint import load_checkpoint  # noqa: E402
from flownp.core.likelihood import _divergence, flow_field, log_likelihood_fn  # noqa: E402
from flownp.inference import build_model, default_model, parse_solver  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--solver", default="midpoint:4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lm = default_model() if a.checkpoint == "default" else build_model("bench", load_checkpoint(a.checkpoint),
                                                                         None, a.checkpoint)
    m = lm.model
    if not getattr(m, "has_jacobian_blocks", False):
        raise SystemExit("forward tangents need a FlowNP with arch='pointwise', targets='independent', "
                         "head_neighbours=0")
    t = real_request(lm)
    tr = m.task_transform(t.xc, t.yc, t.xt)
    vf, _ = flow_field(m, t.xc, t.yc if tr is None else tr.context(t.yc), t.xt, samples=a.samples)
    y = torch.randn((a.samples, t.xt.shape[1], m.config.y_dim), generator=torch.Generator().manual_seed(0))
    tt = torch.tensor(0.5)

    def reverse():
        with torch.enable_grad():
            yi = y.detach().requires_grad_(True)
            return _divergence(vf(tt, yi), yi, "exact-blocks", None, False)[:, 0]

    def forward():
        with torch.no_grad():
            return vf.jacobian(tt, y)[1].diagonal(dim1=-2, dim2=-1).sum((-2, -1))

    with torch.no_grad():
        plain = median(timeit(lambda: vf(tt, y), a.repeats))
    t_rev, t_fwd = median(timeit(reverse, a.repeats)), median(timeit(forward, a.repeats))
    diff = float((reverse() - forward()).abs().max())
    solver = parse_solver(a.solver)
    ys = y  # a state to score: the likelihood solve's cost does not depend on its values
    solve_fwd = median(timeit(lambda: log_likelihood_fn(vf, ys, solver=solver, estimator="exact-blocks"), a.repeats))
    solve_rev = median(timeit(lambda: log_likelihood_fn(vf.fn, ys, solver=solver, estimator="exact-blocks"),
                              a.repeats))
    ll_diff = float((log_likelihood_fn(vf, ys, solver=solver, estimator="exact-blocks").joint
                     - log_likelihood_fn(vf.fn, ys, solver=solver, estimator="exact-blocks").joint).abs().max())
    n, d = t.xt.shape[1], m.config.y_dim
    print(f"request: {t.xc.shape[1]} context / {n} targets, {a.samples} samples, {a.threads} threads")
    print(f"one evaluation: velocity alone {plain * 1e3:.1f} ms; with the exact divergence: {d} reverse VJPs "
          f"{t_rev * 1e3:.1f} ms, forward tangents {t_fwd * 1e3:.1f} ms (ratio {t_rev / t_fwd:.2f}; "
          f"{t_fwd / plain:.1f} velocities); max |difference| {diff:.2e} nats/unit time")
    share = "half" if solver.method == "midpoint" else "all"
    print(f"likelihood solve ({solver.describe()}, {share} of its {solver.nfe()} evaluations with the divergence): "
          f"reverse {solve_rev:.3f} s, forward {solve_fwd:.3f} s (ratio {solve_rev / solve_fwd:.2f}); "
          f"max |joint difference| {ll_diff:.2e} nats over {n * d} values")


if __name__ == "__main__":
    main()
