"""`stag finetune [MODEL] OUT`: thin layer over stagcli.train (options -> TrainConfig, Rich output)."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.progress import TextColumn
from rich.table import Table

from . import app
from .common import console, err_console, handles_errors, progress_bar
from ..errors import StagError

H_DATA = ("Training text: a corpus name (kjv:train), a file, a directory (all files under it), a glob, "
          "or JSONL with a 'text' field. Repeat or comma-separate for several. Tokenized once and cached "
          "under $STAG_CACHE/tokenized, packed into --seq-len sequences.")


@app.command(epilog="Data-parallel on several GPUs, no code change: accelerate launch --multi_gpu "
                    "--num_processes N -m stagcli finetune ... (or torchrun --nproc_per_node N -m stagcli "
                    "finetune ...). The global batch is batch-size x grad-accum x N.")
@handles_errors
def finetune(
    paths: List[str] = typer.Argument(..., metavar="[MODEL] OUT", help="MODEL: a stag directory, or a plain "
                                      "Hugging Face checkpoint / .gguf / alias (smollm2-135m), trained "
                                      "unconverted as a control; optional with --recipe or --resume. "
                                      "OUT: the run directory; the final model is saved there."),
    recipe: Optional[str] = typer.Option(None, help="YAML recipe (see recipes/): a convert step and "
                                         "finetune options. Options given here override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint, "
                                "bit-for-bit, with the options it was started with."),
    data: Optional[List[str]] = typer.Option(None, "--data", "-d", help=H_DATA),
    heldout: Optional[List[str]] = typer.Option(None, help="Held-out text (same kinds as --data), never "
                                                "trained on. Default: the last --heldout-fraction of the "
                                                "packed --data sequences."),
    heldout_fraction: Optional[float] = typer.Option(None, help="Share of packed sequences held out when "
                                                     "no --heldout is given [default: 0.05]."),
    tokenizer: Optional[str] = typer.Option(None, help="Load the tokenizer from this directory instead of MODEL's."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per packed sequence; at most the model's "
                                          "max_positions [default: min(512, max_positions)]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch per process [default: 8]."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches accumulated per optimizer step [default: 1]."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate [default: 3e-4]."),
    min_lr_ratio: Optional[float] = typer.Option(None, help="Cosine decay ends at lr x this [default: 0.1]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup steps [default: 5% of the steps]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay, not applied to norms and "
                                                 "biases [default: 0.01]."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this [default: 1.0]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    max_tokens: Optional[int] = typer.Option(None, help="Token budget (global batch x seq-len per step); "
                                             "with --max-steps the smaller wins."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the data when neither --max-steps nor "
                                           "--max-tokens is given [default: 1]."),
    train: Optional[str] = typer.Option(None, help="all: train every weight. cross: train only the added "
                                        "cross-attention (cross_* and mem_norm; not for --cross-attn parallel "
                                        "models) [default: all]."),
    cross_lr_scale: Optional[float] = typer.Option(None, help="Learning-rate multiplier for the weights "
                                                   "staggering added (cross-attention, memory norm). Below 1 it "
                                                   "keeps Adam's first steps on the zero-initialised cross-attention "
                                                   "output from jolting a model that starts at the source's "
                                                   "quality (shared mode); 0 freezes them [default: 0.1 for "
                                                   "shared-weights models, 1 otherwise]."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute activations per block in the backward "
                                                          "pass: less memory, ~30% slower [default: off]."),
    distill_from: Optional[str] = typer.Option(None, help="Teacher (e.g. the unconverted source model): "
                                               "add the KL divergence to its logits to the LM loss."),
    distill_alpha: Optional[float] = typer.Option(None, help="loss = (1-alpha) LM + alpha KL [default: 0.5]."),
    distill_temperature: Optional[float] = typer.Option(None, help="Softmax temperature T of the KL "
                                                        "term, scaled by T^2 [default: 1]."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (and at the end) [default: 200]."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Checkpoints kept on disk [default: 1]."),
    eval_every: Optional[int] = typer.Option(None, help="Held-out perplexity every N steps (and at the "
                                             "start and end) [default: 100]."),
    eval_sequences: Optional[int] = typer.Option(None, help="Held-out sequences per evaluation [default: 64]."),
    precision: Optional[str] = typer.Option(None, help="auto: bf16 mixed precision on GPU, fp32 on CPU; "
                                            "or bf16 / fp32 [default: auto]."),
    seed: Optional[int] = typer.Option(None, help="Seed of the data order [default: 0]."),
):
    """Fine-tune a staggered (or plain) model on text, with checkpoints, resume and held-out perplexity."""
    from ..train import TrainConfig, finetune_paths, load_recipe, process_state, recipe_model, saved_run_options

    if len(paths) > 2:
        raise StagError(f"expected [MODEL] OUT, got {len(paths)} paths: {' '.join(paths)}")
    model, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    explicit = {k: v for k, v in dict(
        data=data, heldout=heldout, heldout_fraction=heldout_fraction, seq_len=seq_len, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, max_steps=max_steps, max_tokens=max_tokens,
        epochs=epochs, train=train, cross_lr_scale=cross_lr_scale, gradient_checkpointing=gradient_checkpointing, distill_from=distill_from,
        distill_alpha=distill_alpha, distill_temperature=distill_temperature, save_every=save_every,
        keep_checkpoints=keep_checkpoints, eval_every=eval_every, eval_sequences=eval_sequences,
        precision=precision, seed=seed).items() if v not in (None, [])}

    # Precedence: defaults < recipe < the saved run (--resume) < options given here.
    the_recipe = load_recipe(recipe) if recipe else {}
    options = dict(the_recipe.get("finetune") or {})
    if resume:
        saved = saved_run_options(out)
        options.update(saved.get("config", {}))
        model = model or saved.get("model")
    options.update(explicit)
    cfg = TrainConfig.from_dict(options)

    main = process_state().is_main_process
    bar = progress_bar(TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                       TextColumn("{task.fields[tps]} tok/s"))
    task = None

    def report(event, info):
        nonlocal task
        if event == "convert":
            err_console.print(f"converting {info['source']} -> {info['out']}")
        elif event == "start":
            bar.start()
            done = f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""
            bar.console.print(f"{info['train_sequences']} training sequences, held out: {info['heldout_source']}; "
                              f"global batch {info['global_batch']} ({info['processes']} process(es)), "
                              f"{info['precision']} on {info['device']}{done}", highlight=False)
            task = bar.add_task("finetune", total=info["total_steps"], completed=info["step"],
                                loss="-", lr="-", tps="-")
        elif event == "eval":
            bar.console.print(f"step {info['step']}: held-out loss {info['heldout_loss']:.4f}, "
                              f"perplexity {info['heldout_ppl']:.2f}", highlight=False)
        elif event == "step":
            bar.update(task, completed=info["step"], loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}",
                       tps=f"{info['tokens_per_s']:,.0f}")
        elif event == "done":
            bar.stop()

    if model is None and the_recipe:
        model = recipe_model(the_recipe, out, report if main else None)
    if model is None:
        raise StagError("no model: give MODEL OUT, a --recipe with a convert step or model, or --resume")
    try:
        summary = finetune_paths(model, out, cfg, resume=resume, report=report if main else None,
                                 tokenizer_path=tokenizer)
    finally:
        bar.stop()
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
        table.add_row("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s")
    table.add_row("metrics", f"{summary['out']}/metrics.jsonl")
    console.print(table)
