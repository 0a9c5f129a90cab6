"""Issue-13 measurements: held-out perplexity of split conversions with each section input, as ratios
to the source on the same sequences, on kjv:heldout and off-domain pydoc:heldout.

    python scripts/bridge_probe.py --sections 2 --out runs/bridge --results docs/results/bridge
        [--forms zero,lagged,ridge,mlp] [--bridge-tokens 1000000] [--bridge-minutes 60]

Each form is converted with `stag convert` (ridge / mlp: --calibrate kjv:train); the mlp bridge is
then trained with `stag finetune --objective bridge` on kjv:train (never on the held-out text). The
scores run in fp32 on the first --eval-sequences x --seq-len tokens of each held-out corpus.
Results: RESULTS/sections-P.json (merged over runs). Needs scripts/fetch_offdomain.sh for pydoc.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppl_ratio import HELDOUT, ppl  # scripts/ppl_ratio.py: the same scoring
from stagcli.convert import convert, load_model
from stagcli.data import load_packed
from stagcli.devices import machine
from stagcli.layout import Layout
from stagcli.train import TrainConfig, finetune


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--sections", type=int, default=2)
    ap.add_argument("--forms", default="zero,lagged,ridge,mlp")
    ap.add_argument("--out", default="runs/bridge")
    ap.add_argument("--results", default="docs/results/bridge")
    ap.add_argument("--calibrate-tokens", type=int, default=65536)
    ap.add_argument("--bridge-tokens", type=float, default=1e6)
    ap.add_argument("--bridge-lr", type=float, default=3e-4)
    ap.add_argument("--bridge-minutes", type=float, default=60)
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.manual_seed(0)
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"sections-{args.sections}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(machine=machine(), source=args.source, sections=args.sections, eval_sequences=args.eval_sequences,
                  seq_len=args.seq_len, command="python scripts/bridge_probe.py " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    source, tokenizer = load_model(args.source)
    ids = {name: load_packed(spec, tokenizer, args.seq_len)[:args.eval_sequences] for name, spec in HELDOUT.items()}
    record["source_ppl"] = {name: ppl(source, x) for name, x in ids.items()}
    print("source", record["source_ppl"], flush=True)
    del source
    forms = record.setdefault("forms", {})
    for form in args.forms.split(","):
        bridge = form if form in ("ridge", "mlp") else None
        layout = Layout(sections=args.sections, bridge=bridge, init="zero" if bridge else form)
        target = out / f"p{args.sections}-{form}"
        start = time.perf_counter()
        if not (target / "config.json").is_file():
            convert(args.source, str(target), layout, force=target.exists(),
                    calibrate=["kjv:train"] if bridge else None, calibrate_tokens=args.calibrate_tokens)
        entry = {"convert_s": round(time.perf_counter() - start, 1)}
        model = load_model(str(target))[0]
        entry["ppl"] = {name: ppl(model, x) for name, x in ids.items()}
        if form == "mlp":
            trained = out / f"p{args.sections}-mlp-trained"
            if not (trained / "config.json").is_file():
                cfg = TrainConfig(data=["kjv:train"], heldout=["kjv:heldout"], seq_len=args.seq_len, batch_size=8,
                                  lr=args.bridge_lr, max_tokens=int(args.bridge_tokens), objective="bridge",
                                  eval_every=50, eval_sequences=8, save_every=100, seed=0,
                                  max_minutes=args.bridge_minutes)
                summary = finetune(model, tokenizer, cfg, trained, force=trained.exists())
                entry["bridge_training"] = {k: summary[k] for k in ("steps", "tokens", "tokens_per_s", "peak_memory_mb")}
            model = load_model(str(trained))[0] if (trained / "config.json").is_file() else model
            entry["ppl_trained"] = {name: ppl(model, x) for name, x in ids.items()}
            rows = [json.loads(line) for line in (trained / "metrics.jsonl").open()]
            entry["bridge_curve"] = [{k: r.get(k) for k in ("step", "tokens", "bridge_mse", "heldout_ppl", "tokens_per_s")}
                                     for r in rows]
        for key in ("ppl", "ppl_trained"):
            if key in entry:
                entry[key + "_ratio"] = {n: entry[key][n] / record["source_ppl"][n] for n in ids}
        forms[form] = entry
        print(form, json.dumps({k: v for k, v in entry.items() if k != "bridge_curve"}), flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
