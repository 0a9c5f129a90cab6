"""Training losses as objects that return named terms (torchtune style).

`HeadLoss` is the language-model loss and the distillation KL computed together, straight from the
final hidden states, over chunks of positions (the idea of Liger-Kernel's fused linear
cross-entropy): per chunk it makes the student's (and the teacher's) logits, the loss and its
gradient with respect to the hidden states and the output head, then drops the logits. The
[batch, length, vocab] logits never exist at once, which is most of a small model's training
memory. The numbers equal the unchunked loss (tests/test_losses.py).

A loss object's `terms(batch)` returns {name: value}; `objective` weights them into the scalar
the optimizer descends. A new loss is a class with `terms`, listed in the recipe's loss set.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def _compute_dtype(device_type: str, dtype):
    """The matmul dtype autocast would use here (so the fused loss matches the model's precision)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


COMPILE_MIN_VOCAB = 8192  # below this the elementwise work is too small to repay a compile


def _chunk_math(s, t, y, scale, lm_weight: float, kl_weight: float, temperature: float):
    """One chunk's loss sums and d(objective)/d(logits). s, t: student and teacher logits [n, V]
    (t may be None); y: labels [n] (clamped); scale: [n] = valid / count. Elementwise work only,
    so torch.compile fuses it into a few passes (12x faster than eager at SmolLM2's 49k vocab)."""
    s = s.float()
    log_p = s.log_softmax(-1)
    lm_sum = -(log_p.gather(1, y[:, None])[:, 0] * (scale > 0)).sum()
    grad = lm_weight * log_p.exp()
    kl_sum = torch.zeros((), device=s.device)
    if t is not None:
        log_q_t = (t.float() / temperature).log_softmax(-1)
        log_p_t = log_p if temperature == 1 else (s / temperature).log_softmax(-1)
        q_t = log_q_t.exp()
        kl_sum = ((q_t * (log_q_t - log_p_t)).sum(-1) * (scale > 0)).sum()
        grad = grad + (kl_weight * temperature) * (log_p_t.exp() - q_t)
    onehot = torch.arange(s.shape[-1], device=s.device)[None, :] == y[:, None]
    grad = (grad - lm_weight * onehot) * scale[:, None]
    return lm_sum, kl_sum, grad


_compiled = {"fn": None, "failed": False}


def _chunk_fn(vocab: int):
    """The compiled chunk function for big vocabularies (eager below COMPILE_MIN_VOCAB, with
    STAG_COMPILE_LOSS=0, or where compiling fails, e.g. no C++ compiler)."""
    if vocab < COMPILE_MIN_VOCAB or _compiled["failed"] or os.environ.get("STAG_COMPILE_LOSS") == "0":
        return _chunk_math
    if _compiled["fn"] is None:
        _compiled["fn"] = torch.compile(_chunk_math, dynamic=False)
    return _compiled["fn"]


def _run_chunk(*args):
    fn = _chunk_fn(args[0].shape[-1])
    if fn is _chunk_math:
        return fn(*args)
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001  (a compiler problem must not stop training)
        _compiled["failed"] = True
        warnings.warn(f"torch.compile of the loss failed ({type(err).__name__}); using eager ops (slower)")
        return _chunk_math(*args)


class _FusedHeadLoss(torch.autograd.Function):
    """objective = lm_weight * CE(h W^T, labels) + kl_weight * T^2 KL(teacher || student at temperature
    T), both averaged over the positions with a label. Gradients are made in the forward pass,
    chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, t_hidden, t_weight, lm_weight, kl_weight, temperature, chunk):
        cd = _compute_dtype(hidden.device.type, hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(cd), weight.to(cd)
            tw = None if t_weight is None else t_weight.to(cd)
            th = None if t_hidden is None else t_hidden.to(cd)
            valid = labels != IGNORE
            count = valid.sum().clamp(min=1).to(torch.float32)
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            lm_sum = kl_sum = 0.0
            kl_weight = kl_weight if th is not None else 0.0
            for start in range(0, h.shape[0], chunk):
                n = min(chunk, h.shape[0] - start)
                rows = slice(start, start + n)
                pad = chunk - n if h.shape[0] > chunk else 0  # every chunk one shape: one compiled kernel
                pad_rows = lambda x: torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
                scale = pad_rows(valid[rows].float() / count)
                y = pad_rows(labels[rows].clamp(min=0))
                s = pad_rows(h[rows]) @ w.T
                t = None if th is None else pad_rows(th[rows]) @ tw.T
                lm_c, kl_c, grad = _run_chunk(s, t, y, scale, float(lm_weight), float(kl_weight), float(temperature))
                del s, t
                lm_sum, kl_sum = lm_sum + lm_c, kl_sum + kl_c
                if need_grad:
                    grad_c = grad[:n].to(cd)
                    grad_h[rows] = grad_c @ w
                    if grad_w is not None:
                        grad_w.add_(grad_c.T @ h[rows])  # mixed-dtype in-place add: no fp32 copy of the partial
                del grad
            lm = torch.as_tensor(lm_sum, dtype=torch.float32, device=hidden.device) / count
            kl = torch.as_tensor(kl_sum, dtype=torch.float32, device=hidden.device) / count * temperature ** 2
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(lm, kl)
        return lm_weight * lm + kl_weight * kl, lm, kl

    @staticmethod
    def backward(ctx, grad_total, _grad_lm, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_total).to(ctx.hidden_dtype)
        gw = None if grad_w is None else grad_w * grad_total
        return gh, gw, None, None, None, None, None, None, None


def chunk_rows(vocab: int) -> int:
    """Positions per chunk: about 8M logits (32 MB in fp32) at a time; big enough for full-speed GEMMs."""
    return max(64, (1 << 23) // vocab)


def fused_head_loss(hidden, weight, labels, teacher_hidden=None, teacher_weight=None, lm_weight: float = 1.0,
                    kl_weight: float = 0.0, temperature: float = 1.0, chunk: int | None = None):
    """(objective, lm loss, kl loss) for hidden [N, d] -> labels [N] (IGNORE = no label)."""
    return _FusedHeadLoss.apply(hidden, weight, labels, teacher_hidden, teacher_weight, float(lm_weight),
                                float(kl_weight), float(temperature), int(chunk or chunk_rows(weight.shape[0])))


@dataclass
class Batch:
    """What a loss may read for one micro-batch: the token ids, the student's final (normed) hidden
    states and output head, and the teacher's when distilling; `residual`: the last section's raw
    output (before the final norm), and the teacher's."""
    ids: torch.Tensor
    hidden: torch.Tensor
    head: torch.Tensor
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    teacher_residual: torch.Tensor | None = None


class HeadLoss:
    """Next-token loss, plus distillation from the teacher when there is one:
    (1 - alpha) LM + alpha T^2 KL(teacher || student). Terms: lm_loss, kl_loss (with a teacher)."""

    def __init__(self, distill_alpha: float = 0.0, temperature: float = 1.0, chunk: int | None = None):
        self.alpha, self.temperature, self.chunk = distill_alpha, temperature, chunk

    def __call__(self, batch: Batch):
        hidden = batch.hidden[:, :-1].flatten(0, 1)
        labels = batch.ids[:, 1:].flatten()
        teacher = batch.teacher_hidden is not None
        t_hidden = batch.teacher_hidden[:, :-1].flatten(0, 1) if teacher else None
        alpha = self.alpha if teacher else 0.0
        total, lm, kl = fused_head_loss(hidden, batch.head, labels, t_hidden, batch.teacher_head,
                                        1 - alpha, alpha, self.temperature, self.chunk)
        return total, ({"lm_loss": lm, "kl_loss": kl} if teacher else {"lm_loss": lm})


class HiddenStateLoss:
    """Hidden-state distillation: weight x the mean squared distance between the last section's output
    and the teacher's final residual stream, relative to the latter's mean square. Term: hidden_loss."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, batch: Batch):
        student, target = batch.residual.float(), batch.teacher_residual.float()
        loss = (student - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)
        return self.weight * loss, {"hidden_loss": loss.detach()}


def lm_loss_sum(hidden, head, ids, chunk: int | None = None):
    """Summed next-token NLL and the number of predicted tokens, without gradients (evaluation)."""
    with torch.no_grad():
        _, lm, _ = fused_head_loss(hidden[:, :-1].flatten(0, 1), head, ids[:, 1:].flatten(), chunk=chunk)
    n = ids[:, 1:].numel()
    return lm * n, n


def distill_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per predicted token, from full logits (the reference the fused
    loss is tested against)."""
    s = (student_logits[:, :-1].float() / temperature).log_softmax(-1).flatten(0, 1)
    t = (teacher_logits[:, :-1].float() / temperature).log_softmax(-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
