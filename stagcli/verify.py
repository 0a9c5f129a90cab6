"""Verified staggering: the source model's exact output, decoded by two staggered sections.

A model converted with `--mode verify` is the source split at h = L/2, plus a bridge. Each decode
step runs both sections at once (one batched op per depth) on two positions per row:

    section 1:  x_{t-1} and z at positions t-1, t          -> u_{t-1} (again), u_t
    section 2:  u_{t-1} (exact)   at position t-1          -> the source's exact logits for x_t
                bridge(z, u_{t-1}, x_{t-1}) at position t  -> draft logits -> the next draft

z is either a draft of x_t (made by the previous step) or a token already known to be x_t. The
exact row verifies a draft: greedy, accept iff it is the exact argmax; sampling, the speculative-
sampling rule (accept with min(1, p/q), else draw from norm(max(0, p - q))), which keeps the
source's distribution exactly. On a rejection the step's position is run again with the right
token: the cache slots of positions t-1 and t are overwritten in place (each row its own slots),
so section 2's cache always holds the source's exact states for positions < t. A token costs one
step when its draft was right and two when it was wrong: 2 - a steps per token at acceptance a,
each step as deep as one section (L/2 layers). The output is the source's, whatever the bridge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import Place
from .decode import Sampling, check_request, eos_and_pad, filter_logits
from .errors import StagError


@dataclass
class VerifyStats:
    steps: int = 0                 # decode steps after the prefill
    drafted: int = 0               # drafts checked
    accepted: int = 0              # of them, accepted
    emitted: list = field(default_factory=list)  # tokens emitted per row (the prefill's first one included)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Tokens per row per step (1 = as many steps as tokens, like the source; 0.5 = twice as many)."""
        rows = max(len(self.emitted), 1)
        return (sum(self.emitted) - rows) / (self.steps * rows) if self.steps else float("nan")


class VerifiedEngine:
    """A verify-mode model and its static cache for `batch` rows of up to `max_len` tokens."""

    def __init__(self, model, batch: int, max_len: int):
        if not getattr(model.config, "verified", False):
            raise StagError("verified decoding needs a model converted with --mode verify")
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = model.new_cache(batch, max_len)
        self.pad = None

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """The prompt through both sections, exactly (the source). Returns its last logits [B, V] and
        the number of real tokens per row."""
        self.cache.reset()
        if input_ids.shape[1] + 2 > self.max_len:
            raise StagError(f"prompt of {input_ids.shape[1]} tokens does not fit a {self.max_len}-token cache")
        logits = self.model.prefill(input_ids, self.cache, attention_mask)
        count = self.cache.count.clone()
        self.pad = input_ids.shape[1] - count  # row b's position p lives in slot pad[b] + p
        return logits, count

    @torch.no_grad()
    def step(self, tokens, positions, u_prev):
        """tokens, positions [B, 2] (t-1 and t); u_prev [B, d]: section 1's output at t-1. Returns
        (section 2's logits [B, 2, V]: exact at t-1, draft at t; section 1's outputs [B, 2, d])."""
        slots = positions + self.pad[:, None]
        self.cache.key_valid.scatter_(1, slots, True)
        place = Place(slots, positions, self.cache.key_valid, None, self.max_len)
        return self.model.verify_step(tokens, place, u_prev, self.cache)


def probabilities(logits, sampling: Sampling):
    """The distribution the source samples from: softmax of the filtered logits / temperature."""
    return filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)


@torch.no_grad()
def generate_verified(model, input_ids, attention_mask=None, max_new_tokens: int = 32, *, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
                      pad_token_id: int | None = None, on_token=None, engine: VerifiedEngine | None = None):
    """Like decode.generate, for a verify-mode model: the source's tokens (greedy: identical to the
    source's greedy decoding; sampling: the source's distribution). Returns (new tokens [B, n],
    VerifyStats). on_token(row, token) is called for every emitted token."""
    sampling = check_request(model, input_ids, attention_mask, max_new_tokens, Sampling(temperature, top_k, top_p))
    B, T = input_ids.shape
    engine = engine or VerifiedEngine(model, B, T + max_new_tokens + 2)
    device = engine.cache.key_valid.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos, pad = eos_and_pad(eos_token_id, pad_token_id, device)

    def draw(p):
        return torch.multinomial(p, 1, generator=gen)[:, 0]

    logits, pos = engine.prefill(input_ids.to(device), None if attention_mask is None else attention_mask.to(device))
    first = logits.argmax(-1) if sampling.greedy else draw(probabilities(logits, sampling))
    rows: list[list[int]] = [[t] for t in first.tolist()]
    if on_token is not None:
        for b, t in enumerate(first.tolist()):
            on_token(b, t)
    done = torch.isin(first, eos) | (max_new_tokens <= 1)
    stats = VerifyStats()
    prev, z = input_ids[:, -1].to(device), first
    z_draft = torch.zeros(B, dtype=torch.bool, device=device)
    u_prev = engine.cache.last_out[0].clone()
    q_prev = None
    while not bool(done.all()):
        logits, u_rows = engine.step(torch.stack([prev, z], 1), torch.stack([pos - 1, pos], 1), u_prev)
        exact, draft = logits[:, 0], logits[:, 1]
        if sampling.greedy:
            right = exact.argmax(-1)
            accept = z_draft & (z == right)
            next_draft = draft.argmax(-1)
        else:  # speculative sampling: the emitted token is distributed as the source's p, exactly
            p = probabilities(exact, sampling)
            accept = torch.zeros_like(z_draft)
            right = draw(p)  # used where nothing was drafted (never emitted there) or q is unknown
            if q_prev is not None:
                ratio = p.gather(1, z[:, None])[:, 0] / q_prev.gather(1, z[:, None])[:, 0].clamp(min=1e-30)
                uniform = torch.rand(B, generator=gen, device=device)
                accept = z_draft & (uniform < ratio)
                residual = (p - q_prev).clamp(min=0)
                mass = residual.sum(-1, keepdim=True)
                residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
                right = draw(residual)
            q_prev = probabilities(draft, sampling)
            next_draft = draw(q_prev)
        active = ~done
        emit = z_draft & active
        token = torch.where(accept, z, right)
        stats.steps += 1
        stats.drafted += int(emit.sum())
        stats.accepted += int((accept & active).sum())
        for b in emit.nonzero()[:, 0].tolist():
            t = int(token[b])
            rows[b].append(t)
            if on_token is not None:
                on_token(b, t)
        done = done | (emit & torch.isin(token, eos)) | (torch.tensor([len(r) for r in rows], device=device) >= max_new_tokens)
        advance = ~(z_draft & ~accept) & ~done   # accepted, or z was already known: move on
        rejected = z_draft & ~accept & ~done     # run position t again, with the right token
        prev = torch.where(advance, z, prev)
        u_prev = torch.where(advance[:, None], u_rows[:, 1], u_rows[:, 0])
        pos = pos + advance.long()
        z = torch.where(advance, next_draft, torch.where(rejected, token, z))
        z_draft = advance
    stats.emitted = [len(r) for r in rows]
    width = max(stats.emitted)
    out = torch.full((B, width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r)
    return out, stats
