"""`flownp` command line: version, pretrain, train-baseline, finetune, train-lfm, distill, retrain, evaluate, and
registry list/promote/delete. The training jobs' options are built from their config dataclasses
(`flownp.jobs.options`): one definition per option, the same as the retrain YAML's."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from flownp.jobs import options
from ingest.parsing import parse_range

app = typer.Typer(help="FlowNP model jobs.", no_args_is_help=True, add_completion=False)


Data = Annotated[Path, typer.Option("--data", help="Store directory (flownp-ingest build).")]
RunDir = Annotated[Path, typer.Option("--out", help="Run directory: log.jsonl, last.pt, best.pt.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
MaxMinutes = Annotated[Optional[float], typer.Option(
    help="Stop after this much wall time, writing last.pt (continue with --resume).")]


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _run_options() -> list[inspect.Parameter]:
    return [_param("resume", Resume, False), _param("max_minutes", MaxMinutes, None), _param("quiet", Quiet, False)]


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


# the training jobs: their options are the fields of their config dataclasses (flownp.jobs.options)
def _pretrain(v: dict[str, Any]) -> None:
    from flownp.jobs.train import pretrain as run

    _job(lambda: run(v["data"], v["out"], options.MODEL.build(v), options.TRAIN.build(v), resume=v["resume"],
                     progress=not v["quiet"], max_minutes=v["max_minutes"]), v["out"])


def _train_baseline(v: dict[str, Any]) -> None:
    from flownp.jobs.train import pretrain as run

    _job(lambda: run(v["data"], v["out"], options.BASELINE.build(v), options.TRAIN.build(v), resume=v["resume"],
                     progress=not v["quiet"], max_minutes=v["max_minutes"]), v["out"])


def _finetune(v: dict[str, Any]) -> None:
    from flownp.jobs.finetune import finetune as run

    _job(lambda: run(v["base"], v["data"], v["out"], options.finetune_config(v), options.FINETUNE_TRAIN.build(v),
                     resume=v["resume"], progress=not v["quiet"], max_minutes=v["max_minutes"]), v["out"])


options.command(app, "pretrain", "Pretrain FlowNP by conditional flow matching on a store's train split.",
                [_param("data", Data), _param("out", RunDir), *_run_options()],
                (options.MODEL, options.TRAIN), _pretrain)
options.command(app, "train-baseline", "Train a CNP or TNP-A baseline by maximum likelihood on the same tasks as FlowNP.",
                [_param("data", Data), _param("out", RunDir), *_run_options()],
                (options.BASELINE, options.TRAIN), _train_baseline)
options.command(app, "finetune", "Fine-tune a pretrained FlowNP by maximum likelihood of K-step reconstructions "
                "(optionally GAV).",
                [_param("base", Annotated[Path, typer.Option("--from", help="Pretrained checkpoint (RUN/best.pt).")]),
                 _param("data", Annotated[Path, typer.Option("--data", help="Store directory (the base's normalisation).")]),
                 _param("out", RunDir), *_run_options()],
                (options.FINETUNE, options.GAV, options.FINETUNE_TRAIN), _finetune)


def _train_lfm(v: dict[str, Any]) -> None:
    from flownp.jobs.lfm import train_lfm as run

    _job(lambda: run(v["data"], v["out"], options.MODEL.build(v), options.LFM.build(v), options.TRAIN.build(v),
                     resume=v["resume"], progress=not v["quiet"], max_minutes=v["max_minutes"]), v["out"])


def _distill(v: dict[str, Any]) -> None:
    from flownp.jobs.lfm import distill as run

    _job(lambda: run(v["teacher"], v["data"], v["out"], options.DISTILL.build(v), options.TRAIN.build(v),
                     resume=v["resume"], progress=not v["quiet"], max_minutes=v["max_minutes"]), v["out"])


options.command(app, "train-lfm", "Train a Local Flow Matching model: N sub-flows in sequence (--steps per block), "
                "each on the push-forward of the targets through the trained ones.",
                [_param("data", Data), _param("out", RunDir), *_run_options()],
                (options.MODEL, options.LFM, options.TRAIN), _train_lfm)
options.command(app, "distill", "Distil a FlowNP or LFM checkpoint into N/k one-step maps (no exact density: "
                "likelihoods come from the stored teacher).",
                [_param("teacher", Annotated[Path, typer.Option("--from", help="Teacher checkpoint (FlowNP or LFM).")]),
                 _param("data", Data), _param("out", RunDir), *_run_options()],
                (options.DISTILL, options.TRAIN), _distill)


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
    ll_solver_also: Annotated[Optional[list[str]], typer.Option(
        help="Also the likelihood with this solver, e.g. euler:16 (repeatable): reported per solver in "
             "tar_ll_by_solver, never mixed with --ll-solver's tar_ll.")] = None,
    gauss_samples: Annotated[int, typer.Option(
        help="Samples per task for the Gaussian-fit score gauss_ll (a per-point Gaussian fitted to them; "
             "TNP-pytorch convention; 0: off).")] = 0,
    probes: Annotated[int, typer.Option(help="Hutchinson probes.")] = 1,
    exact: Annotated[bool, typer.Option("--exact/--no-exact",
        help="Also the exact-trace likelihood (independent-target models; costs y_dim VJPs per step).")] = True,
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
                                  n_ctx=parse_range(n_ctx), seed=seed, batch_size=batch_size, n_samples=samples,
                                  ll_solver=ll_solver, sample_solver=sample_solver, n_probes=probes,
                                  exact=exact, baselines=tuple(baseline or ()), plot=str(plot) if plot else None,
                                  plot_index=plot_task,
                                  progress=not quiet, device=device,
                                  context_noise=tuple(context_noise or ()),
                                  sweep=tuple(int(k) for k in steps_sweep.split(",")) if steps_sweep else (),
                                  also_ll_solvers=tuple(ll_solver_also or ()), gauss_samples=gauss_samples)
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
    for spec, r in res.get("tar_ll_by_solver", {}).items():
        typer.echo(f"{'tar_ll @ ' + spec:>22}: {r['tar_ll']:8.3f} nats/point ({r['ll_solver']})")
    for key in ("flownp", "oracle"):
        if "gauss_ll" in res.get(key, {}):
            r = res[key]
            typer.echo(f"{r['predictor']['name'] + ' gauss_ll':>22}: {r['gauss_ll']:8.3f} nats/point (Gaussian "
                       f"fitted to {r['gauss_ll_samples']} samples per point; marginal)")
    for spec, r in res.get("robustness", {}).items():
        typer.echo(f"{'context ' + spec:>22}: tar_ll {r['tar_ll']:8.3f} (drop {r['tar_ll_drop']:.3f}), "
                   f"rmse ratio {r.get('rmse_ratio', {})}")
    for k, r in res.get("steps_sweep", {}).get("rmse_to_reference", {}).items():
        typer.echo(f"{'euler ' + k + ' vs dopri5':>22}: rmse {r}")


if __name__ == "__main__":
    app()
