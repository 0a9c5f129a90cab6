"""Probe: how much a deeper view of the current token buys the bridge (docs/bridge.md, "What next").

Section 2 at position i reads a prediction of u_i (the residual after h = 15 layers) from what it
may see. Today's features are f_i = [E[x_i]; u_{i-1}; E[x_{i-1}]]: the current token enters only
as its embedding (depth 0). If section 2 started k layers after section 1 within a step, the bridge
could read the source's own residual h^k_i after k layers instead: f_i = [h^k_i; u_{i-1}; h^k_{i-1}],
at k more layers on the critical path. This fits the ridge map (closed form, as stag convert
--bridge ridge) for each k on KJV + the source's own samples and scores the exact-cache form (only
position i's own input predicted) on kjv:heldout and the off-domain pydoc / fortunes, as ratios
to the source on the same sequences.

    python scripts/probe_bridge_depth.py --depths 0,1,2,4 --results docs/results/bridge/depth-probe.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from ppl_ratio import HELDOUT, save_results
from stagcli.bridge import calibration_ids, solve_ridge
from stagcli.convert import convert_model, load_hf_model
from stagcli.data import load_packed
from stagcli.devices import machine
from stagcli.layout import Layout


def residuals(hf, ids, depth: int) -> tuple:
    """The source's residual stream after 0..depth layers, each [B, T, d] (a truncated forward; one
    layer more, because transformers' last hidden state is the final-normed one)."""
    layers = hf.model.layers
    hf.model.layers = layers[:depth + 1]
    try:
        return hf(ids, output_hidden_states=True).hidden_states
    finally:
        hf.model.layers = layers


def features(h_k, u):
    """[h^k_i; u_{i-1}; h^k_{i-1}; 1] at positions i >= 1, flattened to rows."""
    x = torch.cat([h_k[:, 1:], u[:, :-1], h_k[:, :-1], torch.ones_like(h_k[:, 1:, :1])], -1)
    return x.flatten(0, 1).double()


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--depths", default="0,1,2,4")
    ap.add_argument("--calibrate", action="append", default=None, help="default: kjv:train and self:131072")
    ap.add_argument("--calibrate-tokens", type=int, default=65536)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--results", required=True)
    args = ap.parse_args()
    depths = [int(k) for k in args.depths.split(",")]
    hf, tokenizer = load_hf_model(args.source)
    hf.eval()
    h = hf.config.num_hidden_layers // 2
    model = convert_model(hf, Layout(sections=2, mode="exact-cache", bridge="ridge")).eval()
    calibrate = args.calibrate or ["kjv:train", "self:131072"]
    if any(c.startswith("self") for c in calibrate):
        from stagcli.bridge import self_text
        source = convert_model(hf, Layout(sections=1))  # the source's own samples
        calibrate = [self_text(source, tokenizer, c) if c.startswith("self") else c for c in calibrate]
    ids = calibration_ids(calibrate, tokenizer, args.calibrate_tokens)
    n_feat = 3 * hf.config.hidden_size + 1
    xtx = {k: torch.zeros(n_feat, n_feat, dtype=torch.float64) for k in depths}
    xty = {k: torch.zeros(n_feat, hf.config.hidden_size, dtype=torch.float64) for k in depths}
    for start in range(0, len(ids), 8):
        states = residuals(hf, ids[start:start + 8], h)
        y = states[h][:, 1:].flatten(0, 1).double()
        for k in depths:
            x = features(states[k], states[h])
            xtx[k] += x.T @ x
            xty[k] += x.T @ y
        print(f"calibration {min(start + 8, len(ids))}/{len(ids)}", end="\r", file=sys.stderr, flush=True)
    rows = len(ids) * (ids.shape[1] - 1)
    weights = {}
    for k in depths:  # standardised ridge, as stagcli.bridge.fit_ridge; W here applies to the raw features
        scale, w = solve_ridge(xtx[k], xty[k], rows)
        weights[k] = w / torch.cat([scale, torch.ones(1, dtype=scale.dtype)])[:, None]
    record = {"machine": machine(torch.device("cpu")), "source": args.source, "split_at": h, "calibrate": calibrate,
              "calibrate_tokens": args.calibrate_tokens, "sequences": args.sequences, "seq_len": args.seq_len,
              "command": "python scripts/probe_bridge_depth.py " + " ".join(sys.argv[1:]), "source_ppl": {},
              "ratio": {str(k): {} for k in depths}}
    for name, spec in HELDOUT.items():
        x = load_packed(spec, tokenizer, args.seq_len)[:args.sequences]
        nll_source, nll = 0.0, {k: 0.0 for k in depths}
        for start in range(0, len(x), 4):
            chunk = x[start:start + 4]
            nll_source += F.cross_entropy(hf(chunk).logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
            states = residuals(hf, chunk, h)
            place = model.place(chunk)
            for k in depths:
                draft = (features(states[k], states[h]) @ weights[k]).float().view(len(chunk), -1, states[h].shape[-1])
                draft = torch.cat([states[h][:, :1], draft], 1)
                logits = model.logits(model.exact_cache_rows(states[h], draft, place))
                nll[k] += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        count = x[:, 1:].numel()
        record["source_ppl"][name] = float(torch.exp(nll_source / count))
        for k in depths:
            record["ratio"][str(k)][name] = float(torch.exp((nll[k] - nll_source) / count))
        print(name, {k: round(record["ratio"][str(k)][name], 3) for k in depths}, flush=True)
    save_results(__import__("pathlib").Path(args.results), record)


if __name__ == "__main__":
    main()
