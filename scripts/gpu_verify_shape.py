"""Verified decoding on the GPU, exactness only: a random-weight model of a real shape, converted
with --mode verify and a ridge bridge fitted on random tokens; its tokens (CUDA graph, with and
without compile) against the same engine's greedy decoding of the plain conversion, fp32 and bf16.
Needs no tokenizer or weights, so it runs in one bare GPU call.

    python scripts/gpu_verify_shape.py --out check.json [--layers N] [--bridge-depth K]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import source_model  # noqa: E402
from stagcli.bridge import fit_ridge  # noqa: E402
from stagcli.convert import DTYPES, convert_model  # noqa: E402
from stagcli.decode import generate  # noqa: E402
from stagcli.devices import machine  # noqa: E402
from stagcli.layout import Layout  # noqa: E402
from stagcli.verify import VerifiedEngine, generate_verified  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bridge-depth", type=int, default=0, help="the bridge reads section 1's state after K layers")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf = source_model(args.shape, args.layers)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    verify = convert_model(hf, Layout(sections=2, mode="verify", bridge="ridge", bridge_depth=args.bridge_depth)).to(dev)
    fit_ridge(verify, torch.randint(3, vocab, (32, 128), generator=gen).to(dev), lam=1e-3)
    source = convert_model(hf)
    prompt = torch.randint(3, vocab, (args.batch, 32), generator=gen).to(dev)
    rows = []
    for dtype in ("float32", "bfloat16"):
        v, s = verify.to(dev, DTYPES[dtype]).eval(), source.to(dev, DTYPES[dtype]).eval()
        ref = generate(s, prompt, max_new_tokens=args.new_tokens).cpu()
        for compile in (False, True):
            engine = VerifiedEngine(v, args.batch, 32 + args.new_tokens + 2, compile=compile)
            out, stats = generate_verified(v, prompt, max_new_tokens=args.new_tokens, engine=engine)
            row = {"dtype": dtype, "compile": engine.compiled, "cuda_graph": engine.cuda_graph,
                   "identical_rows": int((out == ref).all(1).sum()), "rows": args.batch,
                   "first_difference": [int((o != r).nonzero()[0]) if (o != r).any() else None for o, r in zip(out, ref)],
                   "acceptance": stats.acceptance}
            rows.append(row)
            print(row, flush=True)
    Path(args.out).write_text(json.dumps({"machine": machine(dev), "command": " ".join(sys.argv), "shape": args.shape,
                                          "layers": args.layers, "bridge_depth": args.bridge_depth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
