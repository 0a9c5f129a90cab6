"""Fine-tuning on Hugging Face Accelerate, as a recipe class (torchtune style): `FineTune` with
setup / step / evaluate / save / finish, losses as objects (losses.py), callbacks for progress.
`finetune()` runs one on an in-memory model; `finetune_paths()` loads the model (staggered or
plain) and the teacher from disk first.

One optimizer step consumes a global batch of batch_size x grad_accum x processes packed sequences.
Their positions in the data stream are a pure function of (seed, step): the stream is the training
sequences in a fresh seeded permutation per epoch, and step s takes positions [(s-1)G, sG). So the
step number IS the data position, a 2-process run sees exactly the sequences a 1-process run with
the same global batch sees, and a resumed run continues bit-for-bit.

Speed and memory: bf16 autocast wherever the hardware multiplies bf16 natively (GPUs, and CPUs
with AVX512-BF16 or AMX), master weights and optimizer state in fp32; the teacher in bf16 under
no_grad; the LM loss and the distillation KL computed chunk by chunk from the final hidden states,
so no full [batch, length, vocab] logits exist (losses.HeadLoss).

Layout of OUT:
    run.json                     how the run was started (model, teacher, TrainConfig)
    metrics.jsonl                one row per step (+ held-out loss/perplexity when evaluated)
    checkpoints/step-00000200/   Accelerate state (model, optimizer, scheduler, RNG per process)
                                 + trainer_state.json; written under a temporary name, then renamed
    config.json, model.safetensors, tokenizer files, stag_recipe.json   the final model
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .data import HELDOUT_FRACTION, PackedData, build_data
from .errors import StagError
from .files import move_into, publish, remove, scratch_dir, write_json, write_text
from .losses import Batch, HeadLoss, HiddenStateLoss, lm_loss_sum
from .options import check_choices, from_dict, option

SHARED_CROSS_LR_SCALE = 0.1  # measured on SmolLM2 (docs/finetune.md): 1 wrecks the start, 0.1 does not
DEFAULT_SEQ_LEN = 512
NO_CROSS = ("--train cross: this model has no cross-attention (a plain, unconverted model or one section); "
            "use --train all")
FUSED_CROSS = ("--train cross: this model's cross-attention (--cross-attn parallel) shares its qkv and o weights "
               "with self-attention; use --train all, with --cross-lr-scale to slow the added parts")
H_DATA = ("Training text: a corpus name (kjv:train), a file, a directory (all files under it), a glob, "
          "or JSONL with a 'text' field. Repeat or comma-separate for several. Tokenized once and cached "
          "under $STAG_CACHE/tokenized, packed into --seq-len sequences.")


@dataclass
class TrainConfig:
    data: list = option([], H_DATA, flags=("--data", "-d"))
    heldout: Optional[list] = option(None, "Held-out text (same kinds as --data), never trained on. Default: "
                                           "the last --heldout-fraction of the packed --data sequences.")
    balance_data: bool = option(False, "Take the same number of sequences from every --data source (as many as the "
                                       "smallest gives, spread evenly through each), so a small source is not drowned "
                                       "out by a large one (e.g. the source's own samples beside KJV).")
    heldout_fraction: float = option(HELDOUT_FRACTION, "Share of packed sequences held out when no --heldout "
                                                       "is given.")
    seq_len: Optional[int] = option(None, "Tokens per packed sequence; at most the model's max_positions.",
                                    default_text="min(512, max_positions)")
    batch_size: int = option(8, "Sequences per micro-batch per process.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    lr: float = option(3e-4, "Peak AdamW learning rate.")
    min_lr_ratio: float = option(0.1, "Cosine decay ends at lr x this.")
    warmup_steps: Optional[int] = option(None, "Linear warmup steps.", default_text="5% of the steps")
    weight_decay: float = option(0.01, "AdamW weight decay, not applied to norms and biases.")
    grad_clip: float = option(1.0, "Clip the gradient norm to this.")
    max_steps: Optional[int] = option(None, "Stop after this many optimizer steps.")
    max_tokens: Optional[int] = option(None, "Token budget (global batch x seq-len per step); with "
                                             "--max-steps the smaller wins.")
    epochs: float = option(1.0, "Passes over the data when neither --max-steps nor --max-tokens is given.")
    max_minutes: Optional[float] = option(None, "Stop (and write the final model) once this many minutes of "
                                                "training have passed in this session, whatever budget is left.")
    train: str = option("all", "all: train every weight. cross: train only what staggering added "
                               "(cross-attention, memory norm, bridge; not for --cross-attn parallel models). "
                               "bridge: only the bridge (a model converted with --bridge; on a verify model through its "
                               "drafts, e.g. to retune it after fine-tuning the model: --distill-from the model "
                               "itself --distill-alpha 1).",
                        choices=("all", "cross", "bridge"))
    objective: str = option("lm", "lm: the next-token loss, (1-alpha) LM + alpha KL when distilling. bridge: only "
                                  "the bridges, regressed onto the source's residual stream at each section "
                                  "boundary (cheap: the model runs forward only, without gradients). lm+bridge: "
                                  "both, the regression weighted by --bridge-weight.",
                            choices=("lm", "bridge", "lm+bridge"))
    bridge_weight: float = option(1.0, "Weight of the bridge regression in --objective lm+bridge.")
    hidden_weight: float = option(0.0, "Hidden-state distillation: add this x the mean squared distance between "
                                       "the last section's output and the teacher's final residual stream "
                                       "(relative to the latter's mean square). Needs --distill-from.")
    cross_lr_scale: Optional[float] = option(
        None, "Learning-rate multiplier for the weights staggering added (cross-attention, memory norm). Below 1 "
              "it keeps Adam's first steps on the zero-initialised cross-attention output from jolting a model "
              "that starts at the source's quality (shared mode); 0 freezes them.",
        default_text="0.1 for converted shared-weights models, 1 otherwise")
    gradient_checkpointing: Optional[bool] = option(
        None, "Recompute activations per block in the backward pass: far less memory; on a CPU it is also "
              "faster (fewer page faults), on a GPU ~30% slower (docs/finetune.md).",
        default_text="on for CPU training, off on GPUs")
    compile: bool = option(False, "torch.compile each block for training (fuses its elementwise work): ~8% more "
                                  "tokens/s on the 2-core CPU after ~30 s of compiling; worth it for runs of "
                                  "more than a few minutes.")
    lean_memory: bool = option(False, "Return freed memory to the OS at once (glibc's malloc on Linux): a lower "
                                      "peak resident memory (SmolLM2 distillation on the 2-core CPU: 3.5 instead "
                                      "of 4.6 GB) for ~35% fewer tokens/s.")
    distill_from: Optional[str] = option(None, "Teacher (e.g. the unconverted source model): add the KL "
                                               "divergence to its logits to the LM loss.")
    distill_alpha: float = option(0.5, "loss = (1-alpha) LM + alpha KL.")
    distill_temperature: float = option(1.0, "Softmax temperature T of the KL term, scaled by T^2.")
    save_every: int = option(200, "Checkpoint every N steps (and at the end).")
    save_every_minutes: float = option(15.0, "Also checkpoint when this many minutes have passed since the "
                                             "last save (0: only every N steps).")
    keep_checkpoints: int = option(1, "Checkpoints kept on disk.")
    eval_every: int = option(100, "Held-out perplexity every N steps (and at the start and end).")
    eval_sequences: int = option(64, "Held-out sequences per evaluation (a fixed prefix).")
    precision: str = option("auto", "auto: bf16 mixed precision where the hardware multiplies bf16 natively "
                                    "(GPUs; CPUs with AVX512-BF16 or AMX), else fp32. bf16 / fp32 force it.",
                            choices=("auto", "bf16", "fp32"))
    seed: int = option(0, "Seed of the data order.")

    @classmethod
    def from_dict(cls, values: dict, where: str = "options") -> "TrainConfig":
        """Build from loose values (YAML, JSON, CLI), converting types; unknown keys are an error."""
        return from_dict(cls, values, where, what="finetune option")


# Options that do not change which weights come out; everything else must match on --resume.
BOOKKEEPING = {"max_minutes", "save_every", "save_every_minutes", "keep_checkpoints", "eval_every", "eval_sequences", "lean_memory",
               "gradient_checkpointing", "compile"}


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
    if cfg.lr <= 0 or cfg.epochs <= 0 or cfg.save_every_minutes < 0:
        raise StagError("--lr and --epochs must be > 0, --save-every-minutes >= 0")
    if cfg.cross_lr_scale is None:
        cfg = dataclasses.replace(cfg, cross_lr_scale=default_cross_lr_scale(model, cfg.train))
    if cfg.gradient_checkpointing is None:  # measured: faster AND leaner on CPUs (docs/finetune.md)
        cfg = dataclasses.replace(cfg, gradient_checkpointing=not torch.cuda.is_available())
    if cfg.cross_lr_scale < 0:
        raise StagError(f"--cross-lr-scale must be >= 0, not {cfg.cross_lr_scale}")
    check_choices(cfg)
    section_input = getattr(model, "section_input", None)
    bridged = section_input is not None and any(True for _ in section_input.parameters())
    if (cfg.train == "bridge" or "bridge" in cfg.objective) and not bridged:
        raise StagError("--train bridge / --objective bridge: this model has no learned bridge "
                        "(convert it with --bridge ridge, mlp or attn)")
    if cfg.objective == "bridge" and cfg.train != "bridge":  # only the bridge has a gradient anyway
        cfg = dataclasses.replace(cfg, train="bridge")
    if cfg.hidden_weight and not cfg.distill_from:
        raise StagError("--hidden-weight distils hidden states: give --distill-from TEACHER")
    if cfg.train == "cross":
        added = added_weights(model)
        if not added:
            raise StagError(NO_CROSS)
        if any(index is not None for _, _, index in added):
            raise StagError(FUSED_CROSS)
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


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 or AMX): there bf16 autocast is ~2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and (torch.cuda.is_available() or cpu_has_bf16()))


# --- what trains, and how fast ------------------------------------------------------------------
def added_weights(model) -> list:
    """(name, parameter, index) of what staggering added (see StagForCausalLM.added_weights); none
    for a plain transformers model."""
    found = getattr(model, "added_weights", None)
    return found() if found is not None else []


def trainable_parameters(model, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze what is not trained; return the (name, parameter) pairs that are."""
    named = list(model.named_parameters())
    if which == "bridge":  # the bridge, less what was fitted in closed form (section_input.MLP.fitted)
        fitted = tuple(f"section_input.{name}." for name in getattr(model.section_input, "fitted", ()))
        chosen = [(n, p) for n, p in named if n.startswith("section_input.") and not n.startswith(fitted)]
    elif which == "cross":
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
    """AdamW groups: no weight decay on norms and biases; the weights staggering added at
    lr x cross_lr_scale. Why a scale: the cross-attention output starts at zero, and Adam's first
    updates move every element of it by ~lr at once, a jolt to a converted model that otherwise
    starts at the source's quality (docs/finetune.md)."""
    whole = {name for name, _, index in added_weights(model) if index is None} if cfg.cross_lr_scale != 1 else set()
    groups: dict[tuple, list] = {}  # at scale 1: the same two groups as before the option existed
    for name, p in trained:
        no_decay = "norm" in name or name.endswith("bias")
        groups.setdefault((no_decay, name in whole), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
             "lr": cfg.lr * (cfg.cross_lr_scale if added else 1.0)}
            for (no_decay, added), params in sorted(groups.items())]


class PartLrScale:
    """lr x scale for PARTS of parameters (a form that lives inside the source's qkv and o), which
    optimizer groups cannot express: after each step those parts are pulled back towards their
    values before it, so they move `scale` times as far as AdamW moved them."""

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


def release_freed_memory():
    """glibc keeps freed memory for reuse (fast, but the process stays at its high-water mark plus
    fragmentation); these settings hand large freed blocks back to the OS at once."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False  # not glibc: nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 4 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 4 << 20))


def peak_memory_mb(device) -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else resident memory (RSS)."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


# --- checkpoints and the run directory ------------------------------------------------------------
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


RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints", "config.json")


def holds_run(out: Path) -> bool:
    return Path(out).is_dir() and any((Path(out) / m).exists() for m in RUN_MARKERS)


def process_state():
    """Accelerate's view of the processes. cpu=True without CUDA: only then does Accelerate join the
    processes of a launcher (accelerate launch / torchrun) with the gloo backend on CPU."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


@torch.no_grad()
def nll_totals(model, ids, batch_size: int, autocast=contextlib.nullcontext, on_batch=None) -> torch.Tensor:
    """[summed next-token NLL, predicted tokens] (float64) of sequences ids [N, T], batch by batch."""
    device = model.get_input_embeddings().weight.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for n, i in enumerate(range(0, len(ids), batch_size), 1):
        batch = ids[i:i + batch_size].to(device)
        with autocast():
            loss_sum, count = lm_loss_sum(*hidden_and_head(model, batch), batch)
        total += torch.stack([loss_sum.double(), torch.tensor(count, dtype=torch.float64, device=device)])
        if on_batch is not None:
            on_batch(n)
    return total


def perplexity(model, ids, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of sequences ids [N, T], in eval mode."""
    total = nll_totals(model.eval(), ids, batch_size)
    return math.exp((total[0] / total[1]).item())


def unwrapped_head(model):
    """The output head weight [V, d] of a model, DDP-wrapped or not."""
    return getattr(model, "module", model).get_output_embeddings().weight


def hidden_and_head(model, ids):
    """Final (normed) hidden states [B, T, d] and the output head weight [V, d], for stag models and
    transformers' causal LMs alike. Goes through the model's own forward (DDP needs that); logits
    only for the last position (logits_to_keep=1), the rest is the losses' job."""
    out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1], unwrapped_head(model)


# --- the recipe -----------------------------------------------------------------------------------
class Callback:
    """Progress hooks of a FineTune (all optional). Raising from one stops the run, as a kill would."""

    def on_phase(self, text: str): ...
    def on_start(self, info: dict): ...
    def on_eval_start(self, batches: int): ...
    def on_eval_batch(self, done: int): ...
    def on_eval(self, row: dict): ...
    def on_step(self, row: dict): ...
    def on_checkpoint(self, step: int, path: Path): ...
    def on_finish(self, summary: dict): ...


class FineTune:
    """Train `model` (a StagForCausalLM, or any transformers causal LM) on cfg.data and write the
    final model to out_dir. `teacher`: a model with the same vocabulary to distil from. Works
    unchanged under `accelerate launch` / torchrun (data parallel)."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, out_dir, teacher=None, resume: bool = False,
                 force: bool = False, callbacks=(), data: Optional[PackedData] = None,
                 run_info: Optional[dict] = None):
        self.model, self.tokenizer, self.cfg, self.out = model, tokenizer, cfg, Path(out_dir)
        self.teacher, self.resume, self.force, self.data, self.run_info = teacher, resume, force, data, run_info or {}
        self.callbacks = list(callbacks)
        self.loss = None
        self.extra_losses = []
        self.step_no = self.tokens = 0
        self.last_saved: Optional[Path] = None

    def emit(self, event: str, *args):
        if self.main:
            for cb in self.callbacks:
                getattr(cb, event)(*args)

    # --- setup ------------------------------------------------------------------------------------
    def setup(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import AutocastKwargs
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        cfg = self.cfg = validate(self.cfg, self.model)
        model, teacher = self.model, self.teacher
        if cfg.lean_memory:
            release_freed_memory()
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise StagError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                            f"model's ({model.config.vocab_size}): cannot distil")
        self.bf16 = use_bf16(cfg.precision)
        # Accelerate keeps one precision per process; a later run in the same process (tests, stag
        # experiment) may want another. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = acc = Accelerator(mixed_precision="bf16" if self.bf16 else "no",
                                             cpu=not torch.cuda.is_available())
        self.main = acc.is_main_process
        # lean: no cache of bf16 weight copies (a model-sized buffer): each use casts again, ~2% slower
        self.autocast = lambda: acc.autocast(AutocastKwargs(cache_enabled=not cfg.lean_memory))
        self.resume_from = self._check_out_dir()
        acc.wait_for_everyone()  # every process has looked at OUT before the main one writes to it
        self._load_data()
        if self.main:  # only now that the inputs are known to be good
            if self.force and not self.resume and holds_run(self.out):
                for old in [*RUN_MARKERS, "stag_recipe.json", *(f.name for f in self.out.glob("*.safetensors"))]:
                    remove(self.out / old)
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in (self.out / "checkpoints").glob(".tmp-step-*"):  # a save killed midway
                remove(stale)

        self.stream = BatchStream(self.data.train, cfg.batch_size, cfg.grad_accum, acc.num_processes, cfg.seed)
        self.tokens_per_step = self.stream.global_batch * cfg.seq_len
        budgets = [b for b in (cfg.max_steps, cfg.max_tokens and math.ceil(cfg.max_tokens / self.tokens_per_step)) if b]
        self.total_steps = min(budgets) if budgets else max(
            1, math.ceil(cfg.epochs * len(self.data.train) / self.stream.global_batch))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * self.total_steps)

        self.trained = trainable_parameters(model, cfg.train)
        # A verify model's forward is the source's exact computation, which no bridge enters: its bridge
        # trains (and is scored) through the drafts, the rows verification accepts or rejects
        if getattr(model.config, "verified", False) and cfg.train == "bridge" and cfg.objective != "bridge":
            model.score_drafts = True
        # fused: one kernel per step, without foreach's parameter-sized temporaries (a peak-memory spike)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.trained, model, cfg), lr=cfg.lr,
                                           fused=model.device.type in ("cpu", "cuda"))
        self.part_lr = PartLrScale(model, self.trained, cfg.cross_lr_scale)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(self.optimizer, warmup, self.total_steps,
                                                                     min_lr_rate=cfg.min_lr_ratio)
        if hasattr(model, "gradient_checkpointing") and not callable(model.gradient_checkpointing):
            model.gradient_checkpointing = cfg.gradient_checkpointing
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compiled = compile_blocks(model) if cfg.compile else []
        model.train()
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        # The scheduler is stepped by hand once per optimizer step (a prepared one steps once per process).
        acc.register_for_checkpointing(self.scheduler)
        if teacher is not None:
            self.teacher = teacher_for(teacher.to(acc.device), self.bf16)
        self.loss = HeadLoss(cfg.distill_alpha if teacher is not None else 0.0, cfg.distill_temperature)
        self.extra_losses = [HiddenStateLoss(cfg.hidden_weight)] if cfg.hidden_weight else []
        self.metrics_path = self.out / "metrics.jsonl"
        if self.resume_from is not None:
            state = json.loads((self.resume_from / "trainer_state.json").read_text())
            if state["processes"] != acc.num_processes:
                raise StagError(f"--resume: the checkpoint was made with {state['processes']} process(es); "
                                f"resume with the same number (now {acc.num_processes})")
            acc.load_state(str(self.resume_from))
            self.step_no, self.tokens = state["step"], state["tokens"]
            if self.main:
                self._rewrite_metrics(self.step_no)
        elif self.main:
            write_json(self.out / "run.json", {**self.run_info, "config": dataclasses.asdict(cfg)})
            self.metrics_path.unlink(missing_ok=True)
        self.last_saved = self.resume_from

    def _check_out_dir(self) -> Optional[Path]:
        """The checkpoint to resume from (None: start fresh), or a StagError for an OUT in the way."""
        out, cfg = self.out, self.cfg
        if self.resume:
            found = last_checkpoint(out)
            if found is None:
                if not (out / "run.json").is_file():
                    raise StagError(f"--resume: {out} holds no checkpoint (checkpoints/step-*) to resume from")
                self.emit("on_phase", f"{out} was stopped before its first checkpoint: starting it over")
                self.force = True  # nothing to resume: the run starts over in the same directory
                self.resume = False
                return None
            saved_options = json.loads((found / "trainer_state.json").read_text())["config"]
            saved_options.setdefault("cross_lr_scale", 1.0)  # runs from before the option trained at lr x 1
            saved = TrainConfig.from_dict({k: v for k, v in saved_options.items()
                                           if k in {f.name for f in dataclasses.fields(TrainConfig)}})
            changed = [f.name for f in dataclasses.fields(cfg)
                       if f.name not in BOOKKEEPING and getattr(cfg, f.name) != getattr(saved, f.name)]
            if changed:
                name = changed[0]
                raise StagError(f"--resume continues the saved run, but --{name.replace('_', '-')} differs "
                                f"(saved {getattr(saved, name)!r}, given {getattr(cfg, name)!r})")
            return found
        if holds_run(out) and not self.force:
            raise StagError(f"{out} already holds a fine-tuning run; pass --resume to continue it, "
                            "--force to start it over, or choose a new output directory")
        if out.exists() and not out.is_dir():
            raise StagError(f"{out} exists and is not a directory")
        return None

    def _load_data(self):
        if self.data is None:
            cfg = self.cfg
            if not cfg.data:
                raise StagError("no training data: pass --data (a file, directory, glob, JSONL or corpus like kjv:train)")
            if self.tokenizer is None:
                raise StagError("the model has no tokenizer to read the data with; pass --tokenizer PATH")
            self.emit("on_phase", "reading and tokenizing the data")
            with self.accelerator.main_process_first():  # the main process tokenizes and caches, the rest read
                self.data = build_data(cfg.data, self.tokenizer, cfg.seq_len, cfg.heldout, cfg.heldout_fraction,
                                       balance=cfg.balance_data)
        data = self.data
        if data.seq_len != self.cfg.seq_len:
            raise StagError(f"the given data has sequences of {data.seq_len} tokens, not --seq-len {self.cfg.seq_len}")
        top = int(max(data.train.max(), data.heldout.max()))
        if top >= self.model.config.vocab_size:
            raise StagError(f"the tokenizer produces token id {top}, beyond the model's vocabulary "
                            f"({self.model.config.vocab_size}): wrong tokenizer for this model?")

    # --- the pieces of a run ----------------------------------------------------------------------
    def losses(self, ids):
        """(objective, {term: value}) for one micro-batch."""
        cfg, terms, total = self.cfg, {}, 0.0
        if "bridge" in cfg.objective:  # through the model's forward (data-parallel sync)
            mse = self.model(input_ids=ids, bridge_errors=True).loss.mean()
            terms["bridge_mse"] = mse.detach()
            total = mse * (cfg.bridge_weight if cfg.objective == "lm+bridge" else 1.0)
            if cfg.objective == "bridge":
                return total, terms
        out = self.model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
        batch = Batch(ids, out.hidden_states[-1], unwrapped_head(self.model), residual=out.hidden_states[0])
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
            batch.teacher_hidden, batch.teacher_head = t_out.hidden_states[-1], unwrapped_head(self.teacher)
            batch.teacher_residual = t_out.hidden_states[0]
        for loss in [self.loss, *self.extra_losses]:
            value, named = loss(batch)
            total, terms = total + value, {**terms, **named}
        return total, terms

    def step(self) -> dict:
        """One optimizer step; returns its metrics row."""
        acc, cfg = self.accelerator, self.cfg
        self.step_no += 1
        t0 = time.time()
        lr = self.scheduler.get_last_lr()[0]
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            ids = self.stream.batch(self.step_no, micro, acc.process_index).to(acc.device)
            sync = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-batch
            with (contextlib.nullcontext() if sync else acc.no_sync(self.model)), self.autocast():
                total, terms = self.losses(ids)
                acc.backward(total / cfg.grad_accum)
            for name, value in {"loss": total, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach().float() / cfg.grad_accum
        names = list(sums)
        reduced = acc.reduce(torch.stack([sums[n] for n in names]), "mean")
        grad_norm = acc.clip_grad_norm_([p for _, p in self.trained], cfg.grad_clip)
        if not (torch.isfinite(reduced).all() and torch.isfinite(grad_norm)):
            kept = (f"the last good checkpoint is {self.last_saved} (continue with --resume)" if self.last_saved
                    else "no checkpoint had been saved yet")
            raise StagError(f"loss became NaN/inf at step {self.step_no}: training stopped; {kept}")
        self.part_lr.save()
        self.optimizer.step()
        self.part_lr.apply()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens += self.tokens_per_step
        self.session_tokens += self.tokens_per_step
        self.train_time += time.time() - t0
        row = {"step": self.step_no, "tokens": self.tokens, "lr": lr, "grad_norm": grad_norm.item(),
               **{n: v.item() for n, v in zip(names, reduced)},
               "tokens_per_s": self.session_tokens / self.train_time, "elapsed_s": round(time.time() - self.started, 3),
               "peak_memory_mb": round(peak_memory_mb(acc.device), 1)}
        if self.teacher is None:
            row.pop("lm_loss", None)  # the loss IS the LM loss
        return row

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the first eval_sequences held-out sequences, split over processes."""
        acc, cfg = self.accelerator, self.cfg
        model = acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        mine = self.data.heldout[:cfg.eval_sequences][acc.process_index::acc.num_processes]
        self.emit("on_eval_start", math.ceil(len(mine) / cfg.batch_size))
        total = nll_totals(model, mine, cfg.batch_size, self.autocast, lambda n: self.emit("on_eval_batch", n))
        total = acc.reduce(total, "sum")
        model.train(was_training)
        return (total[0] / total[1]).item()

    def save(self) -> Path:
        """A checkpoint of everything needed to continue bit-for-bit."""
        acc = self.accelerator
        root = self.out / "checkpoints"
        final, tmp = root / f"step-{self.step_no:08d}", root / f".tmp-step-{self.step_no:08d}"  # same name on every process
        if self.main:
            remove(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every process writes its own RNG state
        acc.wait_for_everyone()
        if self.main:
            write_json(tmp / "trainer_state.json", {
                "step": self.step_no, "tokens": self.tokens, "total_steps": self.total_steps,
                "processes": acc.num_processes, "config": dataclasses.asdict(self.cfg)})
            publish(tmp, final, replace=True)  # re-saving the same step after a resume replaces it
            for old in checkpoint_dirs(self.out)[:-self.cfg.keep_checkpoints]:
                remove(old)
        acc.wait_for_everyone()
        self.last_saved, self.last_save_time = final, time.time()
        self.emit("on_checkpoint", self.step_no, final)
        return final

    def finish(self) -> dict:
        """Write the final model (config.json last: a directory with one holds complete weights)."""
        acc, cfg = self.accelerator, self.cfg
        summary = {"out": str(self.out), "steps": self.step_no, "total_steps": self.total_steps, "tokens": self.tokens,
                   "global_batch": self.stream.global_batch, "seq_len": cfg.seq_len, "processes": acc.num_processes,
                   "train_sequences": len(self.data.train), "heldout_sequences": len(self.data.heldout),
                   "heldout_source": self.data.heldout_source, "final_loss": self.row.get("loss"),
                   "heldout_loss": self.row.get("heldout_loss"), "heldout_ppl": self.row.get("heldout_ppl"),
                   "precision": "bf16" if self.bf16 else "fp32",
                   "tokens_per_s": self.session_tokens / self.train_time if self.train_time else None,
                   "peak_memory_mb": round(peak_memory_mb(acc.device), 1)}
        model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)  # drops the autocast forward wrapper
        for block in self.compiled:  # the model leaves as it came: eager
            del block.forward
        if self.main:
            if hasattr(model, "gradient_checkpointing") and not callable(model.gradient_checkpointing):
                model.gradient_checkpointing = False
            recipe = dict(getattr(model.config, "stag_recipe", None) or {})
            recipe["finetune"] = {**{k: v for k, v in summary.items() if k not in ("out", "tokens_per_s", "peak_memory_mb")},
                                  **self.run_info, "config": dataclasses.asdict(cfg)}
            self.emit("on_phase", "writing the final model")
            write_final_model(model, self.tokenizer, self.out, recipe)
            self.emit("on_finish", summary)
        acc.wait_for_everyone()
        return summary

    # --- the loop ---------------------------------------------------------------------------------
    def log(self, row: dict):
        if self.main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate_into(self, row: dict):
        loss = self.evaluate()
        row.update(heldout_loss=loss, heldout_ppl=math.exp(min(loss, 50.0)))
        self.emit("on_eval", row)

    def run(self) -> dict:
        self.setup()
        cfg = self.cfg
        self.emit("on_start", {
            "total_steps": self.total_steps, "step": self.step_no, "tokens_per_step": self.tokens_per_step,
            "global_batch": self.stream.global_batch, "processes": self.accelerator.num_processes,
            "train_sequences": len(self.data.train), "heldout_sequences": len(self.data.heldout),
            "heldout_source": self.data.heldout_source, "device": str(self.accelerator.device),
            "precision": "bf16" if self.bf16 else "fp32", "max_minutes": cfg.max_minutes,
            "resumed_from": self.resume_from and str(self.resume_from)})
        self.row, self.train_time, self.session_tokens = {}, 0.0, 0
        self.started = self.last_save_time = time.time()
        if self.step_no == 0:
            row = {"step": 0, "tokens": 0}
            self.evaluate_into(row)
            self.log(row)
        while self.step_no < self.total_steps:
            self.row = row = self.step()
            out_of_time = bool(cfg.max_minutes) and self._agreed(time.time() - self.started >= 60 * cfg.max_minutes)
            done = self.step_no == self.total_steps or out_of_time
            if self.step_no % cfg.eval_every == 0 or done:
                self.evaluate_into(row)
            self.log(row)
            self.emit("on_step", row)
            overdue = cfg.save_every_minutes and time.time() - self.last_save_time >= 60 * cfg.save_every_minutes
            if self.step_no % cfg.save_every == 0 or done or self._agreed(overdue):
                self.save()
            if out_of_time:
                break
        return self.finish()

    def _agreed(self, flag: bool) -> bool:
        """The main process's decision, on every process (a time-based save must happen everywhere)."""
        if self.accelerator.num_processes == 1:
            return bool(flag)
        decision = torch.tensor([float(bool(flag))], device=self.accelerator.device)
        return bool(self.accelerator.reduce(decision, "max").item())

    def _rewrite_metrics(self, up_to_step: int):
        """On resume: drop rows for steps after the checkpoint (they will be recomputed)."""
        if not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        write_text(self.metrics_path, "".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= up_to_step))


def compile_blocks(model) -> list:
    """torch.compile the forward of every stag Block (the same code at every depth: one compile)."""
    from .model import Block
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = _compiled_or_eager(block)
    return blocks


def _compiled_or_eager(block):
    """The block's forward through torch.compile; where compiling fails (no C++ compiler, an
    unsupported op) it warns once and runs eagerly from then on."""
    import warnings
    compiled = torch.compile(block.forward, dynamic=False)
    # how non-reentrant checkpointing ends a recomputation early: control flow, not a failure
    control_flow = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())

    def forward(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except control_flow:
            raise
        except Exception as err:  # noqa: BLE001  (a compiler problem must not stop training)
            warnings.warn(f"--compile failed ({type(err).__name__}: {str(err)[:120]}); training eagerly")
            del block.forward
            return block.forward(*args, **kwargs)
    return forward


def teacher_for(teacher, bf16: bool):
    """The frozen teacher, ready to run under the student's autocast. With bf16, its matrices are
    stored in bf16 (half the memory, no cast per forward) while embeddings and norms stay fp32, so
    its residual stream is fp32 as the student's: exactly the numbers autocast would give the fp32
    teacher, and a student equal to its teacher (a shared conversion) gets KL ~ 0, not rounding noise."""
    from .layers import StackedLinear
    teacher = teacher.eval().requires_grad_(False)
    if bf16:
        for module in teacher.modules():
            if isinstance(module, (StackedLinear, torch.nn.Linear)) and module is not teacher.get_output_embeddings():
                module.weight.data = module.weight.data.to(torch.bfloat16)  # biases stay fp32, as autocast adds them
    return teacher


def write_final_model(model, tokenizer, out: Path, recipe: dict):
    """save_pretrained into a temporary folder, then move the files into OUT, config.json last, so a
    directory with a config.json always holds complete weights."""
    with scratch_dir(out / "final-model") as tmp:
        model.config.stag_recipe = recipe
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "stag_recipe.json", recipe)
        move_into(tmp, out)


def finetune(model, tokenizer, cfg: TrainConfig, out_dir, teacher=None, resume: bool = False, force: bool = False,
             callbacks=(), data: Optional[PackedData] = None, run_info: Optional[dict] = None) -> dict:
    """Run a FineTune; returns its summary."""
    return FineTune(model, tokenizer, cfg, out_dir, teacher, resume, force, callbacks, data, run_info).run()


def finetune_paths(model_path: str, out_dir, cfg: TrainConfig, resume: bool = False, force: bool = False,
                   callbacks=(), tokenizer_path: Optional[str] = None) -> dict:
    """Load MODEL (a stag directory, or a plain checkpoint / .gguf / alias: trained as 1 section, the
    control), the teacher named by cfg.distill_from, and train."""
    from transformers import AutoTokenizer

    from .convert import load_model, writable_parent
    writable_parent(Path(out_dir) / "run.json")  # before minutes of loading
    for cb in callbacks:
        cb.on_phase(f"loading {model_path}")
    model, tokenizer = load_model(model_path)
    if tokenizer_path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except Exception as err:
            raise StagError(f"cannot load a tokenizer from {tokenizer_path}: {type(err).__name__}") from err
    teacher = None
    if cfg.distill_from:
        for cb in callbacks:
            cb.on_phase(f"loading the teacher {cfg.distill_from}")
        teacher = load_model(cfg.distill_from)[0]
    run_info = {"model": str(model_path), "teacher": cfg.distill_from}
    return finetune(model, tokenizer, cfg, out_dir, teacher=teacher, resume=resume, force=force,
                    callbacks=callbacks, run_info=run_info)


def saved_run_options(out_dir) -> dict:
    """The TrainConfig values and model path a run in OUT was started with (for --resume)."""
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        return {}
    run = json.loads(path.read_text())
    return {"model": run.get("model"), "config": run.get("config", {})}
