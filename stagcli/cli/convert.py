"""`stag convert SRC OUT`."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from . import app
from .common import console, err_console, handles_errors


@app.command()
@handles_errors
def convert(
    src: str = typer.Argument(..., help="Source checkpoint: a Hugging Face directory (config.json + "
                              "safetensors), a .gguf file, a packaged alias (smollm2-135m), or a hub "
                              "id when a network exists."),
    out: str = typer.Argument(..., help="Output directory (written atomically: nothing is left behind on error)."),
    sections: int = typer.Option(2, "--sections", "-p", help="Number of staggered sections p. "
                                 "split: must divide the layer count; shared: number of passes."),
    mode: str = typer.Option("split", help="split: layers 1..L/p form section 1, the next L/p section 2, "
                             "... (separate weights). shared: every section is a pass through all L layers "
                             "(shared weights); with zero cross-attention it reproduces the source exactly."),
    window: Optional[int] = typer.Option(None, help="Bounded cross-attention: a section sees only the "
                                         "previous W outputs of the section below (default: all)."),
    init: str = typer.Option("zero", help="zero: section k>1 starts from the token embedding with a "
                             "zero-output cross-attention (the paper's form). lagged: section k>1 also gets "
                             "u(i-1) - E(x(i-1)) from the section below, approximating the missing "
                             "lower layers (split mode only)."),
    cross_attn: str = typer.Option("sequential", help="Where cross-attention sits in a layer. sequential: "
                                   "the paper's extra sublayer after self-attention (own norm, query and output "
                                   "projections). parallel: it reads the same norm(x) as self-attention, its query "
                                   "joins the qkv GEMM and its output the o GEMM (fewer kernels per decode step)."),
    dtype: str = typer.Option("float32", help="Weight dtype of the output: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already exists."),
):
    """Convert a Hugging Face decoder checkpoint into a StagFormer model."""
    from ..convert import convert as run_convert

    with err_console.status("converting") as status:
        result = run_convert(src, out, sections=sections, mode=mode, window=window, init=init,
                             cross_attn=cross_attn, dtype=dtype, force=force, progress=lambda msg: status.update(msg))
    cfg = result.config
    table = Table(title=f"stag convert -> {result.out}", show_header=False)
    table.add_row("source", f"{src} ({cfg.stag_recipe.get('source_model_type')}, {cfg.num_layers} layers)")
    table.add_row("mode", f"{mode}, {cfg.sections} section(s)" + (f", window {window}" if window else ""))
    per = f"{cfg.depth} layers x {cfg.sections}" + (" passes (shared weights)" if cfg.shared else " sections")
    table.add_row("layers per section", per)
    table.add_row("init", init)
    if cfg.cross_sets:
        table.add_row("cross-attention", cross_attn)
    table.add_row("parameters", f"{result.stag_params:,} ({result.stag_params - result.source_params:+,} added)")
    table.add_row("weights written", f"{result.bytes_written / 2**20:.1f} MiB ({dtype})")
    console.print(table)
