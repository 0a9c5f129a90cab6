"""The decode engine: static caches, one batched op per depth for all sections, on-device sampling.

`generate(model, input_ids, ...)` is the one call most code needs. `DecodeEngine` keeps a cache
(and, on CUDA, a captured CUDA graph of the decode step) alive across calls, for benchmarks and
servers. A step runs every section on the same token at once (StagForCausalLM.decode_step), so
the critical path is L/p layers deep; a p = 1 model (an unconverted checkpoint) runs the same code.

On CUDA the step is captured once in a CUDA graph (optionally after torch.compile fuses its
elementwise work) and replayed: no kernel-launch overhead, no host syncs. Sampling stays on the
device (Gumbel-max, so no multinomial sync). On CPU everything runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .errors import StagError


# --- sampling (all on the device, no host syncs) ------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. temperature 0 = greedy (top_k / top_p then unused)."""
    temperature: float = 0.0
    top_k: int = 0          # keep the k most likely tokens (0 = all)
    top_p: float = 1.0      # keep the smallest set whose probability reaches p (1 = all)

    def check(self):
        if self.temperature < 0:
            raise StagError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise StagError(f"top-k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise StagError(f"top-p must be in (0, 1], not {self.top_p}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Set logits outside the top-k / nucleus (top-p) sets to -inf. logits [B, V] float."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits, sampling: Sampling, generator: torch.Generator | None = None):
    """Next tokens [B] from logits [B, V]. Sampling uses the Gumbel-max trick (argmax of
    logits/T + Gumbel noise draws exactly from softmax(logits/T)) so it never syncs the host."""
    if sampling.greedy:
        return logits.argmax(-1)
    scores = filter_logits(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    noise = torch.empty_like(scores).exponential_(generator=generator).log_().neg_()  # Gumbel(0, 1)
    return (scores + noise).argmax(-1)


# --- the engine ---------------------------------------------------------------------------------
def allow_recompiles(limit: int = 64):
    """torch.compile specialises a step per model and batch size; one process that benchmarks
    several (stag bench, scripts/gpu_decode.py) passes dynamo's default limit of 8 and fails."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


class DecodeEngine:
    """A model plus a static cache for `batch` rows of up to `max_len` tokens.

    cuda_graph: capture the decode step in a CUDA graph (CUDA only; default: on when the model is
    on CUDA). compile: torch.compile the step first so its elementwise work is fused (CUDA only).
    recurrent: the recurrent approximation (shared-weight models): pass 1 is skipped.
    """

    def __init__(self, model, batch: int, max_len: int, *, cuda_graph: bool | None = None,
                 compile: bool = False, recurrent: bool = False):
        cfg = model.config
        if getattr(cfg, "verified", False):
            raise StagError("a --mode verify or exact-cache model decodes with stagcli.verify (generate() picks it)")
        if recurrent and not (cfg.shared and cfg.sections > 1):
            raise StagError("--recurrent needs a shared-weights model with >= 2 sections "
                            f"(this one: {cfg.sections} section(s), {'shared' if cfg.shared else 'separate'} weights)")
        self.model, self.batch, self.max_len, self.recurrent = model, batch, max_len, recurrent
        self.device = model.embed.weight.device
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else (cuda_graph and on_cuda)
        self.compiled = compile and on_cuda
        self.cache = model.new_cache(batch, max_len)
        self.memory_kv = model.memory_kv_weights()  # all depths' memory K/V in one GEMM
        self._step_fn = model.decode_step
        if self.compiled:
            allow_recompiles()
            self._step_fn = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
        self._graph = None
        self._token = torch.zeros(batch, dtype=torch.long, device=self.device)  # static graph input
        self._logits = None                                                       # static graph output

    def reset(self):
        self.cache.reset()

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """Reset the cache and run the prompt (one pass per section). Returns logits [B, V]."""
        if input_ids.shape[0] != self.batch:
            raise StagError(f"engine was built for batch {self.batch}, got {input_ids.shape[0]} rows")
        self.reset()
        if input_ids.shape[1] >= self.max_len:
            raise StagError(f"prompt of {input_ids.shape[1]} tokens does not fit a {self.max_len}-token cache")
        return self.model.prefill(input_ids.to(self.device), self.cache,
                                  None if attention_mask is None else attention_mask.to(self.device))

    @torch.no_grad()
    def step(self, token):
        """Feed tokens [B]; returns logits [B, V] (on CUDA graphs: a buffer overwritten next step)."""
        self.cache.claim(1)
        if not self.cuda_graph:
            return self._step_fn(token, self.cache, self.recurrent, self.memory_kv)
        if self._graph is None:
            self._capture(token)
        self._token.copy_(token)
        self._graph.replay()
        return self._logits

    def _capture(self, token):
        """Warm up (and compile) on a side stream, then capture one step. The warm-up and capture
        runs advance the cache, so its state is saved first and restored after."""
        cache = self.cache
        saved = [t.clone() for t in cache.mutable()]
        self._token.copy_(token)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step_fn(self._token, cache, self.recurrent, self.memory_kv)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step_fn(self._token, cache, self.recurrent, self.memory_kv)
        for t, s in zip(cache.mutable(), saved):
            t.copy_(s)


# --- the token loop (shared with decode_ranks) ------------------------------------------------
def eos_and_pad(eos_token_id, pad_token_id: int | None, device) -> tuple[torch.Tensor, int]:
    """The EOS ids (an int, a list or None) as a tensor, and the pad token (default: the first EOS
    id, else 0)."""
    ids = [] if eos_token_id is None else (
        [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    pad = pad_token_id if pad_token_id is not None else (ids[0] if ids else 0)
    return torch.tensor(ids, dtype=torch.long, device=device), pad


class Stopping:
    """End-of-sequence bookkeeping: once a row has emitted an EOS token its later tokens are
    pad_token_id (default: the first EOS id, else 0)."""

    def __init__(self, batch: int, device, eos_token_id=None, pad_token_id: int | None = None):
        self.eos, self.pad = eos_and_pad(eos_token_id, pad_token_id, device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def apply(self, token):
        if len(self.eos):
            token = token.masked_fill(self.done, self.pad)
            self.done = self.done | torch.isin(token, self.eos)
        return token

    def all_done(self) -> bool:
        return bool(len(self.eos)) and bool(self.done.all())  # the only host sync of a decode loop


def decode_loop(logits, step: Callable, choose: Callable, max_new_tokens: int, stopping: Stopping,
                on_token: Callable | None = None) -> torch.LongTensor:
    """choose(logits) -> tokens [B]; step(tokens) -> the next logits. Returns [B, n] (n <= max_new_tokens:
    it stops once every row has emitted an EOS token)."""
    out = []
    for i in range(max_new_tokens):
        token = stopping.apply(choose(logits))
        out.append(token)
        if on_token is not None:
            on_token(token)
        if i == max_new_tokens - 1 or stopping.all_done():
            break
        logits = step(token)
    return torch.stack(out, 1)


def check_prompt(input_ids, attention_mask=None):
    """A [batch, length] prompt in which every row has at least one real token."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise StagError("input_ids must be a non-empty (batch, length) tensor")
    if attention_mask is not None and bool((attention_mask.sum(1) == 0).any()):
        empty = int((attention_mask.sum(1) == 0).nonzero()[0, 0])
        raise StagError(f"prompt {empty + 1} of {input_ids.shape[0]} is empty (no tokens to continue)")


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id=None,
             recurrent: bool = False, on_token: Callable | None = None,
             engine: DecodeEngine | None = None, pad_token_id: int | None = None,
             on_stats: Callable | None = None, compile: bool = False) -> torch.LongTensor:
    """Decode up to `max_new_tokens` new tokens for a left-padded batch input_ids [B, T].

    Returns the new tokens [B, n] (n <= max_new_tokens: it stops early once every row has emitted
    an EOS token; rows that finished earlier are filled with pad_token_id, default the EOS id).
    on_token(tokens[B]) is called after every step, for streaming. seed makes sampling
    reproducible. engine: reuse a DecodeEngine (its batch must match; max_len must fit). compile:
    torch.compile the step before its CUDA-graph capture (CUDA only).
    A verify-mode model decodes through stagcli.verify (the source's exact tokens); on_token then
    gets row 0's tokens as they are verified, and on_stats(VerifyStats) its acceptance figures.
    """
    if getattr(model.config, "verified", False):
        from .verify import generate_verified
        if recurrent:
            raise StagError("--recurrent is for shared-weights models, not --mode verify")
        streamed = None if on_token is None else (lambda row, token: on_token(torch.tensor([token])) if row == 0 else None)
        out, stats = generate_verified(model, input_ids, attention_mask, max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id, on_token=streamed, compile=compile)
        if on_stats is not None:
            on_stats(stats)
        return out
    sampling = check_request(model, input_ids, attention_mask, max_new_tokens, Sampling(temperature, top_k, top_p))
    batch, prompt_len = input_ids.shape
    if engine is None:
        engine = DecodeEngine(model, batch, prompt_len + max_new_tokens, recurrent=recurrent, compile=compile)
    elif prompt_len + max_new_tokens - 1 > engine.max_len:
        raise StagError(f"prompt + new tokens ({prompt_len + max_new_tokens}) exceed the engine's {engine.max_len}")
    device = engine.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stopping = Stopping(batch, device, eos_token_id, pad_token_id)
    logits = engine.prefill(input_ids, attention_mask)
    return decode_loop(logits, engine.step, lambda lg: sample(lg, sampling, generator), max_new_tokens,
                       stopping, on_token)


def check_request(model, input_ids, attention_mask, max_new_tokens: int, sampling: Sampling) -> Sampling:
    """What every decode loop checks before its prefill; returns the checked sampling settings.
    model: the model or its config (multi-device decoding checks before any rank loads weights)."""
    sampling = sampling.check()
    check_prompt(input_ids, attention_mask)
    if max_new_tokens < 1:
        raise StagError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    prompt_len = input_ids.shape[1]
    limit = getattr(model.config if isinstance(model, torch.nn.Module) else model, "max_positions", None)
    if limit and prompt_len + max_new_tokens > limit:
        raise StagError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                        f"context of {limit} tokens")
    return sampling


def full_forward_greedy(model, input_ids, max_new_tokens: int):
    """Reference decoder without caches: rerun the whole sequence through the training forward and
    take the argmax at the last position. Slow (quadratic); for tests and sanity checks."""
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[:, input_ids.shape[1]:]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0):
    """Token lists of different lengths -> (input_ids [B, T], attention_mask [B, T]), left padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[b, width - len(r):] = 1
    return ids, mask
