"""Loss curves of the bridge runs (docs/results/bridge/*.png) from their metrics.jsonl files.

    python scripts/plot_bridge.py --out docs/results/bridge [--name e2e-heldout] NAME=RUN_DIR ...   # end-to-end fine-tunes
    python scripts/plot_bridge.py --out docs/results/bridge --bridge-training RUN_DIR [RUN_DIR ...]  # the bridge stage(s)

Several --bridge-training runs are stages resumed one from the other: their tokens are laid end to end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="NAME=RUN_DIR")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bridge-training", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--bridge-name", default="bridge-training", help="file name of the bridge-stage plot (.png)")
    ap.add_argument("--name", default="e2e-heldout", help="file name of the end-to-end plot (.png)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for item in args.runs:
            name, _, run = item.partition("=")
            held = [(r["tokens"], r["heldout_ppl"]) for r in rows(run) if r.get("heldout_ppl")]
            ax.plot(*zip(*held), marker="o", label=name)
        ax.set(xlabel="fine-tuning tokens", ylabel="kjv:heldout perplexity (16 x 256)", yscale="log",
               title="SmolLM2-135M: end-to-end fine-tune, 2-core CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{args.name}.png", dpi=100)
    if args.bridge_training:
        data, offset = [], 0
        for run in args.bridge_training:  # each stage counts its tokens from 0
            stage = rows(run)
            data += [{**r, "tokens": r["tokens"] + offset} for r in stage]
            offset += stage[-1]["tokens"]
        fig, ax = plt.subplots(figsize=(6, 4))
        train = [(r["tokens"], r["kl_loss"]) for r in data if r.get("kl_loss") is not None]
        ax.plot(*zip(*train), lw=0.8, label="train KL to the source")
        ax.set(xlabel="bridge-training tokens", ylabel="KL", title="SmolLM2-135M: bridge trained through the frozen model")
        twin = ax.twinx()
        held = [(r["tokens"], r["heldout_ppl"]) for r in data if r.get("heldout_ppl")]
        twin.plot(*zip(*held), "o-", color="C1", label="kjv:heldout ppl (8 x 256)")
        twin.set_ylabel("held-out perplexity")
        fig.legend(loc="upper right", bbox_to_anchor=(0.86, 0.86))
        fig.tight_layout()
        fig.savefig(out / f"{args.bridge_name}.png", dpi=100)


if __name__ == "__main__":
    main()
