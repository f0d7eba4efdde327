"""`flownp` command line: pretrain, train-baseline, finetune, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

app = typer.Typer(help="FlowNP model jobs.", no_args_is_help=True, add_completion=False)


# options shared by the training jobs
Data = Annotated[Path, typer.Option("--data", help="Store directory (flownp-ingest build).")]
RunDir = Annotated[Path, typer.Option("--out", help="Run directory: log.jsonl, last.pt, best.pt.")]
Steps = Annotated[int, typer.Option(help="Optimizer steps.")]
BatchSize = Annotated[int, typer.Option(help="Tasks per step.")]
PeakLr = Annotated[float, typer.Option(help="Peak learning rate.")]
Warmup = Annotated[int, typer.Option(help="Warm-up steps.")]
NCtx = Annotated[str, typer.Option(help="Context size range MIN-MAX.")]
NTgt = Annotated[Optional[int], typer.Option(help="Targets per task (default: all the rest).")]
Seed = Annotated[int, typer.Option(help="Seed.")]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bf16 autocast (CUDA; slow on CPU).")]
CkptEvery = Annotated[int, typer.Option(help="Checkpoint (and validate) every N steps.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
MaxMinutes = Annotated[Optional[float], typer.Option(
    help="Stop after this much wall time, writing last.pt (continue with --resume).")]


def _range(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def _job(run: Callable[[], dict[str, Any]], out: Path) -> None:
    """Run a training job; a ValueError or missing file is a usage error (exit 2), not a traceback."""
    try:
        last = run()
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    typer.echo(json.dumps({"out": str(out), **last}))


@app.command()
def version() -> None:
    """Print the package version."""
    from flownp import __version__

    typer.echo(__version__)


@app.command()
def pretrain(
    data: Data,
    out: RunDir,
    steps: Steps = 1000,
    batch_size: BatchSize = 16,
    lr: PeakLr = 5e-4,
    warmup: Warmup = 100,
    n_ctx: NCtx = "2-1199",
    n_tgt: NTgt = None,
    arch: Annotated[str, typer.Option(help="cached or reference.")] = "cached",
    targets: Annotated[str, typer.Option(help="joint or independent.")] = "joint",
    encoding: Annotated[str, typer.Option(help="lowfreq or reference.")] = "lowfreq",
    d_model: Annotated[int, typer.Option(help="Transformer width.")] = 64,
    n_layers: Annotated[int, typer.Option(help="Transformer layers.")] = 6,
    seed: Seed = 0,
    device: Device = "cpu",
    bf16: Bf16 = False,
    ckpt_every: CkptEvery = 200,
    resume: Resume = False,
    max_minutes: MaxMinutes = None,
    quiet: Quiet = False,
) -> None:
    """Pretrain FlowNP by conditional flow matching on a store's train split."""
    from flownp.core.config import ModelConfig
    from flownp.jobs.train import TrainConfig, pretrain as run

    lo, hi = _range(n_ctx)

    def job() -> dict[str, Any]:
        mcfg = ModelConfig(arch=arch, targets=targets, encoding=encoding, d_model=d_model, n_layers=n_layers,
                           d_ff=2 * d_model, embed_hidden=d_model)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, n_ctx_min=lo,
                           n_ctx_max=hi, n_tgt=n_tgt, seed=seed, device=device, bf16=bf16,
                           ckpt_every=ckpt_every)
        return run(data, out, mcfg, tcfg, resume=resume, progress=not quiet, max_minutes=max_minutes)

    _job(job, out)


@app.command("train-baseline")
def train_baseline(
    kind: Annotated[str, typer.Option("--kind", help="cnp or tnpa.")],
    data: Data,
    out: RunDir,
    steps: Steps = 1000,
    batch_size: BatchSize = 16,
    lr: PeakLr = 5e-4,
    warmup: Warmup = 100,
    n_ctx: NCtx = "2-1199",
    n_tgt: NTgt = None,
    d_model: Annotated[int, typer.Option(help="Width.")] = 64,
    n_layers: Annotated[int, typer.Option(help="CNP: MLP depth; TNP-A: transformer layers.")] = 4,
    seed: Seed = 0,
    device: Device = "cpu",
    ckpt_every: CkptEvery = 200,
    resume: Resume = False,
    max_minutes: MaxMinutes = None,
    quiet: Quiet = False,
) -> None:
    """Train a CNP or TNP-A baseline by maximum likelihood on the same tasks as FlowNP."""
    from flownp.jobs.baselines.neural import NeuralBaselineConfig
    from flownp.jobs.train import TrainConfig, pretrain as run

    lo, hi = _range(n_ctx)

    def job() -> dict[str, Any]:
        mcfg = NeuralBaselineConfig(kind=kind, d_model=d_model, n_layers=n_layers, d_ff=2 * d_model)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, n_ctx_min=lo,
                           n_ctx_max=hi, n_tgt=n_tgt, seed=seed, device=device, ckpt_every=ckpt_every)
        return run(data, out, mcfg, tcfg, resume=resume, progress=not quiet, max_minutes=max_minutes)

    _job(job, out)


@app.command()
def finetune(
    base: Annotated[Path, typer.Option("--from", help="Pretrained checkpoint (RUN/best.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Store directory (the base's normalisation).")],
    out: RunDir,
    mode: Annotated[str, typer.Option(help="mle (tune the whole model) or gav (add a GAV residual).")] = "mle",
    coupling: Annotated[str, typer.Option(help="inversion (frozen base, reverse ODE) or random.")] = "inversion",
    k_steps: Annotated[int, typer.Option(help="Euler steps of the differentiated decoder (K).")] = 16,
    inversion_steps: Annotated[int, typer.Option(help="Midpoint steps of the inversion.")] = 32,
    sigma: Annotated[float, typer.Option(help="Observation std (normalised units); initial if learned.")] = 0.1,
    learn_sigma: Annotated[bool, typer.Option("--learn-sigma", help="Learn a per-variable sigma.")] = False,
    cfm_weight: Annotated[float, typer.Option(help="Weight of a flow-matching regulariser.")] = 0.0,
    grad: Annotated[str, typer.Option(help="backprop, checkpoint (less memory) or adjoint (least).")] = "backprop",
    gav_kind: Annotated[str, typer.Option(help="gav: schur (Hurwitz), contracting, or mlp (ablation).")] = "schur",
    train_base: Annotated[bool, typer.Option("--train-base", help="gav: also tune the base model.")] = False,
    gav_cayley_rank: Annotated[Optional[int], typer.Option(
        help="gav: low-rank skew factor (rank <= 2r) through Sherman-Morrison-Woodbury; default dense.")] = None,
    steps: Steps = 500,
    batch_size: BatchSize = 8,
    lr: Annotated[float, typer.Option(help="Learning rate after warm-up (constant).")] = 1e-5,
    warmup: Warmup = 50,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the weights.")] = 0.99,
    n_ctx: NCtx = "2-1199",
    n_tgt: NTgt = None,
    seed: Seed = 0,
    device: Device = "cpu",
    bf16: Bf16 = False,
    ckpt_every: CkptEvery = 100,
    resume: Resume = False,
    max_minutes: MaxMinutes = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune a pretrained FlowNP by maximum likelihood of K-step reconstructions (optionally GAV)."""
    from flownp.jobs.finetune import FinetuneConfig, finetune as run
    from flownp.jobs.train import TrainConfig

    lo, hi = _range(n_ctx)

    def job() -> dict[str, Any]:
        ft = FinetuneConfig(mode=mode, coupling=coupling, k_steps=k_steps, inversion_steps=inversion_steps,
                            sigma=sigma, learn_sigma=learn_sigma, cfm_weight=cfm_weight, grad=grad,
                            train_base=train_base, gav={"kind": gav_kind, "cayley_rank": gav_cayley_rank} if mode == "gav" else None)
        tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, schedule="constant",
                           ema_decay=ema_decay, n_ctx_min=lo, n_ctx_max=hi, n_tgt=n_tgt, seed=seed,
                           device=device, bf16=bf16, ckpt_every=ckpt_every)
        return run(base, data, out, ft, tcfg, resume=resume, progress=not quiet, max_minutes=max_minutes)

    _job(job, out)


@app.command()
def retrain(
    config: Annotated[Path, typer.Option("--config", help="Job file (YAML): see flownp.jobs.retrain.RetrainJob.")],
    quiet: Quiet = False,
) -> None:
    """Ingest -> pretrain/continue -> fine-tune -> evaluate -> promote if better. Rerun to continue."""
    from flownp.jobs.retrain import RetrainJob, run_job

    def job() -> dict[str, Any]:
        return run_job(RetrainJob.from_yaml(config), progress=not quiet)

    _job(job, config)


registry_app = typer.Typer(help="The model registry: list, promote, delete versions.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
RegistryRoot = Annotated[Path, typer.Option("--root", help="Registry directory.")]


@registry_app.command("list")
def registry_list(root: RegistryRoot) -> None:
    """Print every version's manifest (JSON lines), the current one marked."""
    from flownp.registry import Registry

    for m in Registry(root).list():
        typer.echo(json.dumps(m))


@registry_app.command("promote")
def registry_promote(root: RegistryRoot, version: Annotated[str, typer.Argument(help="e.g. v0003")]) -> None:
    """Make VERSION the served model (e.g. to roll back)."""
    from flownp.registry import Registry

    _job(lambda: (Registry(root).promote(version), {"current": version})[1], root)


@registry_app.command("delete")
def registry_delete(root: RegistryRoot, version: Annotated[str, typer.Argument(help="e.g. v0001")]) -> None:
    """Delete a version that is not current."""
    from flownp.registry import Registry

    _job(lambda: (Registry(root).delete(version), {"deleted": version})[1], root)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint (.pt).")],
    data: Annotated[Path, typer.Option("--data", help="Store directory.")],
    split: Annotated[str, typer.Option(help="valid or test.")] = "test",
    eval_set: Annotated[Optional[Path], typer.Option(help="Frozen set (flownp-ingest eval-set).")] = None,
    n_tasks: Annotated[int, typer.Option(help="Seeded subset size when no --eval-set.")] = 32,
    n_ctx: Annotated[str, typer.Option(help="Context size range when no --eval-set.")] = "950-1000",
    seed: Annotated[int, typer.Option(help="Seed (task draw, probes, samples).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Tasks per batch.")] = 8,
    samples: Annotated[int, typer.Option(help="Samples per task for RMSE/CRPS/coverage (0: none).")] = 16,
    ll_solver: Annotated[str, typer.Option(help="Likelihood solver, e.g. midpoint:100, rk4:32, dopri5:1e-5.")] = "midpoint:100",
    sample_solver: Annotated[str, typer.Option(help="Sampling solver, e.g. euler:16.")] = "euler:16",
    probes: Annotated[int, typer.Option(help="Hutchinson probes.")] = 1,
    baseline: Annotated[Optional[list[str]], typer.Option(
        help="Also evaluate: idw, gp, cnp:CKPT, tnpa:CKPT (repeatable).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of one task (truth, mean, std, sample).")] = None,
    plot_task: Annotated[int, typer.Option(
        help="Which task --plot draws: its index in the evaluation set (0 to n_tasks - 1).")] = 0,
    context_noise: Annotated[Optional[list[str]], typer.Option(
        help="Also evaluate on corrupted contexts: gaussian:STD or salt-pepper:PROB (normalised units; "
             "repeatable); reports the tar_ll drop and RMSE ratio.")] = None,
    steps_sweep: Annotated[Optional[str], typer.Option(
        help="Euler step counts, e.g. 1,2,4,8,16,32: sample RMSE against a dopri5 solve of the same noise.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda (the FlowNP model; baselines run on CPU).")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Evaluate a checkpoint on a frozen evaluation set (and the oracle on synthetic data)."""
    from flownp.jobs.evaluate import evaluate_checkpoint

    try:
        res = evaluate_checkpoint(str(checkpoint), str(data), split=split,
                                  eval_set=str(eval_set) if eval_set else None, n_tasks=n_tasks,
                                  n_ctx=_range(n_ctx), seed=seed, batch_size=batch_size, n_samples=samples,
                                  ll_solver=ll_solver, sample_solver=sample_solver, n_probes=probes,
                                  baselines=tuple(baseline or ()), plot=str(plot) if plot else None,
                                  plot_index=plot_task,
                                  progress=not quiet, device=device,
                                  context_noise=tuple(context_noise or ()),
                                  sweep=tuple(int(k) for k in steps_sweep.split(",")) if steps_sweep else ())
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    from flownp.jobs.evaluate import baseline_key

    for key in ("flownp", "flownp_exact", "oracle", *map(baseline_key, baseline or ())):
        if key in res:
            r = res[key]
            typer.echo(f"{r['predictor']['name']:>22}: tar_ll {r['tar_ll']:8.3f} nats/point "
                       f"({r['predictor']['ll_kind']}), rmse {r.get('rmse', {})}")
    for spec, r in res.get("robustness", {}).items():
        typer.echo(f"{'context ' + spec:>22}: tar_ll {r['tar_ll']:8.3f} (drop {r['tar_ll_drop']:.3f}), "
                   f"rmse ratio {r.get('rmse_ratio', {})}")
    for k, r in res.get("steps_sweep", {}).get("rmse_to_reference", {}).items():
        typer.echo(f"{'euler ' + k + ' vs dopri5':>22}: rmse {r}")


if __name__ == "__main__":
    app()
