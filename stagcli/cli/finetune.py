"""`stag finetune [MODEL] OUT`: thin layer over stagcli.train (options -> TrainConfig, Rich output).
The options are TrainConfig's fields (declared once, in train.py)."""
from __future__ import annotations

import math
from typing import List, Optional

import typer
from rich.progress import TextColumn
from rich.table import Table

from . import app
from .common import console, err_console, handles_errors, progress_bar
from ..errors import StagError
from ..options import options_from
from ..train import Callback, TrainConfig


class RichProgress(Callback):
    """The fine-tuning bar (steps, ETA, loss, lr, tokens/s), a bar per held-out evaluation, and a line
    per phase so that a slow start is never silent."""

    def __init__(self):
        self.bar = progress_bar(TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                                TextColumn("{task.fields[tps]} tok/s"))
        self.task = self.eval_task = None
        self.started = False
        self.status = None  # a transient spinner for the phases before the bar (loading, tokenizing)

    def on_phase(self, text):
        if self.started:
            self.bar.console.print(f"[dim]{text}[/]", highlight=False)
        elif self.status is None:
            self.status = err_console.status(text)
            self.status.start()
        else:
            self.status.update(text)

    def on_start(self, info):
        self._stop_status()
        self.bar.start()
        self.started = True
        done = f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""
        self.bar.console.print(f"{info['train_sequences']} training sequences, held out: {info['heldout_source']}; "
                               f"global batch {info['global_batch']} ({info['processes']} process(es)), "
                               f"{info['precision']} on {info['device']}{done}", highlight=False, markup=False)
        self.task = self.bar.add_task("finetune", total=info["total_steps"], completed=info["step"],
                                      loss="-", lr="-", tps="-")
        self.total_steps, self.first_step = info["total_steps"], info["step"]
        self.max_seconds = 60 * info["max_minutes"] if info.get("max_minutes") else None

    def on_eval_start(self, batches):
        self.eval_task = self.bar.add_task("held-out eval", total=batches, loss="", lr="", tps="")

    def on_eval_batch(self, done):
        self.bar.update(self.eval_task, completed=done)

    def on_eval(self, row):
        if self.eval_task is not None:
            self.bar.remove_task(self.eval_task)
            self.eval_task = None
        self.bar.console.print(f"step {row['step']}: held-out loss {row['heldout_loss']:.4f}, "
                               f"perplexity {row['heldout_ppl']:.2f}", highlight=False)

    def on_step(self, row):
        total = self.total_steps
        if self.max_seconds and row["step"] > self.first_step:  # --max-minutes ends it first: ETA from the clock
            per_step = row["elapsed_s"] / (row["step"] - self.first_step)
            total = min(total, row["step"] + math.ceil(max(self.max_seconds - row["elapsed_s"], 0) / per_step))
        self.bar.update(self.task, total=total, completed=row["step"], loss=f"{row['loss']:.4f}",
                        lr=f"{row['lr']:.2e}", tps=f"{row['tokens_per_s']:,.0f}")

    def on_finish(self, summary):
        self.stop()

    def _stop_status(self):
        if self.status is not None:
            self.status.stop()
            self.status = None

    def stop(self):
        self._stop_status()
        self.bar.stop()


@app.command(epilog="Data-parallel on several GPUs, no code change: accelerate launch --multi_gpu "
                    "--num_processes N -m stagcli finetune ... (or torchrun --nproc_per_node N -m stagcli "
                    "finetune ...). The global batch is batch-size x grad-accum x N.")
@handles_errors
@options_from(TrainConfig, into="explicit", optional=True)
def finetune(
    paths: List[str] = typer.Argument(..., metavar="[MODEL] OUT", help="MODEL: a stag directory, or a plain "
                                      "Hugging Face checkpoint / .gguf / alias (smollm2-135m), trained "
                                      "unconverted as a control; optional with --recipe or --resume. "
                                      "OUT: the run directory; the final model is saved there."),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe (see recipes/): a convert step and "
                                         "finetune options. Options given here override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint, "
                                "bit-for-bit, with the options it was started with (a run stopped before its "
                                "first checkpoint starts over)."),
    force: bool = typer.Option(False, "--force", help="Start over in an OUT that already holds a run."),
    tokenizer: Optional[str] = typer.Option(None, help="Load the tokenizer from this directory instead of MODEL's."),
    explicit=None,
):
    """Fine-tune a staggered (or plain) model on text, with checkpoints, resume and held-out perplexity.

    On the 2-core CPU, SmolLM2-135M trains at a few hundred tokens/s (docs/finetune.md): 100k tokens
    take minutes, 2M tokens hours. Use a GPU for long runs."""
    from ..recipes import load_recipe, recipe_model
    from ..train import finetune_paths, process_state, saved_run_options

    if len(paths) > 2:
        raise StagError(f"expected [MODEL] OUT, got {len(paths)} paths: {' '.join(paths)}")
    model, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])

    # Precedence: defaults < recipe < the saved run (--resume) < options given here.
    the_recipe = load_recipe(recipe) if recipe else {}
    options = dict(the_recipe.get("finetune") or {})
    if resume:
        saved = saved_run_options(out)
        if not saved and model is None and not the_recipe:
            raise StagError(f"--resume: {out} holds no fine-tuning run (no run.json); give MODEL OUT to start one")
        options.update(saved.get("config", {}))
        model = model or saved.get("model")
    options.update(explicit)
    cfg = TrainConfig.from_dict(options)

    main = process_state().is_main_process
    progress = RichProgress()
    if model is None and the_recipe:
        model = recipe_model(the_recipe, out, (lambda source, target: err_console.print(
            f"converting {source} -> {target}", highlight=False)) if main else None)
    if model is None:
        raise StagError("no model: give MODEL OUT, or a --recipe with a convert step or model")
    try:
        summary = finetune_paths(model, out, cfg, resume=resume, force=force,
                                 callbacks=[progress] if main else [], tokenizer_path=tokenizer)
    finally:
        progress.stop()
    if not main:
        return
    table = Table(title=f"stag finetune -> {summary['out']}", show_header=False)
    table.add_row("model", str(model))
    table.add_row("steps", f"{summary['steps']} ({summary['tokens']:,} tokens, global batch "
                  f"{summary['global_batch']} x {summary['seq_len']})")
    if summary["final_loss"] is not None:
        table.add_row("final train loss", f"{summary['final_loss']:.4f}")
    if summary["heldout_loss"] is not None:
        table.add_row("held-out loss / ppl", f"{summary['heldout_loss']:.4f} / {summary['heldout_ppl']:.2f}")
    if summary["tokens_per_s"]:
        table.add_row("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s ({summary['precision']})")
    table.add_row("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB")
    table.add_row("metrics", f"{summary['out']}/metrics.jsonl")
    console.print(table)
