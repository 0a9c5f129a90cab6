"""Static caches for decoding (gpt-fast style: allocated once, updated in place).

Self-attention K/V per (depth, section held), cross-attention memory K/V per (depth, section held
that has a section below), the K/V of a section input that attends over its own earlier rows (the
attention bridge, one layer per boundary), and the per-row bookkeeping for left padding and
section inputs.
A decode step reads its slot from a device tensor, so it can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Place:
    """Where new tokens go: cache slots ([T], the same for every row), positions [B, T], which key
    slots are valid [B, K], whether the position before the first new one exists [B], and RoPE."""
    slots: torch.Tensor
    positions: torch.Tensor
    key_valid: torch.Tensor
    prev_valid: torch.Tensor
    length: int              # positions are < length (sizes the RoPE table)
    valid: torch.Tensor | None = None  # [B, T] real (not padding) tokens, prefill only
    rope: tuple | None = None          # (cos, sin) once computed for these positions
    self_mask: torch.Tensor | None = None  # [B, 1, T, K]: replaces the causal self mask (exact-cache rows)


class StagCache:
    """Every tensor is allocated once and only ever updated in place, and a decode step reads its
    slot from the device tensor `slot`, so a step can be captured in a CUDA graph and replayed.
    The python int `length` mirrors `slot` for host-side bounds checks (outside the step).
    `sections`: how many sections' self K/V are held; `memories`: how many of those have memory
    (one rank of a multi-process decode holds only its own section's). `joint`: the parallel
    form's layout (see cross_attention.Parallel)."""

    def __init__(self, cfg, batch: int, max_len: int, device=None, dtype=torch.float32,
                 sections: int | None = None, memories: int | None = None, joint: bool = False,
                 bridge_kv_heads: int = 0):
        kv = lambda n, heads=cfg.num_kv_heads: torch.zeros(cfg.depth, n, batch, heads, max_len, cfg.head_dim,
                                                           device=device, dtype=dtype)
        sections = cfg.sections if sections is None else sections
        memories = cfg.sections - 1 if memories is None else memories
        self.joint_k = self.joint_v = None
        if joint and memories:
            # Each section row's self K/V and its memory K/V side by side on the head axis of one
            # tensor, so a decode step attends over both in ONE call without a copy. The first
            # `sections - memories` rows have no memory; their memory half stays unused.
            h = cfg.num_kv_heads
            self.joint_k, self.joint_v = kv(sections, 2 * h), kv(sections, 2 * h)
            first = sections - memories
            self.self_k, self.self_v = self.joint_k[:, :, :, :h], self.joint_v[:, :, :, :h]
            self.mem_k, self.mem_v = self.joint_k[:, first:, :, h:], self.joint_v[:, first:, :, h:]
        else:
            self.self_k, self.self_v = kv(sections), kv(sections)
            self.mem_k, self.mem_v = kv(memories), kv(memories)
        # the attention bridge's K/V per boundary held: [boundaries, B, heads, max_len, hd]
        self.bridge_k = self.bridge_v = None
        if bridge_kv_heads and memories:
            self.bridge_k, self.bridge_v = (torch.zeros(memories, batch, bridge_kv_heads, max_len, cfg.head_dim,
                                                        device=device, dtype=dtype) for _ in range(2))
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens seen per row
        self.slot = torch.zeros(1, dtype=torch.long, device=device)       # next free slot (device copy)
        self.last_out = torch.zeros(cfg.sections, batch, cfg.hidden_size, device=device, dtype=dtype)
        self.last_emb = torch.zeros(batch, cfg.hidden_size, device=device, dtype=dtype)
        self.length, self.max_len, self.batch = 0, max_len, batch

    def reset(self):
        """Empty the cache in place (tensor addresses stay valid for a captured CUDA graph).
        Stale K/V need no clearing: key_valid masks them."""
        for t in self.mutable():
            t.zero_()
        self.length = 0

    def mutable(self):
        """What a step writes besides K/V slots beyond the current length (which stay masked)."""
        return [self.key_valid, self.count, self.slot, self.last_out, self.last_emb]

    def update_self(self, j, rows: slice, slots, k, v):
        """Write K/V [S, B, H, T, hd] at `slots`: [T] (every row the same) or [B, T] (each row its own,
        as verified decoding needs: rows accept drafts independently)."""
        return _write(self.self_k[j, rows], self.self_v[j, rows], slots, k, v)

    def update_bridge(self, rows: slice, slots, k, v):
        """The attention bridge's K/V [C, B, H, T, hd] at `slots` ([T] or [B, T], as update_self)."""
        return _write(self.bridge_k[rows], self.bridge_v[rows], slots, k, v)

    def joint(self, j, rows: slice):
        """Self K/V then memory K/V on the head axis, for section rows `rows` (joint layout only)."""
        return self.joint_k[j, rows], self.joint_v[j, rows]

    def update_memory(self, j, rows: slice, slots, k, v):
        if k is not None:
            self.mem_k[j, rows].index_copy_(3, slots, k)
            self.mem_v[j, rows].index_copy_(3, slots, v)
        return self.mem_k[j, rows], self.mem_v[j, rows]

    def claim(self, tokens: int):
        """Host side: check there is room for `tokens` more slots and count them."""
        if self.length + tokens > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; {self.length + tokens} requested")
        self.length += tokens

    def reserve(self, valid) -> Place:
        """Claim slots for new tokens [B, T] (left padded: False = padding)."""
        T = valid.shape[1]
        start = self.length
        self.claim(T)
        slots = torch.arange(start, start + T, device=valid.device)
        prev_valid = self.key_valid[:, start - 1] if start else torch.zeros_like(valid[:, 0])
        self.key_valid[:, slots] = valid
        positions = self.count[:, None] + valid.long().cumsum(1) - 1
        self.count += valid.sum(1)
        self.slot += T
        return Place(slots, positions.clamp(min=0), self.key_valid, prev_valid, self.max_len, valid)

    def reserve_one(self) -> Place:
        """Device-only twin of reserve() for one real token per row (a decode step): reads no
        python state, so it can run inside a CUDA graph. The caller does claim(1) on the host."""
        slot = self.slot.clone()
        prev = self.key_valid.gather(1, (slot - 1).clamp(min=0).expand(self.batch, 1))[:, 0]
        prev_valid = prev & (slot > 0)
        self.key_valid.index_fill_(1, slot, True)
        positions = self.count[:, None].clone()
        self.count += 1
        self.slot += 1
        return Place(slot, positions, self.key_valid, prev_valid, self.max_len)


def _write(k_cache, v_cache, slots, k, v):
    """k, v [S, B, H, T, hd] into caches [S, B, H, K, hd] at slots [T] (every row the same) or [B, T]."""
    if slots.dim() == 1:
        k_cache.index_copy_(3, slots, k)
        v_cache.index_copy_(3, slots, v)
    else:
        index = slots[None, :, None, :, None].expand(k.shape)
        k_cache.scatter_(3, index, k)
        v_cache.scatter_(3, index, v)
    return k_cache, v_cache
