"""`stag experiment RECIPE`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app
from .common import comma_list, console, err_console, handles_errors


@app.command()
@handles_errors
def experiment(
    recipe: str = typer.Argument(..., help="Experiment recipe YAML (e.g. recipes/smollm2-stag.yaml): source, "
                                 "data, variants, fine-tuning budget, eval tasks, bench and scratch settings."),
    out: str = typer.Option("runs/experiment", help="Working directory for converted and fine-tuned models "
                            "(reused: finished steps are skipped when the command is run again)."),
    results: Optional[str] = typer.Option(None, help="Where results.json, results.md and the plots go "
                                          "(default: OUT/results; copy them into docs/ yourself)."),
    tiny: bool = typer.Option(False, "--tiny", help="Apply the recipe's `tiny:` overrides: a small model "
                              "trained here from scratch stands in for the source (minutes on a CPU)."),
    variants: Optional[str] = typer.Option(None, help="Comma-separated variant names from the recipe to run "
                                           "(default: all). The results then cover only these."),
    max_tokens: Optional[int] = typer.Option(None, help="Fine-tuning token budget per variant (and per "
                                             "from-scratch model), instead of the recipe's."),
    skip: Optional[str] = typer.Option(None, help="Comma-separated steps to leave out: eval (needs lm-eval), "
                                       "bench, scratch."),
):
    """Run the whole pipeline: convert several ways, fine-tune each and the control, evaluate, bench,
    and train the paper's from-scratch comparison; write a results table and plots.

    Run it again with the same --out to continue: finished steps are skipped and an interrupted
    fine-tune resumes from its last checkpoint."""
    from ..experiment import run_experiment

    def report(who, what):
        err_console.print(f"[bold]{who}[/]: {what}", highlight=False)

    results = results or str(Path(out) / "results")
    summary = run_experiment(recipe, out, results, tiny=tiny, report=report, variants=comma_list(variants),
                             max_tokens=max_tokens, skip=comma_list(skip))
    console.print((Path(results) / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"wrote {results}/results.json, results.md and plots ({summary['seconds']} s)")
