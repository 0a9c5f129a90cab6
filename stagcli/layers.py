"""The numeric building blocks every StagFormer module uses: stacked linear maps and norms (one
weight set per section, so several sections run as one bmm), RoPE (tables computed once), the
attention call (grouped-query, no K/V copies) and the masks.

Shapes: activations are [S, B, T, d] (S = section rows run together), heads [S, B, H, T, hd].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class StackedLinear(nn.Module):
    """`sets` linear maps in one [sets, out, in] tensor, so several sections run as one bmm."""

    def __init__(self, sets, d_in, d_out, bias, zero_init=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(sets, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(sets, d_out)) if bias else None
        self.zero_init = zero_init  # an added output projection starts at zero (the model is unchanged)

    def forward(self, x, sets: slice, in_features: int | None = None):  # x [S, ..., d_in]
        w = self.weight[sets]
        if in_features is not None and in_features < w.shape[-1]:  # only the leading input columns
            w = w[..., :in_features]
        b = None if self.bias is None else self.bias[sets]
        rows = x.shape[:-1].numel() // w.shape[0]
        if few_rows_on_cpu(x, rows):  # a decode step on CPU
            y = few_row_matmul(x.reshape(w.shape[0], rows, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
        elif w.shape[0] == 1:  # a single section, or shared weights: one plain GEMM for all rows
            return F.linear(x, w[0], None if b is None else b[0])
        else:
            y = torch.matmul(x.flatten(1, -2), w.transpose(1, 2)).view(*x.shape[:-1], w.shape[1])
        return y if b is None else y + b.view(b.shape[0], *([1] * (x.dim() - 2)), -1)


FEW_ROWS = 8


def few_rows_on_cpu(x, rows: int) -> bool:
    return x.device.type == "cpu" and rows <= FEW_ROWS and not torch.is_grad_enabled()


def few_row_matmul(x, w):
    """x [S, M, in] @ w [S, out, in]^T for the few rows M of a decode step on CPU. BLAS multiplies a
    few rows by a weight much more slowly than the transposed product w @ x^T, which streams the
    weight at memory speed (SmolLM2's 49,152 x 576 head: 2 rows 13.9 ms -> 2.3 ms; one layer's
    [2, 3072, 576] gate-up, 2 rows: 0.90 -> 0.38 ms); a single row is doubled to take that path."""
    single = x.shape[1] == 1
    y = torch.bmm(w, (torch.cat([x, x], 1) if single else x).transpose(1, 2)).transpose(1, 2)
    return y[:, :1] if single else y


def few_row_logits(hidden, weight):
    """hidden @ weight^T: through few_row_matmul for a decode step's rows on CPU."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if not few_rows_on_cpu(hidden, rows.shape[0]):
        return F.linear(hidden, weight)
    return few_row_matmul(rows[None], weight[None])[0].reshape(*hidden.shape[:-1], weight.shape[0])


def rms_norm(x, eps):
    """RMS normalisation computed in fp32, like transformers' LlamaRMSNorm."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class StackedNorm(nn.Module):
    """RMSNorm (Llama family) or LayerNorm (GPT-2), one weight row per set."""

    def __init__(self, sets, dim, kind, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(sets, dim))
        self.bias = nn.Parameter(torch.zeros(sets, dim)) if kind == "layer" else None

    def forward(self, x, sets: slice):
        shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.kind == "rms":
            return self.weight[sets].view(shape) * rms_norm(x, self.eps)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight[sets].view(shape) + self.bias[sets].view(shape)


# --- RoPE ---------------------------------------------------------------------------------------
ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_inv_freq(cfg, device=None):
    """RoPE inverse frequencies [head_dim / 2], with the source's scaling ('linear', or Llama 3.1's
    'llama3': long wavelengths slowed by `factor`, a smooth blend between)."""
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd)
    scaling = cfg.rope_scaling_params or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > context / low, inv / factor, inv)
        smooth = (context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, blended, scaled)
    return inv


class RopeTable:
    """cos/sin for every position below a length, computed once per (device, dtype) and then only
    looked up (gpt-fast style). The caller names the length it needs (the sequence, or the cache's
    max_len), a python int: a lookup never syncs with the device, so a decode step stays capturable."""

    def __init__(self, cfg):
        self.cfg, self.tables = cfg, {}

    def __call__(self, positions, length: int, dtype):
        """(cos, sin) [B, T, head_dim] for integer positions [B, T] < length (rotate-half convention)."""
        key = (str(positions.device), dtype)
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < length:
            size = max(length, 2 * table[0].shape[0] if table is not None else 256)
            freqs = torch.arange(size, device=positions.device).float()[:, None] * rope_inv_freq(self.cfg, positions.device)
            emb = torch.cat([freqs, freqs], -1)
            table = self.tables[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return table[0][positions], table[1][positions]


def apply_rope(x, cos, sin):  # x [S, B, H, T, hd], cos/sin [B, T, hd]
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


# --- attention ----------------------------------------------------------------------------------
def split_heads(x, n):  # [S, B, T, n*hd] -> [S, B, n, T, hd]
    return x.view(*x.shape[:3], n, -1).transpose(2, 3)


def merge_heads(x):  # [S, B, H, T, hd] -> [S, B, T, H*hd]
    return x.transpose(2, 3).flatten(3)


def attend(q, k, v, mask):
    """q [S,B,H,T,hd], k/v [S,B,Hkv,K,hd], boolean mask [B,G,T,K] -> [S,B,H,T,hd]. G = 1: one mask
    for all heads; G = 2: the first half of the K/V heads (and their query heads) use mask[:, 0],
    the second half mask[:, 1] (the parallel form's self and cross heads in one call)."""
    S, B, H, T, hd = q.shape
    Hkv, K = k.shape[2], k.shape[3]
    group, G = H // Hkv, mask.shape[1]
    # Grouped-query attention without copying K/V: the `group` query heads that share a K/V head
    # become `group * T` query rows of that head (head h reads K/V head h // group, as in Llama).
    q = q.reshape(S * B, Hkv, group * T, hd)
    heads = 1 if G == 1 else Hkv  # a mask per K/V head only when the heads' masks differ
    mask = mask[:, :, None, None].expand(B, G, heads // G, group, T, K).reshape(B, heads, group * T, K)
    mask = mask.expand(S, *mask.shape).reshape(S * B, heads, group * T, K)
    flat = lambda t: t.reshape(S * B, *t.shape[2:])
    # reshape, not view: CUDA's memory-efficient kernel returns a non-contiguous [.., T, H, ..] layout
    return F.scaled_dot_product_attention(q, flat(k), flat(v), attn_mask=mask).reshape(S, B, H, T, hd)


def attention_masks(key_valid, q_slots, window, sliding_window=None):
    """Masks [B, 1, T, K] for queries at cache slots q_slots ([T], or [B, T] when rows differ):
    self (causal, own slot always allowed so padded rows stay finite; the last `sliding_window`
    slots only, if set), strictly causal cross (optionally windowed), and which queries have any
    memory at all ([B, 1, T, 1])."""
    k = torch.arange(key_valid.shape[1], device=key_valid.device)
    i = q_slots[..., None]                       # [T, 1] or [B, T, 1]
    valid = key_valid[:, None, :]                # [B, 1, K]
    self_keys = (k <= i) & valid
    if sliding_window:  # as transformers: key slot > query slot - sliding_window
        self_keys = self_keys & (k > i - sliding_window)
    self_mask = self_keys | (k == i)
    cross = (k < i) & valid
    if window:
        cross = cross & (k >= i - window)
    has_memory = cross.any(-1, keepdim=True)
    cross = cross | ~has_memory  # an empty row would give NaN; its output is zeroed instead
    return self_mask[:, None], cross[:, None], has_memory[:, None]


def exact_cache_mask(valid, sliding_window=None):
    """Self mask [B, 1, 2T, 2T] of an exact-cache section over [exact rows; draft rows] of T positions
    each: exact row i reads exact rows j <= i (the source's causal attention); draft row i reads exact
    rows j < i and itself, as its decode step does (the cache holds exact states before i)."""
    T = valid.shape[1]
    j = torch.arange(T, device=valid.device)
    before = j[None, :] < j[:, None]
    if sliding_window:
        before = before & (j[None, :] > j[:, None] - sliding_window)
    own = torch.eye(T, dtype=torch.bool, device=valid.device)
    mask = torch.cat([torch.cat([before | own, torch.zeros_like(own)], 1), torch.cat([before, own], 1)], 0)
    keys = torch.cat([valid, valid], 1)[:, None, :]  # [B, 1, 2T]
    return ((mask[None] & keys) | torch.eye(2 * T, dtype=torch.bool, device=valid.device))[:, None]
