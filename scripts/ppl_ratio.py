"""Held-out perplexity of models as ratios to the source's on the same sequences, on kjv:heldout and
off-domain pydoc:heldout and fortunes:heldout (scripts/fetch_offdomain.sh python3.11-doc fortunes), fp32,
the first 32 x 256 tokens of each.

    python scripts/ppl_ratio.py --source smollm2-135m --results docs/results/bridge/ppl.json NAME=MODEL_DIR ...

Each NAME=MODEL_DIR adds (or replaces) one entry of the results file, with the command that made it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stagcli.convert import load_model
from stagcli.data import load_packed
from stagcli.devices import machine, resolve_device
from stagcli.train import perplexity as ppl  # also imported by bridge_probe.py

HELDOUT = {"kjv": "kjv:heldout", "pydoc": "pydoc:heldout", "fortunes": "fortunes:heldout"}


def named_models_cli(doc: str, metavar: str, **options) -> tuple[argparse.Namespace, Path, dict]:
    """The command line shared by the measurement scripts: NAME=DIR ..., --source, --results and
    `options` (name -> (type, default)); returns (args, results path, the record so far)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar=metavar)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--results", required=True)
    ap.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    for name, (kind, default) in options.items():
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    args = ap.parse_args()
    args.device = resolve_device(args.device)
    path = Path(args.results)
    return args, path, json.loads(path.read_text()) if path.exists() else {"entries": {}}


def save_results(path: Path, record: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def main():
    args, path, record = named_models_cli(__doc__, "NAME=MODEL_DIR", sequences=(int, 32), seq_len=(int, 256))
    source, tokenizer = load_model(args.source)
    source = source.to(args.device)
    ids = {n: load_packed(spec, tokenizer, args.seq_len)[:args.sequences] for n, spec in HELDOUT.items()}
    record.update(machine=machine(args.device), source=args.source, sequences=args.sequences, seq_len=args.seq_len,
                  source_ppl={n: ppl(source, x) for n, x in ids.items()})
    del source
    for item in args.models:
        name, _, model_dir = item.partition("=")
        model = load_model(model_dir)[0].to(args.device)
        values = {n: ppl(model, x) for n, x in ids.items()}
        record["entries"][name] = {"model": model_dir, "ppl": values,
                                   "ratio": {n: values[n] / record["source_ppl"][n] for n in ids},
                                   "recipe": model.config.stag_recipe,
                                   "command": "python scripts/ppl_ratio.py " + " ".join(sys.argv[1:])}
        print(name, {n: round(v, 3) for n, v in record["entries"][name]["ratio"].items()}, flush=True)
    save_results(path, record)


if __name__ == "__main__":
    main()
