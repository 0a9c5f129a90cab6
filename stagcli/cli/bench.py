"""`stag bench MODEL [--baseline SRC]`."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from . import app
from .common import console, err_console, handles_errors, progress_bar


@app.command()
@handles_errors
def bench(
    model: str = typer.Argument(..., help="The staggered model (a stag directory; a plain checkpoint also works)."),
    baseline: Optional[str] = typer.Option(None, help="Unconverted source to compare with (default: the source "
                                           "recorded by stag convert, when it exists here)."),
    batch_sizes: str = typer.Option("1,4,16", "--batch-sizes", help="Comma-separated batch sizes."),
    prompt_len: int = typer.Option(128, "--prompt-len", help="Tokens in the fixed prompt."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Decode steps timed per run (prefill excluded)."),
    repeats: int = typer.Option(5, help="Timed runs per figure; the median is reported."),
    warmup: int = typer.Option(1, help="Untimed warm-up runs first."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (use bfloat16 on GPUs)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the decode step before "
                                 "CUDA-graph capture (CUDA only)."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also time transformers' generate with a static cache."),
    prompt_data: Optional[str] = typer.Option(None, "--prompt-data", help="Take the prompts from this text "
                                              "(kjv:heldout, pydoc:heldout, files) instead of random tokens: needed "
                                              "for a meaningful acceptance rate of a --mode verify model."),
    prompt_lookup: int = typer.Option(10, "--prompt-lookup", help="For --mode verify and exact-cache models, also "
                                      "time transformers' lossless prompt-lookup decoding with this many candidate "
                                      "tokens, at batch size 1 (transformers supports no other; 0: skip)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write all measurements as JSON here."),
):
    """Decode latency per token and tokens/s: staggered model vs the same engine on the unconverted
    model vs Hugging Face static-cache generate. ops/step counts the aten ops of one eager decode step
    (GEMMs + attention calls / the rest): what bounds small models on a GPU."""
    from ..bench import run_bench
    from ..errors import StagError
    from ..files import write_json
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise StagError(f"--batch-sizes must be comma-separated integers, not '{batch_sizes}'") from None
    from ..bench import check_settings
    from ..devices import resolve_device
    check_settings(sizes, prompt_len, new_tokens, repeats, dtype)
    resolve_device(device)
    bar = progress_bar(transient=True)
    task = bar.add_task("bench", total=None)

    def progress(label, done, total):
        bar.update(task, description=label, completed=done, total=total or None)

    with bar:
        result = run_bench(model, baseline, sizes, prompt_len, new_tokens, repeats, warmup, device, dtype,
                           compile, hf, progress=progress, prompt_data=prompt_data, prompt_lookup=prompt_lookup)
    table = Table(title=f"stag bench: {result['machine']}, {dtype}, prompt {prompt_len}, {new_tokens} new tokens, "
                        f"median of {repeats}")
    verified = any("acceptance" in r for r in result["rows"])
    columns = ["system", "batch", "ms/token", "tokens/s", "GB/s", "ops/step (GEMM+attn / other)", "staggered vs this"]
    if verified:
        columns[5:5] = ["acceptance", "tokens/step"]
    for col in columns:
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in result["rows"]:
        ops = r.get("ops_per_step")
        ratio = r["speedup_of_staggered"]
        versus = "" if r["name"] == "staggered" else (
            f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower")
        cells = [r["name"], str(r["batch_size"]), f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}",
                 f"{r['bandwidth_GBps']:.2f}", f"{ops['heavy']} / {ops['other']}" if ops else "", versus]
        if verified:
            acceptance = r.get("acceptance")
            cells[5:5] = ["" if acceptance is None else f"{acceptance:.3f}",
                          f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else ""]
        table.add_row(*cells)
    console.print(table)
    if not result["baseline"]:
        err_console.print("no baseline: pass --baseline SRC to compare with the unconverted model")
    if output:
        write_json(output, result)
        console.print(f"wrote {output}")
