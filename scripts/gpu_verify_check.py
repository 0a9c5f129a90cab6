"""On the GPU: verified staggering's tokens against the same engine's greedy decoding of the source
(decode.generate on the plain conversion), on real prompts, in each dtype; plus acceptance.

    python scripts/gpu_verify_check.py VERIFY_DIR --out check.json [--prompts 16 --new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stagcli.convert import DTYPES, convert_model, load_hf_model, load_model  # noqa: E402
from stagcli.data import load_packed  # noqa: E402
from stagcli.decode import generate  # noqa: E402
from stagcli.devices import machine  # noqa: E402
from stagcli.verify import VerifiedEngine, generate_verified  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("verify_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    verify, tokenizer = load_model(args.verify_dir)
    source = convert_model(load_hf_model(verify.config.stag_recipe["source"])[0])
    result = {"machine": machine(dev), "command": " ".join(sys.argv), "rows": []}
    for dtype in args.dtypes.split(","):
        v, s = verify.to(dev, DTYPES[dtype]).eval(), source.to(dev, DTYPES[dtype]).eval()
        engine = VerifiedEngine(v, args.batch_size, args.prompt_len + args.new_tokens + 2)
        for corpus in ("kjv:heldout", "pydoc:heldout"):
            prompts = load_packed(corpus, tokenizer, args.prompt_len)[:args.prompts].to(dev)
            same = drafted = accepted = 0
            for i in range(0, len(prompts), args.batch_size):
                p = prompts[i:i + args.batch_size]
                ours, stats = generate_verified(v, p, max_new_tokens=args.new_tokens, engine=engine)
                ref = generate(s, p, max_new_tokens=args.new_tokens).cpu()
                same += int((ours == ref).all(1).sum())
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
            row = {"dtype": dtype, "corpus": corpus, "prompts": len(prompts), "identical_rows": same,
                   "acceptance": accepted / drafted, "cuda_graph": engine.cuda_graph}
            result["rows"].append(row)
            print(row, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
