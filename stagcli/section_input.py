"""What section s > 0 reads as its input at position i (split models).

In the source model, layer h+1 reads r_i, the residual stream after the h layers below. A
staggered section may read only the token embeddings E[x_<=i], the section below's outputs
u_<i (strictly before i), and its own states. An input form turns those into the section's input:

    zero:    E[x_i]                                  (the paper's form)
    lagged:  E[x_i] + (u_{i-1} - E[x_{i-1}])         [ours] the lower layers' last contribution

Every form sees the same features (E[x_i], E[x_{i-1}], u_{i-1}, whether i-1 exists), stacked over
section boundaries [C, B, T, d], so all sections' inputs of a decode step are one batched op.
A new form is a subclass plus one line in INPUTS.
"""
from __future__ import annotations

import torch.nn as nn


class SectionInput(nn.Module):
    def __init__(self, cfg, boundaries: int):
        super().__init__()

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets: slice):
        """emb, prev_emb: [B, T, d]; prev_below: [C, B, T, d] (u_{i-1} of each row's section below);
        prev_ok: [B, T] bool; sets: the boundaries' weight sets. Returns [C, B, T, d]."""
        raise NotImplementedError


class Embedding(SectionInput):
    def forward(self, emb, prev_emb, prev_below, prev_ok, sets):
        return emb.expand(prev_below.shape[0], *emb.shape)


class Lagged(SectionInput):
    def forward(self, emb, prev_emb, prev_below, prev_ok, sets):
        return emb + (prev_below - prev_emb) * prev_ok[..., None].to(emb.dtype)


INPUTS = {"zero": Embedding, "lagged": Lagged}
INITS = tuple(INPUTS)
