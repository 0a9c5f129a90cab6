"""Probe: what the first fine-tuning steps do to a shared-weights conversion of the real SmolLM2-135M,
for several learning-rate scales of the added cross-attention (--cross-lr-scale), against the control.

    python scripts/probe_cross_lr.py SCALE [--control] [--warmup N] [--out DIR]

Six steps of 2,048 KJV tokens (seq 256 x batch 4 x accum 2), lr 2e-4, held-out loss on 16 fixed
kjv:heldout sequences every 2 steps. Prints one JSON line; ~6 min (control) to ~12 min (shared) on 2 CPU
cores. The results in docs/results/cross-lr-probe/ came from this script (docs/finetune.md).
"""
import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from stagcli.convert import convert_model, load_hf_model  # noqa: E402
from stagcli.layout import Layout  # noqa: E402
from stagcli.train import TrainConfig, finetune  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("scale", type=float)
parser.add_argument("--control", action="store_true", help="the unconverted model instead of shared p=2")
parser.add_argument("--warmup", type=int, default=0)
parser.add_argument("--out", default="runs/cross-lr-probe")
args = parser.parse_args()

hf, tokenizer = load_hf_model("smollm2-135m")
model = convert_model(hf) if args.control else convert_model(hf, Layout(sections=2, mode="shared"))
cfg = TrainConfig.from_dict(dict(data=["kjv:train"], heldout=["kjv:heldout"], seq_len=256, batch_size=4,
                                 grad_accum=2, lr=2e-4, max_steps=6, eval_every=2, eval_sequences=16,
                                 save_every=1000, cross_lr_scale=args.scale, warmup_steps=args.warmup))
name = f"{'control' if args.control else 'shared2'}-scale{args.scale:g}-warmup{args.warmup}"
out = os.path.join(args.out, name)
shutil.rmtree(out, ignore_errors=True)
finetune(model, tokenizer, cfg, out)
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
print(json.dumps({"run": name, "cross_lr_scale": None if args.control else args.scale, "warmup_steps": args.warmup,
                  "heldout_loss": {r["step"]: round(r["heldout_loss"], 4) for r in rows if "heldout_loss" in r},
                  "train_loss": {r["step"]: round(r["loss"], 4) for r in rows if "loss" in r}}))
