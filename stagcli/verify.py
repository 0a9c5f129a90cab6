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

With bridge_depth k > 0 the bridge reads section 1's state after k layers instead of the embedding
(z and x_{t-1} after k layers, computed by section 1 in the same step): section 2 starts k layers
late. After the bridge, section 1's last L/2 - k layers and section 2 are independent; on CUDA they
run on two streams at once (devices.run_concurrently), so a step is k + L/2 layers deep
(StagForCausalLM.verify_step); elsewhere one after the other.

An exact-cache model (--mode exact-cache, config.exact_cache) runs the same steps and accepts every
draft: one token per step, section 2's cache still exact before t (its exact row rewrites t-1), the
output the model's own (StagForCausalLM.exact_cache_hidden is its full-sequence form), not the source's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .cache import Place
from .decode import Sampling, allow_recompiles, check_request, eos_and_pad, filter_logits
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
    """A verify-mode model and its static cache for `batch` rows of up to `max_len` tokens.

    Both greedy and sampled steps keep all their bookkeeping on the device (VerifyState), so a step
    has no host sync. The greedy step is captured once in a CUDA graph on CUDA (cuda_graph, default on
    there) and replayed; compile: torch.compile it first (CUDA only), as DecodeEngine does. The
    sampled step runs eagerly (its draws come from the request's seeded generator)."""

    def __init__(self, model, batch: int, max_len: int, *, cuda_graph: bool | None = None, compile: bool = False):
        if not getattr(model.config, "verified", False):
            raise StagError("verified decoding needs a model converted with --mode verify")
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = model.new_cache(batch, max_len)
        self.device = device = self.cache.key_valid.device
        on_cuda = device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else (cuda_graph and on_cuda)
        self.compiled = compile and on_cuda
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # row b's position p is slot pad[b] + p
        self.state = VerifyState.empty(batch, max_len, model.config, device, self.cache.last_out.dtype)
        self._step_fn = greedy_step
        if self.compiled:
            allow_recompiles()
            self._step_fn = torch.compile(greedy_step, fullgraph=True, dynamic=False)
        self._graph = None

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """The prompt through both sections, exactly (the source). Returns its last logits [B, V] and
        the number of real tokens per row."""
        if input_ids.shape[0] != self.batch:
            raise StagError(f"engine was built for batch {self.batch}, got {input_ids.shape[0]} rows")
        self.cache.reset()
        if input_ids.shape[1] + 2 > self.max_len:
            raise StagError(f"prompt of {input_ids.shape[1]} tokens does not fit a {self.max_len}-token cache")
        logits = self.model.prefill(input_ids, self.cache, attention_mask)
        count = self.cache.count.clone()
        self.pad.copy_(input_ids.shape[1] - count)
        return logits, count

    @torch.no_grad()
    def step(self, tokens, positions, u_prev):
        """tokens, positions [B, 2] (t-1 and t); u_prev [B, d]: section 1's output at t-1. Returns
        (section 2's logits [B, 2, V]: exact at t-1, draft at t; section 1's outputs [B, 2, d])."""
        return verify_forward(self.model, self.cache, self.pad, self.max_len, tokens, positions, u_prev)

    @torch.no_grad()
    def sampled_step(self, sampling: Sampling, gen=None):
        """One sampled step on self.state (see sampled_step): eager, its draws from `gen`."""
        sampled_step(self.model, self.cache, self.pad, self.max_len, self.state, sampling, gen)

    @torch.no_grad()
    def greedy_step(self):
        """One greedy step on self.state (see greedy_step), as a CUDA-graph replay where possible."""
        if not self.cuda_graph:
            return self._step_fn(self.model, self.cache, self.pad, self.max_len, self.state)
        if self._graph is None:
            self._capture()
        self._graph.replay()

    def _capture(self):
        """Warm up (and compile) on a side stream, then capture one step; the warm-up runs change
        the state and the cache, so both are saved first and restored after."""
        keep = self.state.tensors() + self.cache.mutable()
        saved = [t.clone() for t in keep]
        args = (self.model, self.cache, self.pad, self.max_len, self.state)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step_fn(*args)
        for t, s in zip(keep, saved):
            t.copy_(s)


def verify_forward(model, cache, pad, max_len: int, tokens, positions, u_prev):
    """The model's verify step on rows' own slots (slot = pad + position)."""
    slots = positions + pad[:, None]
    cache.key_valid.scatter_(1, slots, True)
    place = Place(slots, positions, cache.key_valid, None, max_len)
    return model.verify_step(tokens, place, u_prev, cache)


@dataclass
class VerifyState:
    """Verified decoding's loop state, on the device, allocated once per engine and only updated in
    place (a captured step reads and writes these very tensors)."""
    prev: torch.Tensor       # [B] token at position t-1
    z: torch.Tensor          # [B] token at position t: a draft (z_draft) or already known
    z_draft: torch.Tensor    # [B] bool
    u_prev: torch.Tensor     # [B, d] section 1's output at t-1
    pos: torch.Tensor        # [B] t
    done: torch.Tensor       # [B] bool
    out: torch.Tensor        # [B, max_len] emitted tokens (the prefill's first one included)
    n: torch.Tensor          # [B] how many emitted
    drafted: torch.Tensor    # [B] drafts checked
    accepted: torch.Tensor   # [B] drafts accepted
    steps: torch.Tensor      # [1] steps in which any row was active
    max_new: torch.Tensor    # [1]
    eos: torch.Tensor        # [V] bool: is an EOS token
    q: torch.Tensor          # [B, V] sampling: the distribution the draft z was drawn from

    @classmethod
    def empty(cls, batch: int, max_len: int, cfg, device, dtype):
        long = lambda *shape: torch.zeros(*shape, dtype=torch.long, device=device)
        flag = lambda *shape: torch.zeros(*shape, dtype=torch.bool, device=device)
        return cls(long(batch), long(batch), flag(batch), torch.zeros(batch, cfg.hidden_size, device=device, dtype=dtype),
                   long(batch), flag(batch), long(batch, max_len), long(batch), long(batch), long(batch), long(1),
                   long(1), flag(cfg.vocab_size), torch.zeros(0, device=device))

    def tensors(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]

    def start(self, prev, first, pos, u_prev, max_new: int, eos, pad: int, sampling: bool = False):
        """Fill in place for a new request (first: the prefill's token)."""
        for t in (self.z_draft, self.n, self.drafted, self.accepted, self.steps, self.eos):
            t.zero_()
        self.out.fill_(pad)
        self.out[:, 0] = first
        self.n.fill_(1)
        self.prev.copy_(prev)
        self.z.copy_(first)
        self.u_prev.copy_(u_prev)
        self.pos.copy_(pos)
        self.max_new.fill_(max_new)
        self.eos[eos[(eos >= 0) & (eos < len(self.eos))]] = True  # an id outside the vocabulary never occurs
        self.done.copy_(self.eos[first] | (self.n >= self.max_new))
        if sampling and self.q.shape != (len(prev), len(self.eos)):
            self.q = torch.zeros(len(prev), len(self.eos), device=prev.device)


def greedy_step(model, cache, pad, max_len: int, s: VerifyState):
    """One greedy verified step, device-only (no host sync, no data-dependent python), so that it
    can be compiled and captured: verify the draft z against the exact argmax, emit, and advance
    (accepted or known) or run position t again with the right token (rejected)."""
    logits, u_rows = _forward(model, cache, pad, max_len, s)
    right = logits[:, 0].argmax(-1)
    accept = s.z_draft if model.config.exact_cache else s.z_draft & (s.z == right)
    _advance(s, accept, right, logits[:, 1].argmax(-1), u_rows)


def sampled_step(model, cache, pad, max_len: int, s: VerifyState, sampling: Sampling, gen=None):
    """One sampled verified step, device-only like greedy_step: speculative sampling's rule keeps the
    source's distribution exactly (accept the draft z ~ q with probability min(1, p(z)/q(z)), else
    draw from norm(max(0, p - q)))."""
    logits, u_rows = _forward(model, cache, pad, max_len, s)
    if model.config.exact_cache:  # every draft is emitted: nothing to verify, the next one drawn from row t
        _advance(s, s.z_draft, s.z, draw(probabilities(logits[:, 1], sampling), gen), u_rows)
        return
    p, z = probabilities(logits[:, 0], sampling), s.z[:, None]
    ratio = p.gather(1, z)[:, 0] / s.q.gather(1, z)[:, 0].clamp(min=1e-30)
    accept = s.z_draft & (torch.rand(len(z), generator=gen, device=z.device) < ratio)
    residual = (p - s.q).clamp(min=0)  # where nothing was drafted (z known) `right` is never emitted
    mass = residual.sum(-1, keepdim=True)
    right = draw(torch.where(mass > 0, residual / mass.clamp(min=1e-30), p), gen)
    s.q.copy_(probabilities(logits[:, 1], sampling))
    _advance(s, accept, right, draw(s.q, gen), u_rows)


def _forward(model, cache, pad, max_len: int, s: VerifyState):
    """verify_forward on the state's two rows: the exact one (t-1, prev) and the draft one (t, z)."""
    return verify_forward(model, cache, pad, max_len, torch.stack([s.prev, s.z], 1),
                          torch.stack([s.pos - 1, s.pos], 1), s.u_prev)


def _advance(s: VerifyState, accept, right, next_draft, u_rows):
    """The bookkeeping after a verified step: emit the accepted draft or the right token, then advance
    (accepted, or z was already known) or run position t again with the right token (rejected)."""
    active = ~s.done
    emit = s.z_draft & active
    token = torch.where(accept, s.z, right)
    at = s.n.clamp(max=s.out.shape[1] - 1)[:, None]
    s.out.scatter_(1, at, torch.where(emit[:, None], token[:, None], s.out.gather(1, at)))
    n = s.n + emit.long()
    done = s.done | (emit & s.eos[token]) | (n >= s.max_new)
    advance = ~(s.z_draft & ~accept) & ~done
    rejected = s.z_draft & ~accept & ~done
    s.steps.add_(active.any().long())
    s.drafted.add_(emit.long())
    s.accepted.add_((accept & active).long())
    s.n.copy_(n)
    s.done.copy_(done)
    s.prev.copy_(torch.where(advance, s.z, s.prev))
    s.u_prev.copy_(torch.where(advance[:, None], u_rows[:, 1], u_rows[:, 0]))
    s.pos.add_(advance.long())
    s.z.copy_(torch.where(advance, next_draft, torch.where(rejected, token, s.z)))
    s.z_draft.copy_(advance)


def probabilities(logits, sampling: Sampling):
    """The distribution the source samples from: softmax of the filtered logits / temperature."""
    return filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p).softmax(-1)


def draw(p, gen=None):
    """A token per row from probabilities p [B, V], on the device (Gumbel-max: no multinomial sync)."""
    return (p.log() - torch.empty_like(p).exponential_(generator=gen).log()).argmax(-1)


@torch.no_grad()
def generate_verified(model, input_ids, attention_mask=None, max_new_tokens: int = 32, *, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
                      pad_token_id: int | None = None, on_token=None, engine: VerifiedEngine | None = None,
                      compile: bool = False):
    """Like decode.generate, for a verify-mode model: the source's tokens (greedy: identical to the
    source's greedy decoding; sampling: the source's distribution). Returns (new tokens [B, n],
    VerifyStats). on_token(row, token) is called for every emitted token. engine: reuse one (its
    batch must match and max_len fit), so that a CUDA graph is captured once. compile: torch.compile
    the greedy step before its capture (CUDA only; see VerifiedEngine)."""
    sampling = check_request(model, input_ids, attention_mask, max_new_tokens, Sampling(temperature, top_k, top_p))
    B, T = input_ids.shape
    if engine is None:
        engine = VerifiedEngine(model, B, T + max_new_tokens + 2, compile=compile)
    elif T + max_new_tokens + 2 > engine.max_len:
        raise StagError(f"prompt + new tokens ({T + max_new_tokens}) exceed the engine's {engine.max_len - 2}")
    device = engine.device
    eos, pad = eos_and_pad(eos_token_id, pad_token_id, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    logits, pos = engine.prefill(input_ids.to(device), None if attention_mask is None else attention_mask.to(device))
    first = logits.argmax(-1) if sampling.greedy else draw(probabilities(logits, sampling), gen)
    s = engine.state
    s.start(input_ids[:, -1].to(device), first, pos, engine.cache.last_out[0], max_new_tokens, eos, pad,
            sampling=not sampling.greedy)
    step = engine.greedy_step if sampling.greedy else (lambda: engine.sampled_step(sampling, gen))
    shown = [0] * engine.batch
    while True:  # steps in chunks; the host looks (one sync) only between chunks
        n = s.n.tolist()
        if on_token is not None:
            out = s.out[:, :max(n)].tolist()
            for b in range(engine.batch):
                for t in out[b][shown[b]:n[b]]:
                    on_token(b, t)
            shown = n
        if bool(s.done.all()):
            break
        # never more steps than the furthest row still needs: none is wasted unless a row stops at an EOS
        for _ in range(min(max(max_new_tokens - max(n), 1), 16)):
            step()
    n = s.n.tolist()
    stats = VerifyStats(steps=int(s.steps), drafted=int(s.drafted.sum()), accepted=int(s.accepted.sum()), emitted=n)
    return s.out[:, :max(n)].to("cpu", copy=True), stats  # a copy: the engine's next request overwrites s.out
