"""Acceptance rate of verified staggering (--mode verify models) over many real prompts, greedy, on
kjv:heldout and the off-domain pydoc:heldout and fortunes:heldout; checks on the way that every token equals the
source's own greedy decoding (the engine's promise).

    python scripts/verify_acceptance.py --results docs/results/bridge/acceptance.json NAME=VERIFY_DIR ...

Each NAME=VERIFY_DIR adds (or replaces) one entry of the results file, with the command.
--reference own: compare each model with its own exact computation instead of --source's (a verify
model fine-tuned after conversion: its forward is the fine-tuned source, which the engine must reproduce).
"""
from __future__ import annotations

import sys
import time

import torch

from ppl_ratio import HELDOUT, named_models_cli, save_results  # scripts/ppl_ratio.py
from stagcli.convert import load_model
from stagcli.data import load_packed
from stagcli.decode import generate
from stagcli.devices import machine
from stagcli.model import StagConfig, StagForCausalLM
from stagcli.verify import generate_verified



def own_source(model) -> StagForCausalLM:
    """The one-section model that a verify-layout model's full forward computes: its sections' layers
    end to end (block j of section s becomes layer s * depth + j), the bridge left out."""
    keep = {"sections": 1, "verified": False, "exact_cache": False, "bridge_depth": 0, "section_input": "zero"}
    one = StagForCausalLM(StagConfig(**{**model.config.to_dict(), **keep}))
    state, depth = {}, model.config.depth
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, j, rest = name.split(".", 2)
            for s in range(model.config.sections):
                state[f"blocks.{s * depth + int(j)}.{rest}"] = tensor[s:s + 1]
        elif not name.startswith("section_input."):
            state[name] = tensor
    one.load_state_dict(state)
    return one.to(model.embed.weight.device).eval()


def greedy(model, prompts, args):
    return torch.cat([generate(model, prompts[i:i + args.batch_size], max_new_tokens=args.new_tokens).cpu()
                      for i in range(0, len(prompts), args.batch_size)])


def main():
    args, path, record = named_models_cli(__doc__, "NAME=VERIFY_DIR", prompts=(int, 32), prompt_len=(int, 64),
                                          new_tokens=(int, 64), batch_size=(int, 8), reference=(str, "source"))
    if args.reference not in ("source", "own"):
        sys.exit("--reference is source or own")
    source, tokenizer = load_model(args.source)
    source = source.to(args.device)
    torch.set_grad_enabled(False)
    prompts = {n: load_packed(spec, tokenizer, args.prompt_len)[:args.prompts] for n, spec in HELDOUT.items()}
    reference = {n: greedy(source, p, args) for n, p in prompts.items()} if args.reference == "source" else None
    record.update(machine=machine(args.device), source=args.source, prompts=args.prompts, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, batch_size=args.batch_size)
    for item in args.models:
        name, _, model_dir = item.partition("=")
        model = load_model(model_dir)[0].to(args.device).eval()
        if args.reference == "own":
            own = own_source(model)
            reference = {n: greedy(own, p, args) for n, p in prompts.items()}
        entry = {"model": model_dir, "recipe": model.config.stag_recipe, "acceptance": {}, "tokens_per_step": {},
                 "identical_to_source": {}, "reference": args.reference,
                 "command": "python scripts/verify_acceptance.py " + " ".join(sys.argv[1:])}
        for corpus, p in prompts.items():
            drafted = accepted = steps = emitted = 0
            outputs = []
            start = time.perf_counter()
            for i in range(0, len(p), args.batch_size):
                tokens, stats = generate_verified(model, p[i:i + args.batch_size], max_new_tokens=args.new_tokens)
                outputs.append(tokens)
                drafted, accepted, steps = drafted + stats.drafted, accepted + stats.accepted, steps + stats.steps
                emitted += sum(stats.emitted) / len(stats.emitted) - 1  # the prefill's token is no step's
            entry["acceptance"][corpus] = accepted / drafted
            entry["tokens_per_step"][corpus] = emitted / steps
            entry["identical_to_source"][corpus] = bool(torch.equal(torch.cat(outputs), reference[corpus]))
            entry.setdefault("seconds", {})[corpus] = round(time.perf_counter() - start, 1)
        record["entries"][name] = entry
        print(name, {k: entry[k] for k in ("acceptance", "identical_to_source")}, flush=True)
    save_results(path, record)


if __name__ == "__main__":
    main()
