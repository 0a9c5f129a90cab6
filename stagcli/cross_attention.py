"""How a section reads the section below: the cross-attention forms, one class each.

Section s > 0 attends, at every layer, to the section below's outputs at positions < i (its
"memory"). A form owns its weights, how they start from the source's self-attention, which of
its weights are "added" (for --train cross and --cross-lr-scale), the cache layout it decodes
with, and the attention part of a Block's forward. The memory's K/V projection (`kv`) is common
to all forms: while decoding, every depth's memory K/V come from one GEMM (model.write_memory).

A new form is a subclass plus one line in FORMS.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import StackedLinear, StackedNorm, apply_rope, attend, merge_heads, split_heads


class CrossAttention(nn.Module):
    """The memory side every form shares: K/V projection, optional per-head norms (Qwen3)."""

    widened = ()          # names of the Block's own weights this form widens (it lives inside them)
    joint_cache = False   # decode cache: self and memory K/V side by side on the head axis

    def __init__(self, cfg, sets: int):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.kv = StackedLinear(sets, d, 2 * self.kv_heads * hd, cfg.qkv_bias)
        head_norm = lambda: StackedNorm(sets, hd, cfg.norm, cfg.norm_eps) if cfg.qk_norm else None
        self.q_norm, self.k_norm = head_norm(), head_norm()

    # --- the memory ---------------------------------------------------------------------------------
    def memory_kv(self, memory, cross: slice, rope):
        k, v = self.kv(memory, cross).chunk(2, -1)
        k, v = split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k, cross)
        return (apply_rope(k, *rope) if rope else k), v

    def query_heads(self, q, run):
        q = split_heads(q, self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q, run.cross)
        return apply_rope(q, *run.rope) if run.rope else q

    def attend_memory(self, q, run, j: int):
        """Queries [S_c, B, T, H*hd] of the rows with cross-attention -> their merged outputs, zero
        where a query has no memory yet. Memory K/V: new ones from run.memory, older ones cached."""
        q = self.query_heads(q, run)
        k = v = None
        if run.memory is not None:
            k, v = self.memory_kv(run.memory, run.cross, run.rope)
        if run.cache is not None:
            k, v = run.cache.update_memory(j, run.cross_rows, run.slots, k, v)
        return merge_heads(attend(q, k, v, run.cross_mask) * run.has_memory)

    # --- conversion and training --------------------------------------------------------------------
    def init_from_source(self, block, owners: list[int]):
        """Cross set c starts as a copy of the self-attention of weight set owners[c] (key, value,
        head norms). Subclasses add their query and a zero output, so the model starts unchanged."""
        q_rows, kv_rows = self.heads * self.head_dim, 2 * self.kv_heads * self.head_dim
        for c, owner in enumerate(owners):
            for kind in ("weight", "bias"):
                source = getattr(block.qkv, kind)
                if source is not None:
                    getattr(self.kv, kind)[c].copy_(source[owner][q_rows:q_rows + kv_rows])
            for ours, theirs in ((self.q_norm, block.q_norm), (self.k_norm, block.k_norm)):
                if ours is not None:
                    ours.weight[c].copy_(theirs.weight[owner])

    def parts_in_block(self, block) -> list[tuple[str, tuple]]:
        """(name in the block, index) of the block's own weights that belong to this form."""
        return []

    def forward(self, block, x, run, j: int):
        """The attention part of `block` on x [S, B, T, d] (self-attention and the memory)."""
        raise NotImplementedError


class Sequential(CrossAttention):
    """The paper's form: an extra sublayer after self-attention, with its own norm, query and
    output projections (the output starts at zero)."""

    def __init__(self, cfg, sets: int):
        super().__init__(cfg, sets)
        d, width = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.norm = StackedNorm(sets, d, cfg.norm, cfg.norm_eps)
        self.q = StackedLinear(sets, d, width, cfg.qkv_bias)
        self.o = StackedLinear(sets, width, d, cfg.o_bias, zero_init=True)

    def init_from_source(self, block, owners):
        super().init_from_source(block, owners)
        q_rows = self.heads * self.head_dim
        for c, owner in enumerate(owners):
            for kind in ("weight", "bias"):
                if getattr(self.q, kind) is not None:
                    getattr(self.q, kind)[c].copy_(getattr(block.qkv, kind)[owner][:q_rows])
            self.norm.weight[c].copy_(block.attn_norm.weight[owner])
            if self.norm.bias is not None:
                self.norm.bias[c].copy_(block.attn_norm.bias[owner])
        for p in self.o.parameters():
            p.data.zero_()

    def forward(self, block, x, run, j):
        x = block.self_attention(x, run, j)
        c = run.first_cross
        if c is None:
            return x
        xc = x[c:]
        xc = xc + self.o(self.attend_memory(self.q(self.norm(xc, run.cross), run.cross), run, j), run.cross)
        return torch.cat([x[:c], xc]) if c else xc


class Parallel(CrossAttention):
    """[ours] Cross-attention reads the same norm(x) as self-attention: its query rows are part of
    the block's qkv GEMM and its output columns part of the o GEMM, so a decode step has no extra
    GEMM, norm or residual add per layer; while decoding, self and cross heads share ONE attention
    call over the joint cache."""

    widened = ("qkv.weight", "qkv.bias", "o.weight")
    joint_cache = True

    def extra_qkv_rows(self) -> int:
        return self.heads * self.head_dim

    def init_from_source(self, block, owners):
        super().init_from_source(block, owners)
        q_rows = self.heads * self.head_dim
        source_rows = sum(block.qkv_sizes[:3])
        for kind in ("weight", "bias"):
            qkv = getattr(block.qkv, kind)
            if qkv is None:
                continue
            qkv.data[:, source_rows:].zero_()  # rows of sets that own no cross set stay unused
            for owner in owners:
                qkv.data[owner, source_rows:].copy_(qkv.data[owner, :q_rows])
        block.o.weight.data[:, :, q_rows:].zero_()  # the cross heads' output columns

    def parts_in_block(self, block):
        rows, columns = sum(block.qkv_sizes[:3]), self.heads * self.head_dim
        parts = [("qkv.weight", (slice(None), slice(rows, None)))]
        if block.qkv.bias is not None:
            parts.append(("qkv.bias", (slice(None), slice(rows, None))))
        return parts + [("o.weight", (slice(None), slice(None), slice(columns, None)))]

    def forward(self, block, x, run, j):
        c = run.first_cross
        q, k, v, q_cross = block.attention_inputs(x, run, j)
        if c is None:  # no memory anywhere: only o's self-attention columns
            heads = merge_heads(attend(q, k, v, run.self_mask))
            return x + block.o(heads, run.weights, in_features=heads.shape[-1])
        if run.cache is not None and run.cache.joint_k is not None and q.shape[3] == 1:
            return x + block.o(merge_heads(self.joint_attend(q, q_cross, run, j)), run.weights)
        heads = merge_heads(attend(q, k, v, run.self_mask))
        cross = self.attend_memory(q_cross[c:], run, j)  # rows below c have no memory: zero heads
        heads = torch.cat([heads, torch.cat([cross.new_zeros(c, *cross.shape[1:]), cross]) if c else cross], -1)
        return x + block.o(heads, run.weights)

    def joint_attend(self, q, q_cross, run, j):
        """Decode step: the self heads (q, already in the cache's self half) and the cross heads
        (every row) in ONE attention call over cache.joint(); rows without memory get zero cross
        heads. Returns [S, B, 2H, 1, hd]."""
        c = run.first_cross
        q_cross = split_heads(q_cross, self.heads)
        if self.q_norm is not None:  # rows below c have no cross set: left as they are, zeroed below
            normed = self.q_norm(q_cross[c:], run.cross)
            q_cross = torch.cat([q_cross[:c], normed]) if c else normed
        q_cross = apply_rope(q_cross, *run.rope) if run.rope else q_cross
        if run.memory is not None:
            run.cache.update_memory(j, run.cross_rows, run.slots, *self.memory_kv(run.memory, run.cross, run.rope))
        k, v = run.cache.joint(j, run.rows)
        mask, scale = run.memo("joint", self.joint_masks)
        out = attend(torch.cat([q, q_cross], 2), k, v, mask)
        S, B, H2, T, hd = out.shape
        return (out.view(S, B, 2, H2 // 2, T, hd) * scale).view(S, B, H2, T, hd)

    @staticmethod
    def joint_masks(run):
        """Once per step, shared by every depth: the [B, 2, T, K] self|cross mask, and the
        [S, B, 2, 1, T, 1] head scale (1 for self heads; has-memory, 0 below first_cross, for cross)."""
        mask = torch.cat([run.self_mask, run.cross_mask], 1)
        has_memory = run.has_memory[:, 0, :, 0].to(run.dtype)  # [B, T]
        cross_scale = torch.stack([has_memory * (row >= run.first_cross) for row in range(run.count)])
        return mask, torch.stack([torch.ones_like(cross_scale), cross_scale], 2)[:, :, :, None, :, None]


FORMS = {"sequential": Sequential, "parallel": Parallel}
