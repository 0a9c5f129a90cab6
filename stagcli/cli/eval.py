"""`stag eval MODEL [MODEL ...] --tasks ...`: lm-evaluation-harness, one table for all models."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from . import app
from .common import comma_list, console, handles_errors, progress_bar
from ..errors import StagError


def _num(value) -> str:
    return f"{value:.4g}" if abs(value) >= 1000 else f"{value:.4f}"


def _fmt(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{_num(value)} ± {_num(stderr)}" if stderr is not None else _num(value)


def _delta(delta, higher_is_better) -> str:
    if delta is None:
        return "-"
    text = f"{delta:+.4g}" if abs(delta) >= 1000 else f"{delta:+.4f}"
    if higher_is_better is None or delta == 0:
        return text
    better = (delta > 0) == bool(higher_is_better)
    return f"[{'green' if better else 'red'}]{text}[/]"


def results_table(report) -> Table:
    labels = [m.label for m in report.models]
    table = Table(title="stag eval", caption=_caption(report.settings), show_lines=False)
    table.add_column("task")
    table.add_column("metric")
    for i, label in enumerate(labels):
        table.add_column(label, justify="right")
        if i:
            table.add_column(f"Δ {label}", justify="right")
    for row in report.rows:
        arrow = {True: " ↑", False: " ↓"}.get(row["higher_is_better"], "")
        metric = row["metric"] + ("" if row["filter"] == "none" else f" ({row['filter']})") + arrow
        cells = [row["task"], metric]
        for i, label in enumerate(labels):
            cell = row["values"].get(label)
            cells.append(_fmt(cell["value"], cell["stderr"]) if cell else "-")
            if i:
                cells.append(_delta(row["delta"].get(label), row["higher_is_better"]))
        table.add_row(*cells)
    return table


def _caption(settings: dict) -> str:
    parts = [f"seed {settings['seed']}", f"batch {settings['batch_size']}", settings["device"], settings["dtype"]]
    if settings.get("limit") is not None:
        parts.append(f"limit {settings['limit']:g}")
    if settings.get("num_fewshot") is not None:
        parts.append(f"{settings['num_fewshot']}-shot")
    return "value ± stderr; Δ = model − first model (green: better); " + ", ".join(parts)


@app.command("eval")
@handles_errors
def eval_command(
    models: List[str] = typer.Argument(..., help="Models to compare, first one is the baseline for the Δ "
                                       "columns: stag directories, plain Hugging Face checkpoint "
                                       "directories, .gguf files or aliases (smollm2-135m). Plain "
                                       "checkpoints run as 1-section stag models (numerically identical)."),
    tasks: List[str] = typer.Option(..., "--tasks", "-t", help="Tasks, comma separated or repeated. Local "
                                    "offline tasks (stagcli/task_data): kjv_ppl (perplexity), kjv_lastword "
                                    "(last-word prediction), kjv_cloze_mc (multiple choice), kjv_complete "
                                    "(generation). Any built-in lm-eval task name is passed through "
                                    "(needs the Hugging Face hub for its data)."),
    limit: Optional[float] = typer.Option(None, "--limit", "-l", help="Documents per task: a count, or a "
                                          "fraction of the task when below 1 (default: all)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", "-k", help="Few-shot examples per "
                                              "prompt (default: each task's own setting, usually 0)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Requests per forward pass / decode batch."),
    seed: int = typer.Option(1234, "--seed", help="Seed for every random choice (python, numpy, torch, "
                             "few-shot sampling, sampled generation): same seed, same numbers."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write everything as JSON: settings, "
                                          "the summary rows and the full lm-eval results of each model."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda "
                                         "when available, else cpu)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype while evaluating: float32, "
                              "bfloat16 or float16."),
    recurrent: bool = typer.Option(False, "--recurrent", help="Generate with the recurrent approximation "
                                   "(shared-weights models with >= 2 sections only)."),
    include_path: List[Path] = typer.Option([], "--include-path", help="Extra directory of lm-eval task "
                                            "YAMLs (repeatable), searched besides stagcli/task_data."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show lm-eval's own log lines."),
):
    """Evaluate models on lm-evaluation-harness tasks and print one table: a column per model,
    a row per metric, with stderr and the change against the first model."""
    task_names = comma_list(*tasks)
    if output is not None and output.is_dir():
        raise StagError(f"--output {output} is a directory; give a file name")
    for path in include_path:
        if not path.is_dir():
            raise StagError(f"--include-path {path} is not a directory")

    from ..evaluate import quiet_lm_eval, run_eval
    if not verbose:
        quiet_lm_eval()

    with progress_bar(transient=True) as bars:
        overall = bars.add_task("models", total=len(models))
        requests = bars.add_task("requests", total=None, visible=False)

        def on_progress(event, **info):
            if event == "model":
                bars.update(overall, completed=info["index"], description=f"model {info['label']}")
            elif event == "requests":
                bars.reset(requests, total=info["total"], visible=True)
                bars.update(requests, description=f"  {info['kind']}")
            elif event == "request":
                bars.advance(requests)

        report = run_eval(models, task_names, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                          seed=seed, device=device, dtype=dtype, include_paths=include_path,
                          recurrent=recurrent, progress=on_progress)
        bars.update(overall, completed=len(models))
        bars.update(requests, visible=False)

    console.print(results_table(report))
    if output is not None:
        from ..files import write_json
        write_json(output, report.to_json())
        console.print(f"wrote {output}")
