"""What section s > 0 reads as its input at position i (split models).

In the source model, layer h+1 reads r_i, the residual stream after the h layers below. A
staggered section may read only the token embeddings E[x_<=i], the section below's outputs
u_<i (strictly before i), and its own states. An input form turns those into the section's input:

    zero:    E[x_i]                                  (the paper's form)
    lagged:  E[x_i] + (u_{i-1} - E[x_{i-1}])         [ours] the lower layers' last contribution
    ridge:   W [f; 1]                                [ours] a bridge: a linear map fitted in closed form
    mlp:     W [f; 1] + MLP(f)                       [ours] a bridge: the ridge map plus a learned MLP
    attn:    W [f; 1] + Layer(f_<=i)                 [ours] a bridge: the ridge map plus one decoder
                                                     layer over the bridge's own rows f_j, j <= i
with f = [E[x_i]; u_{i-1}; E[x_{i-1}]] / scale (each feature divided by its RMS on calibration
text). In the verify layouts with bridge_depth k > 0, E[x] is replaced by section 1's state after k
layers (StagForCausalLM.lower_section), the "view" the forms receive as `emb`. A bridge predicts what the source's lower layers would have given section s at i (see
docs/bridge.md and stagcli/bridge.py, which fits and trains them).

Every form sees the same features (E[x_i], E[x_{i-1}], u_{i-1}, whether i-1 exists), stacked over
section boundaries [C, B, T, d], so all sections' inputs of a decode step are one batched op.
A form that attends over its earlier rows (`attends`) also gets `Rows`: where this call's rows
sit, and the cache that holds the earlier ones while decoding.
A new form is a subclass plus one line in INPUTS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import StackedLinear, StackedNorm, apply_rope, attend, attention_masks, merge_heads, split_heads


@dataclass
class Rows:
    """Where a call's section-input rows sit, for a form that attends over earlier rows: cache slots
    ([T], or [B, T] when rows differ), which key slots hold real tokens [B, K], RoPE (cos, sin) at the
    rows' positions (None without RoPE), and the decode cache (None in a full-sequence forward,
    where this call's rows are all the rows there are)."""
    slots: torch.Tensor
    key_valid: torch.Tensor
    rope: tuple | None
    cache: object = None


class SectionInput(nn.Module):
    attends = False  # True: forward needs `rows` (and decoding keeps this form's K/V in the cache)

    def __init__(self, cfg, boundaries: int):
        super().__init__()

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets: slice, rows: Rows | None = None):
        """emb, prev_emb: [B, T, d]; prev_below: [C, B, T, d] (u_{i-1} of each row's section below);
        prev_ok: [B, T] bool; sets: the boundaries' weight sets; rows: see Rows (forms that attend).
        Returns [C, B, T, d]."""
        raise NotImplementedError


class Embedding(SectionInput):
    def forward(self, emb, prev_emb, prev_below, prev_ok, sets, rows=None):
        return emb.expand(prev_below.shape[0], *emb.shape)


class Lagged(SectionInput):
    def forward(self, emb, prev_emb, prev_below, prev_ok, sets, rows=None):
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

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets, rows=None):
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

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets, rows=None):
        f = self.standardised(emb, prev_emb, prev_below, prev_ok, sets)
        return self.linear(f, sets) + self.down(F.gelu(self.up(f, sets)), sets)


class Attention(Ridge):
    """The ridge map (the skip path) plus one pre-norm decoder layer over the bridge's own rows,
    EAGLE-style: row j is inp(f_j), and row i's causal self-attention reads rows j <= i. One previous
    position (mlp) cannot tell what the lower layers make of the current token in its context; rows
    further back can: after an earlier occurrence of x_i, row j+1 holds E[x_j] and u_j, what the lower
    layers made of it there (names, identifiers and phrases repeat). The output projection starts at
    zero: converted, it computes the ridge bridge; training only adds. Decoding keeps the layer's
    K/V per boundary in the cache (StagCache.bridge_k), one more layer on section s's critical path."""

    fitted = ("linear",)
    attends = True

    def __init__(self, cfg, boundaries: int):
        super().__init__(cfg, boundaries)
        d, hd, C = cfg.hidden_size, cfg.head_dim, boundaries
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.inp = StackedLinear(C, self.features, d, bias=True)
        self.attn_norm, self.mlp_norm = (StackedNorm(C, d, "rms", cfg.norm_eps) for _ in range(2))
        self.qkv_sizes = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd]
        self.qkv = StackedLinear(C, d, sum(self.qkv_sizes), bias=False)
        self.o = StackedLinear(C, self.heads * hd, d, bias=False)
        self.up = StackedLinear(C, d, cfg.bridge_hidden, bias=True)
        self.down = StackedLinear(C, cfg.bridge_hidden, d, bias=True)
        self.out = StackedLinear(C, d, d, bias=True, zero_init=True)

    def forward(self, emb, prev_emb, prev_below, prev_ok, sets, rows=None):
        if rows is None:
            raise ValueError("the attention bridge needs its rows' places (StagForCausalLM.section_inputs passes them)")
        f = self.standardised(emb, prev_emb, prev_below, prev_ok, sets)
        z = self.inp(f, sets)
        q, k, v = self.qkv(self.attn_norm(z, sets), sets).split(self.qkv_sizes, -1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        if rows.rope is not None:
            q, k = apply_rope(q, *rows.rope), apply_rope(k, *rows.rope)
        if rows.cache is not None:
            k, v = rows.cache.update_bridge(sets, rows.slots, k, v)
        causal = attention_masks(rows.key_valid, rows.slots, None)[0]
        z = z + self.o(merge_heads(attend(q, k, v, causal)), sets)
        z = z + self.down(F.gelu(self.up(self.mlp_norm(z, sets), sets)), sets)
        return self.linear(f, sets) + self.out(z, sets)


INPUTS = {"zero": Embedding, "lagged": Lagged, "ridge": Ridge, "mlp": MLP, "attn": Attention}
INITS = ("zero", "lagged")
BRIDGES = ("ridge", "mlp", "attn")
