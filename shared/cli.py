"""The `megaportrait` command: one sub-command group per role.

Each role's commands live beside the role's code and are attached here lazily, so `megaportrait --help` stays
fast and no role imports another's heavy dependencies.
"""
from __future__ import annotations

import typer

app = typer.Typer(help="MegaPortrait: private, personalised portraits.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """Roles: client (customer site), coordinator (Flower), render-node, audit; and the end-to-end demo."""


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as _v

    typer.echo(_v("megaportrait"))
