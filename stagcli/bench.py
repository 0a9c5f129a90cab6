"""`stag bench`: decode latency of a staggered model against strong baselines, measured the same way.

Systems: the staggered model in the decode engine; the unconverted source in the SAME engine
(p = 1, so the comparison isolates the staggering); Hugging Face `generate` with a static cache.
Per-token decode latency excludes prefill and warm-up; each figure is the median of `repeats` runs.
Achieved bandwidth = model weight bytes x decode steps per second (each step reads every weight once).
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from .devices import machine, resolve_device
from .errors import StagError


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompt(given, vocab: int, batch: int, length: int, device):
    """The given prompt (real text), else a fixed random one (seeded), the same for every system."""
    if given is not None:
        return given.to(device)
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())




HEAVY_OPS = ("mm", "bmm", "addmm", "baddbmm", "linear", "matmul")  # + every scaled-dot-product attention


def count_ops(step) -> dict:
    """Aten ops dispatched by step() (views excluded): `heavy` = GEMMs and attention calls, `other` =
    elementwise and copies. A machine-independent cost measure: on a GPU, small models are bound by
    how many kernels a step launches, and torch.compile fuses the `other` ops but not the heavy ones."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counter = Count()
    with torch.no_grad(), counter:
        step()
    heavy = sum(n for op, n in counter.ops.items() if op in HEAVY_OPS or "scaled_dot_product" in op)
    return {"heavy": heavy, "other": sum(counter.ops.values()) - heavy}


@torch.no_grad()
def count_decode_ops(model, batch_size: int = 1) -> dict:
    """count_ops of one eager decode step of the engine (the bridge, where there is one, included)."""
    device = model.embed.weight.device
    cache = model.new_cache(batch_size, 4)
    model.prefill(torch.full((batch_size, 2), 3, device=device), cache)
    memory_kv = model.memory_kv_weights()  # built once per engine, not per step: not counted
    return count_ops(lambda: model.step(torch.full((batch_size,), 3, device=device), cache, memory_kv=memory_kv))


@torch.no_grad()
def count_verified_ops(model, batch_size: int = 1) -> dict:
    """count_ops of one eager greedy verified step: both sections' rows, the bridge and the on-device
    bookkeeping (the step has no branches, so any request's state gives the same count)."""
    from .verify import VerifiedEngine, generate_verified
    engine = VerifiedEngine(model, batch_size, 8, cuda_graph=False)
    generate_verified(model, torch.full((batch_size, 2), 3, device=engine.device), max_new_tokens=2, engine=engine)
    return count_ops(engine.greedy_step)


def bench_engine(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 5,
                 warmup: int = 1, device: str | None = None, dtype: str = "float32", compile: bool = False,
                 recurrent: bool = False, prompt=None) -> dict:
    """Time the decode engine. `model`: a StagForCausalLM or anything load_model() takes.
    prompt: [batch, prompt_len] token ids (default: fixed random tokens)."""
    from .convert import DTYPES, load_model
    from .decode import DecodeEngine
    dev = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(str(model), dtype)[0]
    model = model.to(dev, DTYPES[dtype]).eval()
    engine = DecodeEngine(model, batch_size, prompt_len + new_tokens + 1, compile=compile, recurrent=recurrent)
    prompt = _prompt(prompt, model.config.vocab_size, batch_size, prompt_len, dev)
    step_ms, prefill_ms = [], []
    with torch.no_grad():
        for run in range(warmup + repeats):
            _sync(dev)
            t0 = time.perf_counter()
            logits = engine.prefill(prompt)
            token = logits.argmax(-1)
            _sync(dev)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                token = engine.step(token).argmax(-1)
            _sync(dev)
            t2 = time.perf_counter()
            if run >= warmup:
                prefill_ms.append((t1 - t0) * 1e3)
                step_ms.append((t2 - t1) * 1e3 / new_tokens)
    return {"system": "stag engine", "sections": model.config.sections, "shared": model.config.shared,
            **_speed(step_ms, batch_size, model), "prefill_ms": statistics.median(prefill_ms),
            "cuda_graph": engine.cuda_graph, "compiled": engine.compiled,
            "ops_per_step": count_decode_ops(model, batch_size)}


def _speed(per_token_ms: list[float], batch_size: int, model) -> dict:
    """The speed fields of a result row from the timed runs' ms per token (their median counts)."""
    ms = statistics.median(per_token_ms)
    nbytes = _model_bytes(model)
    return {"batch_size": batch_size, "ms_per_token": ms, "tokens_per_s": batch_size * 1e3 / ms,
            "model_bytes": nbytes, "bandwidth_GBps": nbytes * (1e3 / ms) / 1e9, "runs_ms_per_token": per_token_ms}


def _per_token_ms(generate_n, new_tokens: int, repeats: int, warmup: int, dev) -> list[float]:
    """(time for new_tokens - time for 1 token) / (new_tokens - 1) per timed run: decode time per
    token without the prefill, for systems that time only as a whole."""
    def timed(n):
        _sync(dev)
        t0 = time.perf_counter()
        generate_n(n)
        _sync(dev)
        return (time.perf_counter() - t0) * 1e3
    per_token = []
    with torch.no_grad():
        for run in range(warmup + repeats):
            full, first = timed(new_tokens), timed(1)
            if run >= warmup:
                per_token.append(max(full - first, 1e-6) / (new_tokens - 1))
    return per_token


def bench_verified(model, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 5,
                   warmup: int = 1, device: str | None = None, dtype: str = "float32", compile: bool = False,
                   prompt=None) -> dict:
    """Verified staggering (stagcli/verify.py), greedy, through one reused engine (on CUDA: one
    captured graph): ms/token, acceptance and tokens per step. An exact-cache model runs the same
    engine and accepts every draft (acceptance 1, one token per step)."""
    from .convert import DTYPES
    from .verify import VerifiedEngine, generate_verified
    dev = resolve_device(device)
    model = model.to(dev, DTYPES[dtype]).eval()
    prompt = _prompt(prompt, model.config.vocab_size, batch_size, prompt_len, dev)
    engine = VerifiedEngine(model, batch_size, prompt_len + new_tokens + 2, compile=compile)
    stats = []

    def run(n):
        result = generate_verified(model, prompt, max_new_tokens=n, engine=engine)[1]
        if n == new_tokens:  # not the 1-token run that times the prefill
            stats.append(result)
    per_token = _per_token_ms(run, new_tokens, repeats, warmup, dev)
    stats = stats[warmup:]
    drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
    system = "stag exact-cache" if model.config.exact_cache else "stag verified"
    return {"system": system, "sections": 2, "shared": False, **_speed(per_token, batch_size, model),
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_step": statistics.mean(s.tokens_per_step for s in stats),
            "bridge_depth": model.config.bridge_depth, "cuda_graph": engine.cuda_graph, "compiled": engine.compiled,
            "ops_per_step": count_verified_ops(model, batch_size)}


def bench_for(model):
    """The timing of the engine a model decodes with (stag generate's choice): bench_verified for verify
    and exact-cache models, bench_engine otherwise."""
    return bench_verified if getattr(model.config, "verified", False) else bench_engine


def bench_model(model_path, batch_size: int = 1, prompt_data=None, **settings) -> dict:
    """A checkpoint timed on its own engine (bench_for). prompt_data: prompts of real text (a data
    spec) instead of random tokens; settings: those of bench_engine / bench_verified."""
    from .convert import load_model
    model, tokenizer = load_model(str(model_path), settings.get("dtype", "float32"))
    if prompt_data:
        settings["prompt"] = prompts_from(prompt_data, tokenizer, batch_size, settings.get("prompt_len", 128))
    return bench_for(model)(model, batch_size, **settings)


def bench_hf_generate(source, batch_size: int = 1, prompt_len: int = 128, new_tokens: int = 128,
                      repeats: int = 5, warmup: int = 1, device: str | None = None, dtype: str = "float32",
                      prompt=None, prompt_lookup: int = 0) -> dict:
    """transformers' own generate, greedy, on a checkpoint path or a loaded transformers model: with a
    static cache, or (prompt_lookup > 0) its lossless prompt-lookup speculative decoding
    (prompt_lookup_num_tokens; dynamic cache). Per-token decode time as in _per_token_ms."""
    from .convert import DTYPES, load_hf_model
    dev = resolve_device(device)
    hf = load_hf_model(source)[0] if isinstance(source, (str, os.PathLike)) else source
    hf = hf.to(dev, DTYPES[dtype]).eval()
    prompt = _prompt(prompt, hf.config.vocab_size, batch_size, prompt_len, dev)
    how = dict(prompt_lookup_num_tokens=prompt_lookup) if prompt_lookup else dict(cache_implementation="static")

    def run(n):
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0, **how)
    per_token = _per_token_ms(run, new_tokens, repeats, warmup, dev)
    system = f"HF generate (prompt lookup {prompt_lookup})" if prompt_lookup else "HF generate (static cache)"
    return {"system": system, "sections": 1, "shared": False, **_speed(per_token, batch_size, hf)}


def check_settings(batch_sizes, prompt_len: int, new_tokens: int, repeats: int, dtype: str):
    """Reject impossible settings before any model is loaded."""
    from .convert import DTYPES
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise StagError(f"--batch-sizes must be positive integers, not {','.join(map(str, batch_sizes)) or 'empty'}")
    if new_tokens < 2 or prompt_len < 1 or repeats < 1:
        raise StagError("--new-tokens must be >= 2, --prompt-len and --repeats >= 1")
    if dtype not in DTYPES:
        raise StagError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")


def prompts_from(data, tokenizer, batch: int, prompt_len: int):
    """The first `batch` prompt_len-token pieces of real text (acceptance needs real prompts)."""
    from .data import load_packed
    if tokenizer is None:
        raise StagError("--prompt-data needs the model's tokenizer")
    packed = load_packed(data, tokenizer, prompt_len)
    if len(packed) < batch:
        raise StagError(f"--prompt-data gives {len(packed)} prompts of {prompt_len} tokens; batch {batch} needs more")
    return packed[:batch]


def run_bench(model_path: str, baseline: str | None = None, batch_sizes=(1, 4, 16), prompt_len: int = 128,
              new_tokens: int = 128, repeats: int = 5, warmup: int = 1, device: str | None = None,
              dtype: str = "float32", compile: bool = False, hf: bool = True, progress=None,
              prompt_data=None, prompt_lookup: int = 10) -> dict:
    """Every system at every batch size. The baseline defaults to the source recorded by stag convert.
    progress(label, done, total) is called before each measurement and once at the end."""
    from .convert import load_model
    check_settings(batch_sizes, prompt_len, new_tokens, repeats, dtype)
    dev = resolve_device(device)
    report = progress or (lambda label, done, total: None)
    report("loading the model", 0, 0)
    model, tokenizer = load_model(model_path, dtype)
    verified = getattr(model.config, "verified", False)
    if baseline is None:
        baseline = (model.config.stag_recipe or {}).get("source")
        if baseline and not (os.path.exists(baseline) or baseline in _aliases()):
            baseline = None
    common = dict(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                  device=str(dev), dtype=dtype)
    limit = getattr(model.config, "max_positions", None)
    if limit and prompt_len + new_tokens + 1 > limit:
        raise StagError(f"--prompt-len + --new-tokens ({prompt_len + new_tokens}) exceed the model's "
                        f"context of {limit} tokens")
    jobs = []  # (name, batch, how)
    base_model = hf_model = None
    if baseline:  # loaded once: the same weights for the same engine and for transformers
        from .convert import convert_model, load_hf_model
        report("loading the baseline", 0, 0)
        hf_model = load_hf_model(baseline)[0]
        base_model = convert_model(hf_model)
    prompt = (lambda b: prompts_from(prompt_data, tokenizer, b, prompt_len)) if prompt_data else (lambda b: None)
    for batch in batch_sizes:
        jobs.append(("staggered", batch, lambda b: bench_for(model)(model, b, compile=compile, prompt=prompt(b), **common)))
        if baseline:
            jobs.append(("baseline (same engine)", batch,
                         lambda b: bench_engine(base_model, b, compile=compile, prompt=prompt(b), **common)))
            if hf:
                jobs.append(("baseline (HF static generate)", batch,
                             lambda b: bench_hf_generate(hf_model, b, prompt=prompt(b), **common)))
                if verified and prompt_lookup and batch == 1:  # transformers' assisted generate is batch 1 only
                    jobs.append((f"baseline (HF prompt lookup {prompt_lookup})", batch, lambda b: bench_hf_generate(
                        hf_model, b, prompt=prompt(b), prompt_lookup=prompt_lookup, **common)))
    rows = []
    for done, (name, batch, how) in enumerate(jobs):
        report(f"{name}, batch {batch}", done, len(jobs))
        rows.append({"name": name, **how(batch)})
    report("done", len(jobs), len(jobs))
    for row in rows:  # ratios against the staggered model at the same batch size
        ours = next(r for r in rows if r["name"] == "staggered" and r["batch_size"] == row["batch_size"])
        row["speedup_of_staggered"] = row["ms_per_token"] / ours["ms_per_token"]
    return {"model": model_path, "baseline": baseline, "machine": machine(dev), "device": str(dev),
            "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "compile": compile, "prompt_data": prompt_data, "rows": rows}


def _aliases():
    from .assets import MODEL_ALIASES
    return MODEL_ALIASES
