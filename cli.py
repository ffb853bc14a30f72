"""The `edge-adapt` command line: parse options, call the library, print. Nothing else lives here."""

from __future__ import annotations

import typer

app = typer.Typer(help="Adaptive inference-time compute for small local models.", no_args_is_help=True)


def main() -> None:
    app()
