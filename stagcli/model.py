"""The StagFormer causal LM: one readable model file.

A decoder's L layers are split into `sections` (separate weights) or run as `sections` passes
of the same L layers (shared weights). Section s>0 starts again from the token embedding and,
at every layer, cross-attends to section s-1's outputs at positions < i (strictly causal).

Storage: `blocks[j]` holds depth j of EVERY section, each weight stacked over sections as
[weight_sets, out, in]. Training runs section after section over the whole sequence
(`run_sections`); decoding runs all sections at once, one batched matmul per depth (`step`).
Both use the same Block code, so they give the same logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import StagCache


class StagConfig(PretrainedConfig):
    model_type = "stag"

    def __init__(self, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=None,
                 head_dim=None, intermediate_size=128, norm="rms", norm_eps=1e-6, positions="rope",
                 rope_theta=10000.0, rope_scaling_params=None, max_positions=512, mlp="gated", activation="silu",
                 qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None,
                 tie_embeddings=True,
                 sections=1, shared=False, window=None, lagged_input=False, cross_attn="sequential",
                 stag_recipe=None, **kwargs):
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.intermediate_size, self.norm, self.norm_eps = intermediate_size, norm, norm_eps
        self.positions, self.rope_theta, self.max_positions = positions, rope_theta, max_positions
        # None, or {"rope_type": "linear" | "llama3", ...} as in HF configs (not "rope_scaling": HF reserves it)
        self.rope_scaling_params = rope_scaling_params
        self.mlp, self.activation = mlp, activation
        self.qkv_bias, self.o_bias, self.mlp_bias = qkv_bias, o_bias, mlp_bias
        self.qk_norm = qk_norm  # per-head RMSNorm on queries and keys before RoPE (Qwen3)
        self.sliding_window = sliding_window  # the source's self-attention window (Mistral 7B v0.1)
        self.tie_embeddings = tie_embeddings
        self.sections, self.shared, self.window, self.lagged_input = sections, shared, window, lagged_input
        self.cross_attn = cross_attn  # "sequential" (the paper's sublayer) or "parallel" (see Block)
        self.stag_recipe = stag_recipe or {}  # how this model was made (convert/finetune), for humans
        kwargs.setdefault("tie_word_embeddings", False)  # we tie by reusing embed.weight, not HF's tying
        super().__init__(**kwargs)

    @property
    def depth(self) -> int:  # layers per section
        return self.num_layers if self.shared else self.num_layers // self.sections

    @property
    def weight_sets(self) -> int:
        return 1 if self.shared else self.sections

    @property
    def cross_sets(self) -> int:  # cross-attention weight sets (sections 2..p, or one shared set)
        return 0 if self.sections == 1 else (1 if self.shared else self.sections - 1)


class StackedLinear(nn.Module):
    """`sets` linear maps in one [sets, out, in] tensor, so several sections run as one bmm."""

    def __init__(self, sets, d_in, d_out, bias, zero_init=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(sets, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(sets, d_out)) if bias else None
        self.zero_init = zero_init  # cross-attention output starts at zero (the model is unchanged)

    def forward(self, x, sets: slice, in_features: int | None = None):  # x [S, ..., d_in]
        w = self.weight[sets]
        if in_features is not None and in_features < w.shape[-1]:  # only the leading input columns
            w = w[..., :in_features]
        b = None if self.bias is None else self.bias[sets]
        if w.shape[0] == 1:  # a single section, or shared weights: one plain GEMM for all rows
            return F.linear(x, w[0], None if b is None else b[0])
        y = torch.matmul(x.flatten(1, -2), w.transpose(1, 2)).view(*x.shape[:-1], w.shape[1])
        return y if b is None else y + b.view(b.shape[0], *([1] * (x.dim() - 2)), -1)


class StackedNorm(nn.Module):
    """RMSNorm (Llama family) or LayerNorm (GPT-2), one weight row per set."""

    def __init__(self, sets, dim, kind, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(sets, dim))
        self.bias = nn.Parameter(torch.zeros(sets, dim)) if kind == "layer" else None

    def forward(self, x, sets: slice):
        shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if self.kind == "rms":  # computed in fp32 like transformers' LlamaRMSNorm
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
            return self.weight[sets].view(shape) * y
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight[sets].view(shape) + self.bias[sets].view(shape)


ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_inv_freq(cfg: StagConfig, device):
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


def rope_tables(positions, inv_freq, dtype):
    """cos/sin [B, T, head_dim] for integer positions [B, T] (Llama's rotate-half convention)."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [S, B, H, T, hd]
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


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
    return F.scaled_dot_product_attention(q, flat(k), flat(v), attn_mask=mask).view(S, B, H, T, hd)


def attention_masks(key_valid, q_slots, window, sliding_window=None):
    """Self mask (causal, own slot always allowed so padded rows stay finite; the last
    `sliding_window` slots only, if set), strictly causal cross mask (optionally windowed), and
    which queries have any memory at all."""
    k = torch.arange(key_valid.shape[1], device=key_valid.device)[None, :]
    i = q_slots[:, None]
    self_keys = (k <= i) & key_valid[:, None, :]
    if sliding_window:  # as transformers: key slot > query slot - sliding_window
        self_keys = self_keys & (k > i - sliding_window)
    self_mask = self_keys | (k == i)
    cross = (k < i) & key_valid[:, None, :]
    if window:
        cross = cross & (k >= i - window)
    has_memory = cross.any(-1, keepdim=True)
    cross = cross | ~has_memory  # an empty row would give NaN; its output is zeroed instead
    return self_mask[:, None], cross[:, None], has_memory[:, None]


@dataclass
class Run:
    """Which sections one call runs, and everything its blocks share."""
    weights: slice          # weight sets of the rows
    cross: slice            # cross-attention weight sets of the rows that have cross-attention
    cross_rows: slice       # those rows' cross-memory slots in the cache
    first_cross: int | None  # local row where cross-attention starts (None: no row has it)
    sections: slice
    rope: tuple | None
    self_mask: torch.Tensor
    cross_mask: torch.Tensor
    has_memory: torch.Tensor
    cache: "StagCache | None" = None
    slots: torch.Tensor | None = None
    memory: torch.Tensor | None = None  # normalised memory states for the new slots [C, B, T, d]
    # parallel form, decode: self + cross heads in one attention call over cache.joint()
    joint_mask: torch.Tensor | None = None  # [B, 2, T, K]: self mask, cross mask
    head_scale: torch.Tensor | None = None  # [S, B, 2, 1, T, 1]: 1 for self heads; has_memory (0 below first_cross) for cross


class Block(nn.Module):
    """Depth j of every section: self-attention, cross-attention (sections > 1), MLP.

    Cross-attention forms (`cross_attn`): "sequential" is the paper's extra sublayer after
    self-attention, with its own norm, query and output projections. "parallel" [ours] reads the same
    norm(x) as self-attention: its query rows are part of the qkv GEMM and its output columns part
    of the o GEMM, so a decode step has no extra GEMM, norm or residual add per layer (the memory K/V
    of all depths still come from one GEMM per step)."""

    def __init__(self, cfg: StagConfig):
        super().__init__()
        d, hd, W, C = cfg.hidden_size, cfg.head_dim, cfg.weight_sets, cfg.cross_sets
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.parallel = bool(C) and cfg.cross_attn == "parallel"
        norm = lambda sets, dim=d: StackedNorm(sets, dim, cfg.norm, cfg.norm_eps)
        head_norm = lambda sets: norm(sets, hd) if cfg.qk_norm else None
        self.attn_norm, self.mlp_norm = norm(W), norm(W)
        self.q_norm, self.k_norm = head_norm(W), head_norm(W)
        self.qkv_sizes = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd]
        if self.parallel:  # + the cross-attention's query rows (every weight set, so one bmm serves all)
            self.qkv_sizes.append(self.heads * hd)
        self.qkv = StackedLinear(W, d, sum(self.qkv_sizes), cfg.qkv_bias)
        self.o = StackedLinear(W, self.heads * hd * (2 if self.parallel else 1), d, cfg.o_bias)
        gated = cfg.mlp == "gated"
        self.up = StackedLinear(W, d, cfg.intermediate_size * (2 if gated else 1), cfg.mlp_bias)
        self.down = StackedLinear(W, cfg.intermediate_size, d, cfg.mlp_bias)
        self.act, self.gated = ACT2FN[cfg.activation], gated
        if C:
            if not self.parallel:
                self.cross_norm = norm(C)
                self.cross_q = StackedLinear(C, d, self.heads * hd, cfg.qkv_bias)
                self.cross_o = StackedLinear(C, self.heads * hd, d, cfg.o_bias, zero_init=True)
            self.cross_kv = StackedLinear(C, d, 2 * self.kv_heads * hd, cfg.qkv_bias)
            self.cross_q_norm, self.cross_k_norm = head_norm(C), head_norm(C)

    def split_heads(self, x, n, norm=None, sets=None):  # [S,B,T,n*hd] -> [S,B,n,T,hd]
        x = x.view(*x.shape[:3], n, -1).transpose(2, 3)
        return x if norm is None else norm(x, sets)

    def memory_kv(self, memory, cross: slice, rope):
        k, v = self.cross_kv(memory, cross).chunk(2, -1)
        k, v = self.split_heads(k, self.kv_heads, self.cross_k_norm, cross), self.split_heads(v, self.kv_heads)
        return (apply_rope(k, *rope) if rope else k), v

    def cross_attend(self, q, run: Run, j: int):
        """Queries [S_c, B, T, H*hd] of the rows with cross-attention -> their merged outputs, zero
        where a query has no memory yet. Memory K/V: new ones from run.memory, older ones cached."""
        q = self.split_heads(q, self.heads, self.cross_q_norm, run.cross)
        q = apply_rope(q, *run.rope) if run.rope else q
        k = v = None
        if run.memory is not None:
            k, v = self.memory_kv(run.memory, run.cross, run.rope)
        if run.cache is not None:
            k, v = run.cache.update_memory(j, run.cross_rows, run.slots, k, v)
        return merge_heads(attend(q, k, v, run.cross_mask) * run.has_memory)

    def joint_attend(self, q, q_cross, run: Run, j: int):
        """Decode step of the parallel form: the self heads (q, already in the cache's self half) and
        the cross heads (q_cross, every row) in ONE attention call over cache.joint(); rows without
        memory get zero cross heads (run.head_scale). Returns [S, B, 2H, 1, hd]."""
        c = run.first_cross
        q_cross = self.split_heads(q_cross, self.heads)
        if self.cross_q_norm is not None:  # rows below c have no cross set: left as they are, zeroed below
            normed = self.cross_q_norm(q_cross[c:], run.cross)
            q_cross = torch.cat([q_cross[:c], normed]) if c else normed
        q_cross = apply_rope(q_cross, *run.rope) if run.rope else q_cross
        if run.memory is not None:
            run.cache.update_memory(j, run.cross_rows, run.slots, *self.memory_kv(run.memory, run.cross, run.rope))
        k, v = run.cache.joint(j, run.sections)
        out = attend(torch.cat([q, q_cross], 2), k, v, run.joint_mask)
        S, B, H2, T, hd = out.shape
        return (out.view(S, B, 2, H2 // 2, T, hd) * run.head_scale).view(S, B, H2, T, hd)

    def forward(self, x, run: Run, j: int):  # x [S, B, T, d]
        c = run.first_cross
        q, k, v, *q_cross = self.qkv(self.attn_norm(x, run.weights), run.weights).split(self.qkv_sizes, -1)
        q = self.split_heads(q, self.heads, self.q_norm, run.weights)
        k = self.split_heads(k, self.kv_heads, self.k_norm, run.weights)
        v = self.split_heads(v, self.kv_heads)
        if run.rope:
            q, k = apply_rope(q, *run.rope), apply_rope(k, *run.rope)
        if run.cache is not None:
            k, v = run.cache.update_self(j, run.sections, run.slots, k, v)
        if run.joint_mask is not None:  # parallel form, decode: self and cross heads in one call
            x = x + self.o(merge_heads(self.joint_attend(q, q_cross[0], run, j)), run.weights)
        elif self.parallel and c is not None:  # rows below c have no memory: zero cross-attention heads
            heads = merge_heads(attend(q, k, v, run.self_mask))
            cross = self.cross_attend(q_cross[0][c:], run, j)
            heads = torch.cat([heads, torch.cat([cross.new_zeros(c, *cross.shape[1:]), cross]) if c else cross], -1)
            x = x + self.o(heads, run.weights)
        else:  # no cross heads here (sequential form, or no memory anywhere): o's self-attention columns
            heads = merge_heads(attend(q, k, v, run.self_mask))
            x = x + self.o(heads, run.weights, in_features=heads.shape[-1])
        if not self.parallel and c is not None:
            xc = x[c:]
            xc = xc + self.cross_o(self.cross_attend(self.cross_q(self.cross_norm(xc, run.cross), run.cross), run, j),
                                   run.cross)
            x = torch.cat([x[:c], xc]) if c else xc
        h = self.up(self.mlp_norm(x, run.weights), run.weights)
        if self.gated:
            gate, up = h.chunk(2, -1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return x + self.down(h, run.weights)


class StagForCausalLM(PreTrainedModel):
    config_class = StagConfig
    base_model_prefix = "stag"
    supports_gradient_checkpointing = True

    def __init__(self, config: StagConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos_embed = nn.Embedding(config.max_positions, d) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.mem_norm = StackedNorm(config.cross_sets, d, config.norm, config.norm_eps) if config.cross_sets else None
        self.final_norm = StackedNorm(1, d, config.norm, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, StackedLinear):
            nn.init.zeros_(module.weight) if module.zero_init else nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, StackedNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, std=0.02)

    def added_weights(self) -> list[tuple[str, nn.Parameter, tuple | None]]:
        """What staggering adds to the source decoder (cross-attention, memory norm), as (name,
        parameter, index): index None for a whole parameter, else the part of a parameter the
        parallel form shares with the source's weights (cross-query rows of qkv, cross-head columns
        of o). Fine-tuning uses it for --train cross and --cross-lr-scale."""
        added = [(n, p, None) for n, p in self.named_parameters() if n.startswith("mem_norm.") or ".cross_" in n]
        if self.config.cross_sets and self.config.cross_attn == "parallel":
            for j, block in enumerate(self.blocks):
                rows, columns = sum(block.qkv_sizes[:3]), block.heads * self.config.head_dim
                added.append((f"blocks.{j}.qkv.weight", block.qkv.weight, (slice(None), slice(rows, None))))
                if block.qkv.bias is not None:
                    added.append((f"blocks.{j}.qkv.bias", block.qkv.bias, (slice(None), slice(rows, None))))
                added.append((f"blocks.{j}.o.weight", block.o.weight, (slice(None), slice(None), slice(columns, None))))
        return added

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    # --- pieces shared by training and decoding -------------------------------------------------
    def _run(self, sections: slice, positions, key_valid, q_slots, cache=None, memory=None) -> Run:
        cfg = self.config
        s0, s1 = sections.start, sections.stop
        c0 = max(s0, 1)
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(positions, rope_inv_freq(cfg, positions.device), self.embed.weight.dtype)
        masks = attention_masks(key_valid, q_slots, cfg.window, cfg.sliding_window)
        first_cross = c0 - s0 if s1 > c0 else None
        joint_mask = head_scale = None
        if cache is not None and cache.joint_k is not None and first_cross is not None and q_slots.numel() == 1:
            joint_mask = torch.cat([masks[0], masks[1]], 1)
            has_memory = masks[2][:, 0, :, 0].to(self.embed.weight.dtype)  # [B, T]
            cross_scale = torch.stack([has_memory * (row >= first_cross) for row in range(s1 - s0)])
            head_scale = torch.stack([torch.ones_like(cross_scale), cross_scale], 2)[:, :, :, None, :, None]
        return Run(weights=slice(0, 1) if cfg.shared else sections,
                   cross=slice(0, 1) if cfg.shared else slice(c0 - 1, s1 - 1),
                   cross_rows=slice(c0 - 1, s1 - 1), first_cross=first_cross,
                   sections=sections, rope=rope, self_mask=masks[0], cross_mask=masks[1],
                   has_memory=masks[2], cache=cache, slots=q_slots, memory=memory,
                   joint_mask=joint_mask, head_scale=head_scale)

    def _cross_set(self, section: int) -> slice:
        return slice(0, 1) if self.config.shared else slice(section - 1, section)

    def embed_tokens(self, input_ids, positions):
        x = self.embed(input_ids)
        return x + self.pos_embed(positions) if self.pos_embed is not None else x

    def logits(self, hidden):
        h = self.final_norm(hidden[None], slice(0, 1))[0]
        return F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def _blocks(self, x, run):
        for j, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, run, j, use_reentrant=False)
            else:
                x = block(x, run, j)
        return x

    # --- training / prefill: section after section over the whole sequence ----------------------
    def run_sections(self, input_ids, attention_mask=None, cache: StagCache | None = None,
                     memory_override=None):
        """Returns the last section's output [B, T, d]. With a cache, fills it (prefill).
        `memory_override` replaces the last section's memory source (recurrent reference)."""
        cfg = self.config
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if cache is None:
            key_valid, slots = valid, torch.arange(input_ids.shape[1], device=input_ids.device)
            positions, prev_valid = (valid.long().cumsum(1) - 1).clamp(min=0), torch.zeros_like(valid[:, 0])
        else:
            slots, positions, key_valid, prev_valid = cache.reserve(valid)
        emb = self.embed_tokens(input_ids, positions)
        prev_out = None
        for s in range(cfg.sections):
            x, memory = emb, None
            if s > 0:
                source = memory_override if (memory_override is not None and s == cfg.sections - 1) else prev_out
                if cfg.lagged_input:
                    x = emb + self._lag(emb, source, valid, prev_valid, cache, s)
                memory = self.mem_norm(source[None], self._cross_set(s))
            run = self._run(slice(s, s + 1), positions, key_valid, slots, cache, memory)
            prev_out = self._blocks(x[None], run)[0]
            if cache is not None:
                cache.last_out[s] = prev_out[:, -1]
        if cache is not None:
            cache.last_emb.copy_(emb[:, -1])  # in place: a captured decode step reads this address
        return prev_out

    def _lag(self, emb, source, valid, prev_valid, cache, s):
        """Lagged-residual input [ours]: u_{i-1} - E[x_{i-1}] from the section below, zero where
        position i-1 does not exist. Approximates what layers below would have added."""
        first_src = cache.last_out[s - 1] if cache is not None else torch.zeros_like(source[:, 0])
        first_emb = cache.last_emb if cache is not None else torch.zeros_like(emb[:, 0])
        prev_src = torch.cat([first_src[:, None], source[:, :-1]], 1)
        prev_emb = torch.cat([first_emb[:, None], emb[:, :-1]], 1)
        prev_ok = torch.cat([prev_valid[:, None], valid[:, :-1]], 1)
        return (prev_src - prev_emb) * prev_ok[..., None].to(emb.dtype)

    def forward(self, input_ids, attention_mask=None, labels=None, **unused):
        logits = self.logits(self.run_sections(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # --- decoding: every section on the same token at once ---------------------------------------
    def new_cache(self, batch, max_len, dtype=None) -> StagCache:
        return StagCache(self.config, batch, max_len, self.embed.weight.device, dtype or self.embed.weight.dtype)

    @torch.no_grad()
    def prefill(self, input_ids, cache: StagCache, attention_mask=None):
        """Prompt in one pass per section; returns the last position's logits [B, V]."""
        return self.logits(self.run_sections(input_ids, attention_mask, cache)[:, -1])

    @torch.no_grad()
    def step(self, token, cache: StagCache, recurrent: bool = False, memory_kv=None):
        """One decode step for tokens [B]: all sections advance together (one batched op per depth).
        recurrent: shared weights only; skip pass 1 and feed the last pass its own earlier outputs.
        memory_kv: optional fused memory K/V weights from memory_kv_weights()."""
        cache.claim(1)
        return self.decode_step(token, cache, recurrent, memory_kv)

    def decode_step(self, token, cache: StagCache, recurrent: bool = False, memory_kv=None):
        """step() without the host-side bounds check: tensor work only, no host syncs and no
        python state that changes between steps, so it can be captured in a CUDA graph."""
        cfg = self.config
        if recurrent and not (cfg.shared and cfg.sections > 1):
            raise ValueError("recurrent decoding needs a shared-weights model with >= 2 sections")
        slots, positions, key_valid, prev_valid = cache.reserve_one()
        emb = self.embed_tokens(token[:, None], positions)  # [B, 1, d]
        first = cfg.sections - 1 if recurrent else 0
        x = emb[None].expand(cfg.sections - first, -1, -1, -1)
        if cfg.lagged_input and cfg.sections > 1:
            lag = (cache.last_out[:-1] - cache.last_emb) * prev_valid[None, :, None].to(emb.dtype)
            x = x + torch.cat([torch.zeros_like(lag[:1]), lag])[:, :, None]
        out = self._blocks(x, self._run(slice(first, cfg.sections), positions, key_valid, slots, cache))[:, :, -1]
        if cfg.sections > 1:  # section s's output becomes section s+1's memory at this slot
            source = out[-1:] if recurrent else out[:-1]
            self.write_memory(source, cache, slots, positions, memory_kv)
        cache.last_out[first:] = out
        cache.last_emb.copy_(emb[:, -1])
        return self.logits(out[-1])

    def memory_kv_weights(self):
        """Every depth's cross-attention K/V projection stacked into one weight [C, depth*2*kv, d]
        (and bias), so write_memory makes all depths' memory K/V in ONE GEMM per step. A snapshot:
        rebuild it after the weights change."""
        if not self.config.cross_sets:
            return None
        weight = torch.cat([b.cross_kv.weight for b in self.blocks], 1).detach()
        biases = [b.cross_kv.bias for b in self.blocks]
        bias = None if biases[0] is None else torch.cat(biases, 1).detach()
        k_norm = None  # [C, depth, hd]
        if self.config.qk_norm:
            k_norm = torch.stack([b.cross_k_norm.weight for b in self.blocks], 1).detach()
        return weight, bias, k_norm

    def write_memory(self, source, cache, slots, positions, memory_kv=None, rows: slice | None = None):
        """K/V of every depth's cross-attention for outputs `source` [C, B, d] at `slots`.
        With memory_kv (see memory_kv_weights) all depths come from one GEMM and two copies.
        `rows`: the cache's memory rows to write (default: the last C)."""
        cfg = self.config
        cross = slice(0, 1) if cfg.shared else slice(cfg.sections - 1 - source.shape[0], cfg.sections - 1)
        if memory_kv is not None and memory_kv[0].shape[0] == 1:
            cross = slice(0, 1)  # weights already narrowed to one set (shared, or one rank's section)
        memory = self.mem_norm(source[:, :, None], cross)
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(positions, rope_inv_freq(cfg, positions.device), memory.dtype)
        n = cache.mem_k.shape[1]
        rows = rows or slice(n - memory.shape[0], n)
        if memory_kv is None:
            for j, block in enumerate(self.blocks):
                cache.update_memory(j, rows, slots, *block.memory_kv(memory, cross, rope))
            return
        weight, bias, k_norm = memory_kv
        weight, bias = weight[cross], None if bias is None else bias[cross]
        C, B = memory.shape[:2]
        kvh, hd, D = cfg.num_kv_heads, cfg.head_dim, cfg.depth
        if weight.shape[0] == 1:
            kv = F.linear(memory[:, :, 0], weight[0], None if bias is None else bias[0])
        else:
            kv = torch.baddbmm(bias[:, None], memory[:, :, 0], weight.transpose(1, 2)) if bias is not None \
                else torch.bmm(memory[:, :, 0], weight.transpose(1, 2))
        kv = kv.view(C, B, D, 2, kvh, 1, hd).permute(3, 2, 0, 1, 4, 5, 6)  # [2, D, C, B, kvh, 1, hd]
        k, v = kv[0], kv[1]
        if k_norm is not None:  # each depth's and set's head norm, like StackedNorm's RMS
            kf = k.float()
            k = (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).to(k.dtype)
            k = k_norm[cross].transpose(0, 1)[:, :, None, None, None] * k
        if rope:
            cos, sin = rope  # [B, 1, hd] -> broadcast over [D, C, B, kvh, 1, hd]
            k = apply_rope(k.flatten(0, 1), cos, sin).view(k.shape)
        cache.mem_k[:, rows].index_copy_(4, slots, k.to(cache.mem_k.dtype))
        cache.mem_v[:, rows].index_copy_(4, slots, v.to(cache.mem_v.dtype))


# `AutoModelForCausalLM.from_pretrained(dir)` works on stag output once this module is imported.
AutoConfig.register("stag", StagConfig, exist_ok=True)
AutoModelForCausalLM.register(StagConfig, StagForCausalLM, exist_ok=True)
