"""`flownp` command line (pretrain, finetune, evaluate arrive with the FlowNP issues)."""

import typer

app = typer.Typer(help="FlowNP model jobs.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the package version."""
    from flownp import __version__

    typer.echo(__version__)
