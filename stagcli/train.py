"""Fine-tuning on Hugging Face Accelerate: `finetune()` trains an in-memory model; `finetune_paths()`
loads one (staggered or plain) from disk first; `load_recipe()` reads a YAML recipe.

One optimizer step consumes a global batch of batch_size x grad_accum x processes packed sequences.
Their positions in the data stream are a pure function of (seed, step): the stream is the training
sequences in a fresh seeded permutation per epoch, and step s takes positions [(s-1)G, sG). So the
step number IS the data position, a 2-process run sees exactly the sequences a 1-process run with
the same global batch sees, and a resumed run continues bit-for-bit.

Layout of OUT:
    run.json                     how the run was started (model, teacher, TrainConfig)
    metrics.jsonl                one row per step (+ held-out loss/perplexity when evaluated)
    checkpoints/step-00000200/   Accelerate state (model, optimizer, scheduler, RNG per process)
                                 + trainer_state.json; written as .tmp-step-... then renamed
    config.json, model.safetensors, tokenizer files, stag_recipe.json   the final model
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .data import HELDOUT_FRACTION, PackedData, build_data
from .errors import StagError

TRAIN_CHOICES = ("all", "cross")
SHARED_CROSS_LR_SCALE = 0.1  # measured on SmolLM2 (docs/finetune.md): 1 wrecks the start, 0.1 does not
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_SEQ_LEN = 512
NO_CROSS = ("--train cross: this model has no cross-attention (a plain, unconverted model or one section); "
            "use --train all")
FUSED_CROSS = ("--train cross: this model's cross-attention (--cross-attn parallel) shares its qkv and o weights "
               "with self-attention; use --train all, with --cross-lr-scale to slow the added parts")


@dataclass
class TrainConfig:
    data: list = field(default_factory=list)  # corpus names, files, directories, globs
    heldout: Optional[list] = None            # same kinds; None: carve HELDOUT_FRACTION off the end
    heldout_fraction: float = HELDOUT_FRACTION
    seq_len: Optional[int] = None             # None: min(512, the model's max_positions)
    batch_size: int = 8                       # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1                 # cosine decays to lr * min_lr_ratio
    warmup_steps: Optional[int] = None        # None: 5% of the steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None          # token budget; with max_steps, the smaller wins
    epochs: float = 1.0                       # used only when neither budget is given
    train: str = "all"                        # all | cross (only cross-attention + memory norm)
    cross_lr_scale: Optional[float] = None    # lr multiplier of what staggering added; None: see validate()
    gradient_checkpointing: bool = False
    distill_from: Optional[str] = None        # teacher path/alias (recorded; finetune() takes the model)
    distill_alpha: float = 0.5                # loss = (1-a) LM + a T^2 KL(teacher || student)
    distill_temperature: float = 1.0
    save_every: int = 200
    keep_checkpoints: int = 1
    eval_every: int = 100
    eval_sequences: int = 64                  # held-out sequences per evaluation (a fixed prefix)
    precision: str = "auto"                   # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict, where: str = "options") -> "TrainConfig":
        """Build from loose values (YAML, JSON, CLI), converting types; unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise StagError(f"unknown finetune option(s) in {where}: {', '.join(unknown)}; "
                            f"known: {', '.join(fields)}")
        return cls(**{k: _coerce(k, fields[k].type, v) for k, v in values.items()})


# Options that do not change which weights come out; everything else must match on --resume.
BOOKKEEPING = {"save_every", "keep_checkpoints", "eval_every", "eval_sequences"}


def _coerce(name, kind: str, value):
    if value is None:
        return None
    try:
        if "list" in kind:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        if "bool" in kind:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in kind:
            as_float = float(value)  # accepts 2e6 and 20_000_000 from YAML
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if "float" in kind:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise StagError(f"option {name}: cannot read {value!r} as {kind.replace('Optional[', '').rstrip(']')}") from None


# --- checks -------------------------------------------------------------------------------------
def _max_positions(model) -> Optional[int]:
    cfg = model.config
    return getattr(cfg, "max_positions", None) or getattr(cfg, "max_position_embeddings", None)


def validate(cfg: TrainConfig, model) -> TrainConfig:
    """Fill defaults that depend on the model and reject impossible settings."""
    limit = _max_positions(model)
    if cfg.seq_len is None:
        cfg = dataclasses.replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN))
    if limit is not None and cfg.seq_len > limit:
        raise StagError(f"--seq-len {cfg.seq_len} is longer than the model supports "
                        f"(config.max_positions = {limit})")
    positive = {"seq_len": 2, "batch_size": 1, "grad_accum": 1, "save_every": 1, "eval_every": 1,
                "keep_checkpoints": 1, "eval_sequences": 1}
    for name, low in positive.items():
        if getattr(cfg, name) < low:
            raise StagError(f"--{name.replace('_', '-')} must be >= {low}, not {getattr(cfg, name)}")
    for name in ("max_steps", "max_tokens"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise StagError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.epochs <= 0:
        raise StagError("--lr and --epochs must be > 0")
    if cfg.cross_lr_scale is None:
        cfg = dataclasses.replace(cfg, cross_lr_scale=default_cross_lr_scale(model, cfg.train))
    if cfg.cross_lr_scale < 0:
        raise StagError(f"--cross-lr-scale must be >= 0, not {cfg.cross_lr_scale}")
    if cfg.train not in TRAIN_CHOICES:
        raise StagError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, not '{cfg.train}'")
    if cfg.train == "cross":
        added = added_weights(model)
        if not added:
            raise StagError(NO_CROSS)
        if any(index is not None for _, _, index in added):
            raise StagError(FUSED_CROSS)
    if cfg.precision not in PRECISIONS:
        raise StagError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{cfg.precision}'")
    if not 0 <= cfg.distill_alpha <= 1 or cfg.distill_temperature <= 0:
        raise StagError("--distill-alpha must be in [0, 1] and --distill-temperature > 0")
    return cfg


def default_cross_lr_scale(model, train: str) -> float:
    """0.1 for a shared-weights model converted from a pretrained checkpoint and trained whole: it
    starts at the source's quality, which a full-lr start of its zero-output cross-attention wrecks
    (docs/finetune.md). 1 otherwise: split conversions start broken, from-scratch models are random,
    and with --train cross the added weights are all that trains."""
    cfg = model.config
    converted = str((getattr(cfg, "stag_recipe", None) or {}).get("tool", "")).startswith("stag convert")
    return SHARED_CROSS_LR_SCALE if getattr(cfg, "shared", False) and converted and train == "all" else 1.0


def added_weights(model) -> list:
    """(name, parameter, index) of what staggering added (see StagForCausalLM.added_weights); none
    for a plain transformers model."""
    found = getattr(model, "added_weights", None)
    return found() if found is not None else []


def trainable_parameters(model, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze what is not trained; return the (name, parameter) pairs that are."""
    named = list(model.named_parameters())
    if which == "cross":
        chosen = [(n, p) for n, p, index in added_weights(model) if index is None]
        if not chosen:
            raise StagError(NO_CROSS)
    else:
        chosen = named
    keep = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return chosen


def parameter_groups(trained, model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms and biases; the weights staggering added (cross-attention,
    memory norm) at lr x cross_lr_scale. Why a scale: the cross-attention output starts at zero, and
    Adam's first updates move every element of it by ~lr at once, a jolt to a converted model that
    otherwise starts at the source's quality (docs/finetune.md)."""
    whole = {name for name, _, index in added_weights(model) if index is None} if cfg.cross_lr_scale != 1 else set()
    groups: dict[tuple, list] = {}  # at scale 1: the same two groups as before the option existed
    for name, p in trained:
        no_decay = "norm" in name or name.endswith("bias")
        groups.setdefault((no_decay, name in whole), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "lr": cfg.lr * (cfg.cross_lr_scale if added else 1.0)}
            for (no_decay, added), params in sorted(groups.items())]


class PartLrScale:
    """lr x scale for PARTS of parameters (the parallel form's cross-attention rows of qkv and columns
    of o), which optimizer groups cannot express: after each step those parts are pulled back towards
    their values before it, so they move `scale` times as far as AdamW moved them."""

    def __init__(self, model, trained, scale: float):
        trained_ids = {id(p) for _, p in trained}
        self.scale = scale
        self.parts = [] if scale == 1 else [(p, index) for _, p, index in added_weights(model)
                                            if index is not None and id(p) in trained_ids]
        self.before: list[torch.Tensor] = []

    def save(self):
        self.before = [p.detach()[index].clone() for p, index in self.parts]

    def apply(self):
        for (p, index), old in zip(self.parts, self.before):
            p.detach()[index].lerp_(old, 1 - self.scale)


# --- the data stream ------------------------------------------------------------------------------
class BatchStream:
    """Which training sequences step s, micro-batch m, process r reads (see the module docstring)."""

    def __init__(self, train: torch.Tensor, batch_size: int, grad_accum: int, processes: int, seed: int):
        self.train, self.b, self.a, self.p, self.seed = train, batch_size, grad_accum, processes, seed
        self.global_batch = batch_size * grad_accum * processes
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.train), generator=gen)}  # keep one epoch
        return self._perms[epoch]

    def batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        start = (step - 1) * self.global_batch + (micro * self.p + rank) * self.b
        n = len(self.train)
        rows = [self._perm(pos // n)[pos % n] for pos in range(start, start + self.b)]
        return self.train[torch.stack(rows)]


# --- losses -----------------------------------------------------------------------------------------
def distill_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per predicted token (positions that have a next token)."""
    s = (student_logits[:, :-1].float() / temperature).log_softmax(-1).flatten(0, 1)
    t = (teacher_logits[:, :-1].float() / temperature).log_softmax(-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def heldout_loss(model, heldout: torch.Tensor, batch_size: int, accelerator, max_sequences: int) -> float:
    """Mean next-token loss over the first max_sequences held-out sequences, split over processes."""
    was_training = model.training
    model.eval()
    mine = heldout[:max_sequences][accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        ids = mine[i:i + batch_size].to(accelerator.device)
        with accelerator.autocast():
            logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(ids[:, 1:].numel(), dtype=torch.float64,
                                                          device=accelerator.device)])
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return (total[0] / total[1]).item()


# --- checkpoints ----------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one is never named step-*)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if (d / "trainer_state.json").is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def last_checkpoint(out) -> Optional[Path]:
    found = checkpoint_dirs(Path(out))
    return found[-1] if found else None


def _save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict, keep: int) -> Path:
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if final.exists():  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_final_model(model, tokenizer, out: Path, recipe: dict):
    """save_pretrained into a temporary folder, then move the files into OUT, config.json last, so a
    directory with a config.json always holds complete weights."""
    tmp = out / ".final-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.stag_recipe = recipe
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "stag_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


def _rewrite_metrics(path: Path, up_to_step: int):
    """On resume: drop rows for steps after the checkpoint (they will be recomputed)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= up_to_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in kept))
    os.replace(tmp, path)


RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints", "config.json")


def process_state():
    """Accelerate's view of the processes. cpu=True without CUDA: only then does Accelerate join the
    processes of a launcher (accelerate launch / torchrun) with the gloo backend on CPU."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


# --- the training loop ----------------------------------------------------------------------------
def finetune(model, tokenizer, cfg: TrainConfig, out_dir, teacher=None, resume: bool = False,
             report: Optional[Callable[[str, dict], None]] = None, data: Optional[PackedData] = None,
             run_info: Optional[dict] = None) -> dict:
    """Train `model` (a PreTrainedModel returning .loss/.logits, e.g. StagForCausalLM) on cfg.data and
    write the final model to out_dir. `teacher`: a model with the same vocabulary to distil from.
    `report(event, info)` is called on the main process with events start, eval, step, checkpoint, done.
    Returns a summary dict. Works unchanged under `accelerate launch` / torchrun (data parallel)."""
    from accelerate import Accelerator
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    out = Path(out_dir)
    cfg = validate(cfg, model)
    report = report or (lambda event, info: None)
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise StagError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                        f"model's ({model.config.vocab_size}): cannot distil")
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    resume_from = None
    if resume:
        resume_from = last_checkpoint(out)
        if resume_from is None:
            raise StagError(f"--resume: {out} holds no checkpoint (checkpoints/step-*) to resume from")
        saved_options = json.loads((resume_from / "trainer_state.json").read_text())["config"]
        saved_options.setdefault("cross_lr_scale", 1.0)  # runs from before the option trained at lr x 1
        saved = TrainConfig.from_dict(saved_options)
        changed = [f.name for f in dataclasses.fields(cfg)
                   if f.name not in BOOKKEEPING and getattr(cfg, f.name) != getattr(saved, f.name)]
        if changed:
            name = changed[0]
            raise StagError(f"--resume continues the saved run, but --{name.replace('_', '-')} differs "
                            f"(saved {getattr(saved, name)!r}, given {getattr(cfg, name)!r})")
    elif out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        raise StagError(f"{out} already holds a fine-tuning run; pass --resume to continue it, "
                        "or choose a new output directory")
    accelerator.wait_for_everyone()  # every process has looked at OUT before the main one writes to it

    if data is None:
        if not cfg.data:
            raise StagError("no training data: pass --data (a file, directory, glob, JSONL or corpus like kjv:train)")
        if tokenizer is None:
            raise StagError("the model has no tokenizer to read the data with; pass --tokenizer PATH")
        with accelerator.main_process_first():  # the main process tokenizes and caches, the rest read
            data = build_data(cfg.data, tokenizer, cfg.seq_len, cfg.heldout, cfg.heldout_fraction)
    if data.seq_len != cfg.seq_len:
        raise StagError(f"the given data has sequences of {data.seq_len} tokens, not --seq-len {cfg.seq_len}")
    top = int(max(data.train.max(), data.heldout.max()))
    if top >= model.config.vocab_size:
        raise StagError(f"the tokenizer produces token id {top}, beyond the model's vocabulary "
                        f"({model.config.vocab_size}): wrong tokenizer for this model?")

    if main:  # only now that the inputs are known to be good
        out.mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".tmp-step-*"):  # from a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)

    stream = BatchStream(data.train, cfg.batch_size, cfg.grad_accum, accelerator.num_processes, cfg.seed)
    tokens_per_step = stream.global_batch * cfg.seq_len
    budgets = [b for b in (cfg.max_steps, cfg.max_tokens and math.ceil(cfg.max_tokens / tokens_per_step)) if b]
    total_steps = min(budgets) if budgets else max(1, math.ceil(cfg.epochs * len(data.train) / stream.global_batch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total_steps)

    trained = trainable_parameters(model, cfg.train)
    optimizer = torch.optim.AdamW(parameter_groups(trained, model, cfg), lr=cfg.lr)
    part_lr = PartLrScale(model, trained, cfg.cross_lr_scale)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimizer step (a prepared one steps once per process).
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    trained_params = [p for _, p in trained]

    metrics_path = out / "metrics.jsonl"
    step, tokens = 0, 0
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if state["processes"] != accelerator.num_processes:
            raise StagError(f"--resume: the checkpoint was made with {state['processes']} process(es); "
                            f"resume with the same number (now {accelerator.num_processes})")
        accelerator.load_state(str(resume_from))
        step, tokens = state["step"], state["tokens"]
        if main:
            _rewrite_metrics(metrics_path, step)
    elif main:
        (out / "run.json").write_text(json.dumps({**(run_info or {}), "config": dataclasses.asdict(cfg)},
                                                 indent=2) + "\n")
        metrics_path.unlink(missing_ok=True)

    def log(row):
        if main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(row):
        loss = heldout_loss(accelerator.unwrap_model(model), data.heldout, cfg.batch_size, accelerator,
                            cfg.eval_sequences)
        row.update(heldout_loss=loss, heldout_ppl=math.exp(min(loss, 50.0)))
        if main:
            report("eval", row)

    if main:
        report("start", {"total_steps": total_steps, "step": step, "tokens_per_step": tokens_per_step,
                         "global_batch": stream.global_batch, "processes": accelerator.num_processes,
                         "train_sequences": len(data.train), "heldout_sequences": len(data.heldout),
                         "heldout_source": data.heldout_source, "device": str(accelerator.device),
                         "precision": "bf16" if use_bf16 else "fp32", "resumed_from": resume_from and str(resume_from)})
    if step == 0:
        row = {"step": 0, "tokens": 0}
        evaluate(row)
        log(row)

    def trainer_state(step, tokens):
        return {"step": step, "tokens": tokens, "total_steps": total_steps, "processes": accelerator.num_processes,
                "config": dataclasses.asdict(cfg)}

    last_saved = resume_from
    row, train_time, session_tokens = {}, 0.0, 0
    started = time.time()
    while step < total_steps:
        step += 1
        t0 = time.time()
        lr = scheduler.get_last_lr()[0]
        sums = torch.zeros(3, device=accelerator.device)  # loss, lm loss, kl
        for micro in range(cfg.grad_accum):
            ids = stream.batch(step, micro, accelerator.process_index).to(accelerator.device)
            sync = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-batch
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                out_ = model(input_ids=ids, labels=ids)
                lm_loss, loss, kl = out_.loss, out_.loss, torch.zeros((), device=accelerator.device)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(ids).logits
                    kl = distill_kl(out_.logits, teacher_logits, cfg.distill_temperature)
                    loss = (1 - cfg.distill_alpha) * lm_loss + cfg.distill_alpha * kl
                accelerator.backward(loss / cfg.grad_accum)
            sums += torch.stack([loss.detach().float(), lm_loss.detach().float(), kl.detach().float()])
        sums = accelerator.reduce(sums / cfg.grad_accum, "mean")
        grad_norm = accelerator.clip_grad_norm_(trained_params, cfg.grad_clip)
        if not (torch.isfinite(sums).all() and torch.isfinite(grad_norm)):
            kept = (f"the last good checkpoint is {last_saved} (continue with --resume)" if last_saved
                    else "no checkpoint had been saved yet")
            raise StagError(f"loss became NaN/inf at step {step}: training stopped; {kept}")
        part_lr.save()
        optimizer.step()
        part_lr.apply()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += tokens_per_step
        session_tokens += tokens_per_step
        train_time += time.time() - t0
        row = {"step": step, "tokens": tokens, "loss": sums[0].item(), "lr": lr, "grad_norm": grad_norm.item(),
               "tokens_per_s": session_tokens / train_time, "elapsed_s": round(time.time() - started, 3)}
        if teacher is not None:
            row.update(lm_loss=sums[1].item(), kl_loss=sums[2].item())
        if step % cfg.eval_every == 0 or step == total_steps:
            evaluate(row)
        log(row)
        if main:
            report("step", row)
        if step % cfg.save_every == 0 or step == total_steps:
            last_saved = _save_checkpoint(accelerator, out, step, trainer_state(step, tokens), cfg.keep_checkpoints)
            if main:
                report("checkpoint", {"step": step, "path": str(last_saved)})

    summary = {"out": str(out), "steps": step, "total_steps": total_steps, "tokens": tokens,
               "global_batch": stream.global_batch, "seq_len": cfg.seq_len, "processes": accelerator.num_processes,
               "train_sequences": len(data.train), "heldout_sequences": len(data.heldout),
               "heldout_source": data.heldout_source, "final_loss": row.get("loss"),
               "heldout_loss": row.get("heldout_loss"), "heldout_ppl": row.get("heldout_ppl"),
               "tokens_per_s": session_tokens / train_time if train_time else None}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.gradient_checkpointing = False
        recipe = dict(getattr(unwrapped.config, "stag_recipe", None) or {})
        recipe["finetune"] = {**{k: v for k, v in summary.items() if k not in ("out", "tokens_per_s")},
                              **(run_info or {}), "config": dataclasses.asdict(cfg)}
        _write_final_model(unwrapped, tokenizer, out, recipe)
        report("done", summary)
    accelerator.wait_for_everyone()
    return summary


# --- from paths, and recipes --------------------------------------------------------------------
def finetune_paths(model_path: str, out_dir, cfg: TrainConfig, resume: bool = False, report=None,
                   tokenizer_path: Optional[str] = None) -> dict:
    """Load MODEL (a stag directory, or a plain checkpoint / .gguf / alias: trained as 1 section, the
    control), the teacher named by cfg.distill_from, and train."""
    from transformers import AutoTokenizer

    from .convert import load_model
    model, tokenizer = load_model(model_path)
    if tokenizer_path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as err:
            raise StagError(f"cannot load a tokenizer from {tokenizer_path}: {type(err).__name__}") from err
    teacher = load_model(cfg.distill_from)[0] if cfg.distill_from else None
    run_info = {"model": str(model_path), "teacher": cfg.distill_from}
    return finetune(model, tokenizer, cfg, out_dir, teacher=teacher, resume=resume, report=report,
                    run_info=run_info)


def saved_run_options(out_dir) -> dict:
    """The TrainConfig values and model path a run in OUT was started with (for --resume)."""
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        return {}
    run = json.loads(path.read_text())
    return {"model": run.get("model"), "config": run.get("config", {})}


RECIPE_KEYS = {"name", "description", "model", "convert", "finetune"}
CONVERT_KEYS = {"source", "sections", "mode", "window", "init", "cross_attn", "dtype", "out"}


def load_recipe(path) -> dict:
    """A YAML recipe: `convert:` (stag convert options + optional `out`) or `model:`, and `finetune:`
    (TrainConfig fields). Checked here so that mistakes fail before any work."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise StagError(f"recipe not found: {path}")
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StagError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict) or set(recipe) - RECIPE_KEYS:
        raise StagError(f"recipe {path}: unknown top-level keys "
                        f"{sorted(set(recipe) - RECIPE_KEYS) if isinstance(recipe, dict) else recipe!r}; "
                        f"known: {', '.join(sorted(RECIPE_KEYS))}")
    convert = recipe.get("convert") or {}
    if set(convert) - CONVERT_KEYS:
        raise StagError(f"recipe {path}: unknown convert keys {sorted(set(convert) - CONVERT_KEYS)}; "
                        f"known: {', '.join(sorted(CONVERT_KEYS))}")
    if convert and "source" not in convert:
        raise StagError(f"recipe {path}: convert needs a source")
    TrainConfig.from_dict(recipe.get("finetune") or {}, where=f"recipe {path}")  # fail early on typos
    return recipe


def recipe_model(recipe: dict, out_dir, report=None) -> Optional[str]:
    """The model a recipe trains: its `model`, or the output of its `convert` step (run once, on the
    main process; reused when it already exists, e.g. on --resume)."""
    convert = dict(recipe.get("convert") or {})
    if not convert:
        return recipe.get("model")
    target = Path(convert.pop("out", None) or Path(out_dir) / "converted")
    source = convert.pop("source")
    state = process_state()
    with state.main_process_first():
        if state.is_main_process and not (target / "config.json").is_file():
            from .convert import convert as run_convert
            if report:
                report("convert", {"source": source, "out": str(target)})
            run_convert(str(source), str(target), **convert)
    return str(target)
