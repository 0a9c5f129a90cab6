"""`stag experiment RECIPE`."""
from __future__ import annotations

from pathlib import Path

import typer

from . import app
from .common import console, err_console, handles_errors


@app.command()
@handles_errors
def experiment(
    recipe: str = typer.Argument(..., help="Experiment recipe YAML (e.g. recipes/smollm2-stag.yaml): source, "
                                 "data, variants, fine-tuning budget, eval tasks, bench and scratch settings."),
    out: str = typer.Option("runs/experiment", help="Working directory for converted and fine-tuned models "
                            "(reused: finished steps are skipped when the command is run again)."),
    results: str = typer.Option("docs/results", help="Where results.json, results.md and the plots go."),
    tiny: bool = typer.Option(False, "--tiny", help="Apply the recipe's `tiny:` overrides: a small model "
                              "trained here from scratch stands in for the source (minutes on a CPU)."),
):
    """Run the whole pipeline: convert several ways, fine-tune each and the control, evaluate, bench,
    and train the paper's from-scratch comparison; write a results table and plots."""
    from ..experiment import run_experiment

    def report(who, what):
        err_console.print(f"[bold]{who}[/]: {what}", highlight=False)

    summary = run_experiment(recipe, out, results, tiny=tiny, report=report)
    console.print((Path(results) / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"wrote {results}/results.json, results.md and plots ({summary['seconds']} s)")
