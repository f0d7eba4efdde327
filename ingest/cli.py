"""`flownp-ingest` command line: download, synthesize, build, inspect, eval-set, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ingest.build import BuildSettings, StoreError, build_store
from ingest.layout import LayoutError
from ingest.parsing import parse_range
from ingest.store import Store

app = typer.Typer(help="ERA5 ingest for flownp-weather.", no_args_is_help=True, add_completion=False)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def build(
    raw: Annotated[list[Path], typer.Argument(help="Raw ERA5 netCDF/GRIB files.")],
    out: Annotated[Path, typer.Option("--out", help="Store directory (created or extended).")],
    stats: Annotated[Optional[str], typer.Option(
        help="'train' (train-year statistics, the default for a new store) or 'reference'.")] = None,
    block: Annotated[int, typer.Option(help="Maps read per block (memory bound).")] = 2048,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Build (or extend) a store from raw ERA5 files; files already in it are skipped."""
    try:
        settings = BuildSettings(stats=stats, block=block) if stats else None
        m = build_store(raw, out, settings=settings, progress=not quiet)
    except (LayoutError, StoreError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {len(m['sources'])} source file(s), maps per split {m['maps_per_split']}")


@app.command()
def inspect(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the store's manifest facts (points, variables, maps per split, statistics)."""
    try:
        facts = Store.open(store).inspect()
    except StoreError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"store {store}", show_header=False)
    for k in ("region", "n_points", "variables", "units", "maps_per_split", "years_per_split",
              "time_range", "n_sources"):
        t.add_row(k, str(facts[k]))
    norm = facts["statistics"].get("normalizer")
    if norm:
        t.add_row("normaliser", f"{norm['source']}: mean {[round(x, 4) for x in norm['mean']]}, "
                                f"std {[round(x, 4) for x in norm['std']]}")
    Console().print(t)


@app.command("eval-set")
def eval_set(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for tasks.npz + manifest.json.")],
    split: Annotated[str, typer.Option(help="train, valid or test.")] = "test",
    n_tasks: Annotated[Optional[int], typer.Option(help="Seeded subset size; default every map.")] = None,
    n_ctx: Annotated[str, typer.Option(help="n_ctx or MIN-MAX (inclusive).")] = "950-1000",
    n_tgt: Annotated[Optional[int], typer.Option(help="Targets per task; default all the rest.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Freeze an evaluation set (maps, n_ctx, permutations) with a manifest naming what it is."""
    from ingest.tasks import make_eval_set, save_eval_set

    try:
        s = Store.open(store)
        lo, hi = parse_range(n_ctx)
        times, _ = s.load(split, normalized=False)
        es = make_eval_set(times, s.region.n_points, split=split, n_tasks=n_tasks, n_ctx_min=lo,
                           n_ctx_max=hi, n_tgt=n_tgt, seed=seed,
                           extra={"store_manifest_sha256": s.manifest_sha256})
        save_eval_set(es, out)
    except (StoreError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"{out}: {len(es)} tasks from split {split}, n_ctx {n_ctx}, seed {seed}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working directory.")] = Path("demo"),
    days: Annotated[str, typer.Option(help="Days of each winter month to synthesize.")] = "1-3",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Synthesize a small GP-weather season (train 1986, valid 1988, test 1989), build it, inspect it,
    freeze a test evaluation set and print the oracle tar_ll on it."""
    import numpy as np

    from ingest.synthetic import GPWeather, synthesize
    from ingest.tasks import make_eval_set, save_eval_set

    lo, hi = parse_range(days)
    raw = synthesize(out / "raw", [1986, 1988, 1989], days=range(lo, hi + 1), seed=seed)
    build_store(raw, out / "store", progress=True)
    inspect(out / "store", as_json=False)
    s = Store.open(out / "store")
    times, values = s.load("test", normalized=False)
    es = make_eval_set(times, s.region.n_points, split="test", n_tasks=min(8, len(times)),
                       n_ctx_min=950, n_ctx_max=1000, seed=seed,
                       extra={"store_manifest_sha256": s.manifest_sha256})
    save_eval_set(es, out / "eval-test")
    gp = GPWeather.from_manifest(out / "raw")
    idx = es.map_index(times)
    ll = [gp.oracle_log_likelihood(es.perm[i, :n].astype(int), values[idx[i], es.perm[i, :n]],
                                   es.perm[i, n:].astype(int), values[idx[i], es.perm[i, n:]],
                                   s.normalizer).tar_ll
          for i, n in enumerate(es.n_ctx)]
    typer.echo(f"oracle tar_ll on {len(es)} test tasks (n_ctx 950-1000, normalised units, store "
               f"normaliser): {np.mean(ll):.3f} nats per target point")


def _register() -> None:
    """Commands whose code lives beside what it drives."""
    from ingest.cds import download_cli
    from ingest.synthetic import synthesize_cli

    app.command("download", help="Download ERA5 from the Copernicus Climate Data Store (cdsapi).")(download_cli)
    app.command("synthesize", help="Write synthetic GP weather as ERA5-layout netCDF files.")(synthesize_cli)


_register()


if __name__ == "__main__":
    app()
