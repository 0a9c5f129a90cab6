"""`stag convert SRC OUT`."""
from __future__ import annotations


import typer
from rich.table import Table

from . import app
from .common import console, err_console, handles_errors
from ..layout import Layout
from ..options import options_from


@app.command()
@handles_errors
@options_from(Layout, into="layout")
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: a Hugging Face directory (config.json + "
                              "safetensors), a .gguf file, a packaged alias (smollm2-135m), or a hub "
                              "id when a network exists."),
    out: str = typer.Argument(..., help="Output directory (written atomically: nothing is left behind on error)."),
    dtype: str = typer.Option("float32", help="Weight dtype of the output: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is a previous stag output (never the "
                               "source, a directory holding it, or the current directory)."),
    layout=None,
):
    """Convert a Hugging Face decoder checkpoint into a StagFormer model."""
    from ..convert import convert as run_convert

    with err_console.status("converting") as status:
        result = run_convert(src, out, layout, dtype=dtype, force=force, progress=lambda msg: status.update(msg))
    cfg = result.config
    table = Table(title=f"stag convert -> {result.out}", show_header=False)
    table.add_row("source", f"{src} ({cfg.stag_recipe.get('source_model_type')}, {cfg.num_layers} layers)")
    table.add_row("mode", f"{layout.mode}, {cfg.sections} section(s)" + (f", window {layout.window}" if layout.window else ""))
    per = f"{cfg.depth} layers x {cfg.sections}" + (" passes (shared weights)" if cfg.shared else " sections")
    table.add_row("layers per section", per)
    table.add_row("init", layout.init)
    if cfg.cross_sets:
        table.add_row("cross-attention", layout.cross_attn)
    table.add_row("parameters", f"{result.stag_params:,} ({result.stag_params - result.source_params:+,} added)")
    table.add_row("weights written", f"{result.bytes_written / 2**20:.1f} MiB ({dtype})")
    console.print(table)
