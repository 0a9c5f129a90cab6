"""Fitting a bridge in closed form (stag convert --bridge ... --calibrate DATA).

A bridge (section_input.Ridge / MLP) predicts section s's missing input, the source's residual
stream after the layers below, from what section s may read at position i: f = [E[x_i]; u_{i-1};
E[x_{i-1}]] (E[x] replaced by section 1's state after bridge_depth layers where that is set). Its
linear part is fitted here as a ridge regression on the source's own activations
over calibration text: the features are standardised (each divided by its RMS, kept as
`feature_scale`), and W = (X^T X + lambda n I)^-1 X^T Y with a bias column. The targets come
from the converted model itself (model.exact_outputs: its sections still hold the source's layers),
so no second copy of the source is needed. Training the MLP part: stag finetune --objective bridge.
"""
from __future__ import annotations

import json
import math

import torch

from .errors import StagError

RIDGE_LAMBDA = 1e-4       # relative to a standardised feature's mean square (= 1); measured best of 1e-5..3 (docs/bridge.md)
CALIBRATION_SEQ_LEN = 256


def calibration_ids(data, tokenizer, tokens: int, seq_len: int = CALIBRATION_SEQ_LEN) -> torch.Tensor:
    """`tokens` tokens of calibration text as [N, seq_len], an equal share from each data spec."""
    from .data import split_specs, load_packed
    if tokenizer is None:
        raise StagError("the source has no tokenizer to read the calibration text with")
    specs = split_specs(data)
    wanted = math.ceil(tokens / seq_len / len(specs))
    parts = []
    for spec in specs:
        packed = load_packed(spec, tokenizer, seq_len)
        if len(packed) < wanted:
            raise StagError(f"the calibration data {spec} gives {len(packed) * seq_len:,} tokens; its share of "
                            f"--calibrate-tokens is {wanted * seq_len:,}: give more text or fewer tokens")
        parts.append(packed[:wanted])
    return torch.cat(parts)


@torch.no_grad()
def fit_ridge(model, ids: torch.Tensor, batch_size: int = 8, progress=None, lam: float = RIDGE_LAMBDA):
    """Fit every boundary's linear bridge (model.section_input.linear) and feature scale on ids [N, T]."""
    cfg = model.config
    bridge = model.section_input
    d, C = cfg.hidden_size, cfg.sections - 1
    features = bridge.features
    n_rows = ids.shape[0] * (ids.shape[1] - 1)
    if n_rows <= features:
        raise StagError(f"calibration needs more than {features + 1} positions for {features} features; "
                        f"got {n_rows}: raise --calibrate-tokens")
    xtx = torch.zeros(C, features + 1, features + 1, dtype=torch.float64)
    xty = torch.zeros(C, features + 1, d, dtype=torch.float64)
    report = progress or (lambda done, total: None)
    batches = range(0, len(ids), batch_size)
    for done, start in enumerate(batches):
        report(done, len(batches))
        chunk = ids[start:start + batch_size].to(model.embed.weight.device)
        emb, targets = model.exact_states(chunk, upto=C)  # emb: what the bridge reads of each token
        for c, u in enumerate(targets):
            x = torch.cat([emb[:, 1:], u[:, :-1], emb[:, :-1], torch.ones_like(emb[:, 1:, :1])], -1)
            x, y = x.flatten(0, 1).double().cpu(), u[:, 1:].flatten(0, 1).double().cpu()
            xtx[c] += x.T @ x
            xty[c] += x.T @ y
    report(len(batches), len(batches))
    for c in range(C):
        scale, w = solve_ridge(xtx[c], xty[c], n_rows, lam)
        bridge.feature_scale[c].copy_(scale.float())
        bridge.linear.weight.data[c].copy_(w[:features].T.float())
        bridge.linear.bias.data[c].copy_(w[features].float())
    return model


def solve_ridge(xtx, xty, n_rows: int, lam: float = RIDGE_LAMBDA):
    """The ridge map from accumulated moments X^T X [F + 1, F + 1] and X^T Y [F + 1, d] over n_rows rows
    (X's last column: ones, the bias). Each feature is standardised by its RMS, so one lambda fits
    features of any scale; the bias is not penalised. Returns (scale [F], W [F + 1, d]): y = [f / scale; 1] W."""
    features = xtx.shape[0] - 1
    scale = (xtx.diagonal()[:features] / n_rows).sqrt().clamp(min=1e-6)
    inv = torch.cat([1 / scale, torch.ones(1, dtype=xtx.dtype)])
    a = inv[:, None] * xtx * inv[None, :]  # the standardised X^T X (bias column unscaled)
    a += lam * n_rows * torch.diag(torch.cat([torch.ones(features, dtype=xtx.dtype), torch.zeros(1, dtype=xtx.dtype)]))
    return scale, torch.linalg.solve(a, inv[:, None] * xty)


# --- the source's own text: domain-general calibration and training data ----------------------------
SELF_PREFIX = "self"


def is_self_spec(spec: str) -> bool:
    return spec == SELF_PREFIX or spec.startswith(SELF_PREFIX + ":")


def source_fingerprint(model) -> str:
    """What decides a 1-section model's samples: its config less the staggering fields (a new option
    must not resample) and per tensor its shape and sum (10 digits: summation order may differ)."""
    from .layout import Layout
    skip = {*Layout(sections=1).config_fields(), "bridge_hidden", "stag_recipe", "transformers_version"}
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip and not k.startswith("_")}
    sums = [(n, list(p.shape), f"{float(p.detach().sum(dtype=torch.float64)):.10g}") for n, p in model.named_parameters()]
    return json.dumps([config, sums], sort_keys=True, default=str)


def self_text(model, tokenizer, spec: str, seq_len: int = 256, batch: int = 64, progress=None) -> str:
    """`self:N` (default N = 65536): N tokens the source model samples itself (temperature 1), each row
    started from a random common token, decoded to text and cached as JSONL under
    $STAG_CACHE/selftext. A bridge fitted only on KJV collapses on other text (Python docs: 28x the
    source's perplexity); the source's own samples cover its whole domain (docs/bridge.md)."""
    import hashlib

    from .corpora import cache_dir
    from .decode import generate
    from .files import new_file
    tokens = int(spec.partition(":")[2] or 65536)
    if model.config.sections != 1:
        raise ValueError("self_text samples the source: give it a 1-section conversion")
    key = hashlib.sha256(source_fingerprint(model).encode())
    path = cache_dir() / "selftext" / f"{key.hexdigest()[:16]}-{tokens}.jsonl"
    if path.exists():
        return str(path)
    rows = math.ceil(tokens / seq_len)
    starts = torch.randint(200, min(model.config.vocab_size, 20000), (rows, 1), generator=torch.Generator().manual_seed(0))
    report = progress or (lambda done, total: None)
    with new_file(path) as tmp, tmp.open("w") as f:
        for done, first in enumerate(range(0, rows, batch)):
            report(done * batch, rows)
            start = starts[first:first + batch]
            out = generate(model, start, max_new_tokens=seq_len - 1, temperature=1.0, seed=first)
            for row in torch.cat([start, out], 1).tolist():
                f.write(json.dumps({"text": tokenizer.decode(row, skip_special_tokens=True)}) + "\n")
        report(rows, rows)
    return str(path)
