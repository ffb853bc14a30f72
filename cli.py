"""The `edge-adapt` command line: parse options, call the library, print. Nothing else lives here."""

from __future__ import annotations

import typer

app = typer.Typer(help="Adaptive inference-time compute for small local models.", no_args_is_help=True)


def main() -> None:
    app()


# ---- convert / convert-adapter / import: HF <-> GGUF (edge_adapt.convert) --------------------------------
# Kept together so the other commands can be added above or below without touching this block.
from collections.abc import Callable as _Callable, Iterator as _Iterator
from contextlib import contextmanager as _contextmanager
from pathlib import Path as _Path
from typing import Optional as _Optional

from edge_adapt.errors import EdgeAdaptError as _EdgeAdaptError


def _fail(exc: _EdgeAdaptError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


@_contextmanager
def _progress_bar(label: str) -> _Iterator[_Callable[[str, int, int], None]]:
    """A rich progress bar on stderr, fed by the library's (stage, done, total) calls."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


@app.command("convert")
def convert_cmd(
    hf_dir: _Path = typer.Argument(..., help="transformers checkpoint directory (config.json, safetensors, tokenizer)"),
    output: _Path = typer.Option(..., "-o", "--output", help="GGUF file to write"),
    type: str = typer.Option("f16", "--type", help="f32|f16|bf16|q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k"),
    merge_adapter: _Optional[_Path] = typer.Option(None, "--merge-adapter", help="PEFT LoRA directory to merge in"),
    self_eval_config: _Optional[_Path] = typer.Option(None, "--self-eval-config", help="JSON written as edge_adapt.self_eval.*"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a transformers checkpoint to a GGUF model."""
    from edge_adapt.convert import convert_model

    try:
        with _progress_bar("convert") as progress:
            r = convert_model(hf_dir, output, type=type, merge_adapter=merge_adapter,
                              self_eval_config=self_eval_config, force=force, progress=progress)
    except _EdgeAdaptError as exc:
        _fail(exc)
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.type}, {r.n_params / 1e6:.1f}M params, "
               f"{r.file_size / 2**20:.1f} MiB) in {r.seconds:.1f}s")


@app.command("convert-adapter")
def convert_adapter_cmd(
    peft_dir: _Path = typer.Argument(..., help="PEFT adapter directory (adapter_config.json, adapter_model.safetensors)"),
    base: _Path = typer.Option(..., "--base", help="the base model GGUF the adapter will be loaded on"),
    output: _Path = typer.Option(..., "-o", "--output", help="GGUF adapter file to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Convert a PEFT LoRA or activated LoRA to a GGUF adapter."""
    from edge_adapt.convert import convert_adapter

    try:
        with _progress_bar("convert-adapter") as progress:
            r = convert_adapter(peft_dir, base, output, force=force, progress=progress)
    except _EdgeAdaptError as exc:
        _fail(exc)
    kind = f"aLoRA, invocation tokens {r.invocation_tokens}" if r.invocation_tokens else "LoRA"
    typer.echo(f"wrote {r.path} ({kind}, {r.n_tensors} tensors, alpha {r.alpha:g}) in {r.seconds:.1f}s")


@app.command("import")
def import_cmd(
    model: _Optional[_Path] = typer.Argument(None, help="GGUF model; the embedded default model when omitted"),
    output: _Path = typer.Option(..., "-o", "--output", help="transformers checkpoint directory to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output"),
) -> None:
    """Dequantize a GGUF model back to a transformers checkpoint (for fine-tuning)."""
    from edge_adapt.convert import import_gguf

    try:
        with _progress_bar("import") as progress:
            r = import_gguf(model, output, force=force, progress=progress)
    except _EdgeAdaptError as exc:
        _fail(exc)
    typer.echo(f"wrote {r.path} ({r.architecture}, {r.n_params / 1e6:.1f}M params, float32) in {r.seconds:.1f}s")

