"""`stag convert SRC OUT`."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from . import app
from .common import console, handles_errors, progress_bar
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
    calibrate: Optional[List[str]] = typer.Option(None, "--calibrate", help="Text to fit the --bridge on (same "
                                                  "kinds as finetune --data: kjv:train, files, directories, JSONL)."),
    calibrate_tokens: int = typer.Option(65536, "--calibrate-tokens", help="Tokens of --calibrate text to fit on "
                                         "(SmolLM2: ~1 min per 64k tokens on a 2-core CPU)."),
    bridge_from: Optional[str] = typer.Option(None, "--bridge-from", help="Copy the bridge of this stag checkpoint "
                                              "(same source and split, e.g. a split conversion whose bridge was "
                                              "trained by finetune --train bridge) instead of fitting one."),
    layout=None,
):
    """Convert a Hugging Face decoder checkpoint into a StagFormer model."""
    from ..convert import convert as run_convert

    bar = progress_bar(transient=True)
    task = None

    def status(message):
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(message, total=None)
        bar.update(task, description=message)

    def calibrating(done, total):
        bar.update(task, description="fitting the bridge", completed=done, total=total)

    try:
        result = run_convert(src, out, layout, dtype=dtype, force=force, progress=status,
                             calibrate=calibrate or None, calibrate_tokens=calibrate_tokens,
                             calibrate_progress=calibrating, bridge_from=bridge_from)
    finally:
        bar.stop()
    cfg = result.config
    table = Table(title=f"stag convert -> {result.out}", show_header=False)
    table.add_row("source", f"{src} ({cfg.stag_recipe.get('source_model_type')}, {cfg.num_layers} layers)")
    table.add_row("mode", f"{layout.mode}, {cfg.sections} section(s)" + (f", window {layout.window}" if layout.window else ""))
    per = f"{cfg.depth} layers x {cfg.sections}" + (" passes (shared weights)" if cfg.shared else " sections")
    table.add_row("layers per section", per)
    if bridge_from:
        table.add_row("section input", f"{layout.bridge} bridge (copied from {bridge_from})")
    else:
        table.add_row("section input", f"{layout.bridge} bridge (fitted on {', '.join(calibrate)}, "
                      f"{calibrate_tokens:,} tokens)" if layout.bridge else layout.init)
    if layout.bridge_depth:
        table.add_row("bridge reads", f"section 1's state after {layout.bridge_depth} layers (section 2 starts "
                      f"{layout.bridge_depth} layers late; docs/bridge.md)")
    if cfg.cross_sets:
        table.add_row("cross-attention", layout.cross_attn)
    table.add_row("parameters", f"{result.stag_params:,} ({result.stag_params - result.source_params:+,} added)")
    table.add_row("weights written", f"{result.bytes_written / 2**20:.1f} MiB ({dtype})")
    console.print(table)
