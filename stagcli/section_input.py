"""What section s > 0 reads as its input at position i (split models).

In the source model, layer h+1 reads r_i, the residual stream after the h layers below. A
staggered section may read only the token embeddings E[x_<=i], the section below's outputs
u_<i (strictly before i), and its own states. An input form turns those into the section's input:

    zero:    E[x_i]                                  (the paper's form)
    lagged:  E[x_i] + (u_{i-1} - E[x_{i-1}])         [ours] the lower layers' last contribution
    ridge:   W [f; 1]                                [ours] a bridge: a linear map fitted in closed form
    mlp:     W [f; 1] + MLP(f)                       [ours] a bridge: the ridge map plus a learned MLP
with f = [E[x_i]; u_{i-1}; E[x_{i-1}]] / scale (each feature divided by its RMS on calibration
text). A bridge predicts what the source's lower layers would have given section s at i (see
docs/bridge.md and stagcli/bridge.py, which fits and trains them).

Every form sees the same features (E[x_i], E[x_{i-1}], u_{i-1}, whether i-1 exists), stacked over
section boundaries [C, B, T, d], so all sections' inputs of a decode step are one batched op.
A new form is a subclass plus one line in INPUTS.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import StackedLinear


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


class Bridge(SectionInput):
    """Base of the learned inputs: the standardised features f [C, B, T, 3d]."""

    def __init__(self, cfg, boundaries: int):
        super().__init__(cfg, boundaries)
        self.features = 3 * cfg.hidden_size
        # per-feature RMS on the calibration text (set by stag convert --calibrate; saved with the model)
        self.register_buffer("feature_scale", torch.ones(boundaries, self.features))

    def standardised(self, emb, prev_emb, prev_below, prev_ok, sets):
        ok = prev_ok[..., None].to(prev_below.dtype)
        f = torch.cat([emb.expand_as(prev_below), prev_below * ok, prev_emb.expand_as(prev_below) * ok], -1)
        return f / self.feature_scale[sets].view(-1, *([1] * (f.dim() - 2)), f.shape[-1]).to(f.dtype)


class Ridge(Bridge):
    def __init__(self, cfg, boundaries: int):
        super().__init__(cfg, boundaries)
        self.linear = StackedLinear(boundaries, self.features, cfg.hidden_size, bias=True)

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets):
        return self.linear(self.standardised(emb, prev_emb, prev_below, prev_ok, sets), sets)


class MLP(Ridge):
    """The ridge map (`linear`, the skip path) plus a one-hidden-layer MLP whose output starts at zero:
    converted, it computes exactly the ridge bridge; training only adds. Bridge training leaves the
    fitted map as it is (the least-squares optimum of a linear map; Adam's first steps would jolt it)
    and learns the MLP on the residual."""

    fitted = ("linear",)

    def __init__(self, cfg, boundaries: int):
        super().__init__(cfg, boundaries)
        self.up = StackedLinear(boundaries, self.features, cfg.bridge_hidden, bias=True)
        self.down = StackedLinear(boundaries, cfg.bridge_hidden, cfg.hidden_size, bias=True, zero_init=True)

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets):
        f = self.standardised(emb, prev_emb, prev_below, prev_ok, sets)
        return self.linear(f, sets) + self.down(F.gelu(self.up(f, sets)), sets)


INPUTS = {"zero": Embedding, "lagged": Lagged, "ridge": Ridge, "mlp": MLP}
INITS = ("zero", "lagged")
BRIDGES = ("ridge", "mlp")
