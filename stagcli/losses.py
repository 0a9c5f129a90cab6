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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


def _compute_dtype(device_type: str, dtype):
    """The matmul dtype autocast would use here (so the fused loss matches the model's precision)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class _FusedHeadLoss(torch.autograd.Function):
    """loss = lm_weight * CE(h W^T, labels) + kl_weight * T^2 KL(teacher || student at temperature T),
    both averaged over the positions with a label. Gradients are made in the forward pass, chunk by
    chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, t_hidden, t_weight, lm_weight, kl_weight, temperature, chunk):
        device_type = hidden.device.type
        cd = _compute_dtype(device_type, hidden.dtype)
        with torch.autocast(device_type, enabled=False):
            h, w = hidden.to(cd), weight.to(cd)
            tw = None if t_weight is None else t_weight.to(cd)
            valid = labels != IGNORE
            count = valid.sum().clamp(min=1).to(torch.float32)
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            lm_sum = hidden.new_zeros((), dtype=torch.float32)
            kl_sum = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = (h[rows] @ w.T).float()
                y, ok = labels[rows].clamp(min=0), valid[rows]
                log_p = logits.log_softmax(-1)
                lm_sum = lm_sum - (log_p.gather(1, y[:, None])[:, 0] * ok).sum()
                grad = None
                if need_grad and lm_weight:
                    grad = log_p.exp()
                    grad[torch.arange(len(y), device=y.device), y] -= 1
                    grad *= (lm_weight * ok / count)[:, None]
                if t_hidden is not None and kl_weight:
                    t_log = ((t_hidden[rows].to(cd) @ tw.T).float() / temperature).log_softmax(-1)
                    s_log = log_p if temperature == 1 else (logits / temperature).log_softmax(-1)
                    kl_sum = kl_sum + ((t_log.exp() * (t_log - s_log)).sum(-1) * ok).sum()
                    if need_grad:
                        g = (s_log.exp() - t_log.exp()) * (kl_weight * temperature * ok / count)[:, None]
                        grad = g if grad is None else grad + g
                    del t_log, s_log
                del logits, log_p
                if grad is not None:
                    grad_c = grad.to(cd)
                    if grad_h is not None:
                        grad_h[rows] = (grad_c @ w).float()
                    if grad_w is not None:
                        grad_w += (grad_c.T @ h[rows]).float()
            lm = lm_sum / count
            kl = kl_sum / count * temperature ** 2
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
    """Positions per chunk: about 32M logits (128 MB in fp32) at a time."""
    return max(64, (1 << 25) // vocab)


def fused_head_loss(hidden, weight, labels, teacher_hidden=None, teacher_weight=None, lm_weight: float = 1.0,
                    kl_weight: float = 0.0, temperature: float = 1.0, chunk: int | None = None):
    """(objective, lm loss, kl loss) for hidden [N, d] -> labels [N] (IGNORE = no label)."""
    return _FusedHeadLoss.apply(hidden, weight, labels, teacher_hidden, teacher_weight, float(lm_weight),
                                float(kl_weight), float(temperature), int(chunk or chunk_rows(weight.shape[0])))


@dataclass
class Batch:
    """What a loss may read for one micro-batch: the token ids, the student's final (normed) hidden
    states and output head, and the teacher's when distilling."""
    ids: torch.Tensor
    hidden: torch.Tensor
    head: torch.Tensor
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    extras: dict | None = None  # e.g. intermediate states for a hidden-state loss


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
