"""Decode latency of every form on one machine, in ONE process: the baseline (the same engine on the
unconverted model, and transformers' static-cache generate) is loaded, compiled and timed once, not
once per form as `stag bench` would. Random weights of a real model's shape (latency does not depend
on them; the verified mode's acceptance does, so its row here times the step, not a real acceptance).

    python scripts/gpu_decode.py --shape smollm2-135m --batches 1,16 --out docs/bench/h100-decode.json

Every form is tried on its own: one that fails prints its traceback and the others still run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_shape_checkpoint import SHAPES  # noqa: E402
from stagcli.bench import bench_engine, bench_for, bench_hf_generate, bench_verified, machine  # noqa: E402
from stagcli.convert import convert_model  # noqa: E402
from stagcli.layout import Layout  # noqa: E402

FORMS = {  # name -> Layout fields; order = priority
    "split2": dict(sections=2),
    "split2-parallel": dict(sections=2, cross_attn="parallel"),
    "shared2-parallel": dict(sections=2, mode="shared", cross_attn="parallel"),
    "split2-mlp-bridge": dict(sections=2, bridge="mlp"),
    "verify-mlp-bridge": dict(sections=2, mode="verify", bridge="mlp"),
    # the depth-K bridge (docs/bridge.md): section 2 starts K layers late, then both run on two streams
    "exact-cache-attn": dict(sections=2, mode="exact-cache", bridge="attn"),
    "exact-cache-depth4-attn": dict(sections=2, mode="exact-cache", bridge="attn", bridge_depth=4),
    "verify-depth4-attn": dict(sections=2, mode="verify", bridge="attn", bridge_depth=4),
    "exact-cache-depth8-attn": dict(sections=2, mode="exact-cache", bridge="attn", bridge_depth=8),
    "verify-depth8-attn": dict(sections=2, mode="verify", bridge="attn", bridge_depth=8),
    "split3": dict(sections=3),
    "shared2": dict(sections=2, mode="shared"),
}


def source_model(shape: str, layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **kw)).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the depth (CPU smoke tests)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    compile = not args.no_compile
    common = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, dtype=args.dtype)
    hf = source_model(args.shape, args.layers)
    rows, failures = [], []

    def attempt(name, batch, fn):
        t0 = time.time()
        try:
            row = {"name": name, **fn()}
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            print(f"{name:28s} batch {batch:3d}: {row['ms_per_token']:8.3f} ms/token "
                  f"{row['tokens_per_s']:9.1f} tok/s  graph={row.get('cuda_graph')} compiled={row.get('compiled')} "
                  f"accept={row.get('acceptance')} tps={row.get('tokens_per_step')} ({row['wall_s']} s)", flush=True)
        except Exception as e:  # keep going: one broken form must not hide the others
            traceback.print_exc()
            failures.append({"name": name, "batch_size": batch, "error": f"{type(e).__name__}: {e}"})
            print(f"{name} batch {batch}: FAILED {type(e).__name__}: {e}", flush=True)
        save()

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "shape": args.shape, "layers": args.layers, "machine": machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "torch": torch.__version__, "dtype": args.dtype, "compile": compile, **common,
            "command": " ".join(sys.argv), "rows": rows, "failures": failures}, indent=1))

    batches = [int(b) for b in args.batches.split(",")]
    base = convert_model(hf)
    for b in batches:
        attempt("source (same engine)", b, lambda: bench_engine(base, b, compile=compile, **common))
        if not args.no_compile:  # the graph without compile: what compile adds
            attempt("source (same engine, no compile)", b, lambda: bench_engine(base, b, compile=False, **common))
        if not args.no_hf:
            attempt("HF generate (static cache)", b, lambda: bench_hf_generate(hf, b, **common))
    base = None  # free it before the forms
    for form in args.forms.split(","):
        try:
            model = convert_model(hf, Layout(**FORMS[form]))
        except Exception as e:
            traceback.print_exc()
            failures.append({"name": form, "error": f"convert: {type(e).__name__}: {e}"})
            continue
        timed = bench_for(model)
        for b in batches:
            attempt(form, b, lambda: timed(model, b, compile=compile, **common))
            if compile and timed is bench_verified:  # the captured graph alone, in case compile is what breaks
                attempt(form + " (no compile)", b, lambda: bench_verified(model, b, compile=False, **common))
        model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"wrote {args.out}: {len(rows)} rows, {len(failures)} failures")


if __name__ == "__main__":
    main()
