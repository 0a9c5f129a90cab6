"""The StagFormer causal LM.

A decoder's L layers are split into `sections` (separate weights) or run as `sections` passes of
the same L layers (shared weights). Section s > 0 reads an input built from what it may see (see
section_input.py) and, at every layer, cross-attends to section s-1's outputs at positions < i
(strictly causal; the form is a class chosen by config.cross_attn, see cross_attention.py).

Storage: `blocks[j]` holds depth j of EVERY section, each weight stacked over sections as
[weight_sets, out, in]. Training runs section after section over the whole sequence
(`run_sections`); decoding runs all sections at once, one batched matmul per depth (`step`).
Both go through `run_blocks`, so they give the same logits. (Verify layouts with bridge_depth > 0
run section 1's first layers first, then the rest of both sections side by side: verify_step.)
A model may hold only some sections (`held`, one rank of a multi-process decode: see
decode_ranks.narrow_to_section); the same methods then run those.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import Place, StagCache
from .devices import run_concurrently
from .cross_attention import FORMS
from .layers import (ROPE_SCALINGS, RopeTable, StackedLinear, StackedNorm, apply_rope, attend, few_row_logits,  # noqa: F401
                     attention_masks, exact_cache_mask, merge_heads, split_heads)
from .section_input import INPUTS, Rows


class StagConfig(PretrainedConfig):
    model_type = "stag"

    def __init__(self, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=None,
                 head_dim=None, intermediate_size=128, norm="rms", norm_eps=1e-6, positions="rope",
                 rope_theta=10000.0, rope_scaling_params=None, max_positions=512, mlp="gated", activation="silu",
                 qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None,
                 tie_embeddings=True,
                 sections=1, shared=False, window=None, section_input="zero", cross_attn="sequential",
                 exact_first=False, bridge_hidden=2048, verified=False, exact_cache=False, bridge_depth=0,
                 stag_recipe=None,
                 **kwargs):
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
        if kwargs.pop("lagged_input", False):  # configs written before section_input existed
            section_input = "lagged"
        self.sections, self.shared, self.window = sections, shared, window
        self.section_input = section_input  # see section_input.INPUTS
        self.cross_attn = cross_attn        # see cross_attention.FORMS
        # position 0 of section s reads section s-1's output there (never a decode step: exact, free)
        self.exact_first = exact_first
        self.bridge_hidden = bridge_hidden  # width of the mlp bridge (section_input="mlp")
        # verified staggering (stagcli/verify.py): the source split in two; the full forward is the
        # source itself (section 2 reads section 1's output at the same position), the bridge drafts
        self.verified = verified
        # exact-cache staggering: the verify layout, the bridge's drafts emitted unverified; section 2
        # still rewrites each position with its exact input one step later, so its cache holds the
        # source's states before i and only row i itself is a draft (the forward scores those rows)
        self.exact_cache = exact_cache
        # verify layouts: the bridge reads section 1's state after this many layers (its "view" of the
        # current token, h^k; 0: the embedding), so section 2 starts k layers after section 1
        self.bridge_depth = bridge_depth
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
        if self.sections == 1 or self.cross_attn == "none":
            return 0
        return 1 if self.shared else self.sections - 1


class Run:
    """One call of run_blocks: which sections run (global indices), where their weights and cache
    rows are in this model (local indices), and what every depth shares (masks, RoPE)."""

    def __init__(self, model, sections: slice, place: Place, cache, memory, rope):
        cfg, held = model.config, model.held
        s0, s1 = sections.start, sections.stop
        c0, h_mem = max(s0, 1), max(held.start, 1)
        self.sections, self.count = sections, s1 - s0
        self.rows = slice(s0 - held.start, s1 - held.start)       # self K/V rows, weight sets
        self.cross_rows = slice(c0 - h_mem, s1 - h_mem)           # memory rows, cross weight sets
        self.weights = slice(0, 1) if cfg.shared else self.rows
        self.cross = slice(0, 1) if cfg.shared else self.cross_rows
        self.first_cross = c0 - s0 if s1 > c0 and cfg.cross_sets else None  # first row with memory
        if place.self_mask is None:
            self.self_mask, self.cross_mask, self.has_memory = attention_masks(
                place.key_valid, place.slots, cfg.window, cfg.sliding_window)
        else:  # exact-cache rows (verify layouts: no cross-attention)
            self.self_mask, self.cross_mask, self.has_memory = place.self_mask, None, None
        self.cache, self.slots, self.memory, self.rope = cache, place.slots, memory, rope
        self.dtype = model.embed.weight.dtype
        self._memo = {}

    def memo(self, key, make):
        """A value computed once per call and shared by every depth (make(run))."""
        if key not in self._memo:
            self._memo[key] = make(self)
        return self._memo[key]


class Block(nn.Module):
    """Depth j of every section: self-attention, cross-attention (sections > 1), MLP."""

    def __init__(self, cfg: StagConfig):
        super().__init__()
        d, hd, W = cfg.hidden_size, cfg.head_dim, cfg.weight_sets
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        norm = lambda sets, dim=d: StackedNorm(sets, dim, cfg.norm, cfg.norm_eps)
        self.attn_norm, self.mlp_norm = norm(W), norm(W)
        self.q_norm, self.k_norm = (norm(W, hd), norm(W, hd)) if cfg.qk_norm else (None, None)
        self.cross = FORMS[cfg.cross_attn](cfg, cfg.cross_sets) if cfg.cross_sets else None
        widened = self.cross is not None and bool(self.cross.widened)  # the form lives inside qkv and o
        self.qkv_sizes = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd] + ([self.heads * hd] if widened else [])
        self.qkv = StackedLinear(W, d, sum(self.qkv_sizes), cfg.qkv_bias)
        self.o = StackedLinear(W, self.heads * hd * (2 if widened else 1), d, cfg.o_bias)
        gated = cfg.mlp == "gated"
        self.up = StackedLinear(W, d, cfg.intermediate_size * (2 if gated else 1), cfg.mlp_bias)
        self.down = StackedLinear(W, cfg.intermediate_size, d, cfg.mlp_bias)
        self.act, self.gated = ACT2FN[cfg.activation], gated

    def attention_inputs(self, x, run: Run, j: int):
        """q [S,B,H,T,hd]; k, v over every cached slot (this call's written first); and the extra
        query rows of a form that lives inside qkv (else None)."""
        q, k, v, *extra = self.qkv(self.attn_norm(x, run.weights), run.weights).split(self.qkv_sizes, -1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.kv_heads), split_heads(v, self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q, run.weights), self.k_norm(k, run.weights)
        if run.rope:
            q, k = apply_rope(q, *run.rope), apply_rope(k, *run.rope)
        if run.cache is not None:
            k, v = run.cache.update_self(j, run.rows, run.slots, k, v)
        return q, k, v, (extra[0] if extra else None)

    def self_attention(self, x, run: Run, j: int):
        q, k, v, _ = self.attention_inputs(x, run, j)
        heads = merge_heads(attend(q, k, v, run.self_mask))
        return x + self.o(heads, run.weights, in_features=heads.shape[-1])

    def forward(self, x, run: Run, j: int):  # x [S, B, T, d]
        x = self.self_attention(x, run, j) if self.cross is None else self.cross(self, x, run, j)
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
        self.section_input = INPUTS[config.section_input](config, config.sections - 1) if config.sections > 1 else None
        self.mem_norm = StackedNorm(config.cross_sets, d, config.norm, config.norm_eps) if config.cross_sets else None
        self.final_norm = StackedNorm(1, d, config.norm, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.rope = RopeTable(config) if config.positions == "rope" else None
        self.held = slice(0, config.sections)  # the sections whose weights this instance holds
        # verify layouts: the forward scores the drafts (exact_cache_hidden) instead of the exact
        # computation, which no bridge enters (set while fine-tuning a verify model's bridge)
        self.score_drafts = False
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
        """What staggering adds to the source decoder, as (name, parameter, index): index None for a
        whole parameter, else the part of one of the source's parameters a form lives in (the
        parallel form's query rows of qkv and output columns of o). Fine-tuning uses it for
        --train cross and --cross-lr-scale."""
        added = [(n, p, None) for n, p in self.named_parameters()
                 if n.startswith(("mem_norm.", "section_input.")) or ".cross." in n]
        for j, block in enumerate(self.blocks):
            for name, index in (block.cross.parts_in_block(block) if block.cross is not None else []):
                added.append((f"blocks.{j}.{name}", block.get_parameter(name), index))
        return added

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    # --- pieces shared by training and decoding -------------------------------------------------
    def embed_tokens(self, input_ids, positions):
        x = self.embed(input_ids)
        return x + self.pos_embed(positions) if self.pos_embed is not None else x

    @property
    def head_weight(self):
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def final_hidden(self, hidden):
        return self.final_norm(hidden[None], slice(0, 1))[0]

    def logits(self, hidden):
        """Logits of a decode step's rows."""
        return few_row_logits(self.final_hidden(hidden), self.head_weight)

    def rope_for(self, place: Place):
        return None if self.rope is None else self.rope(place.positions, place.length, self.embed.weight.dtype)

    def run_blocks(self, x, sections: slice, place: Place, cache=None, memory=None, rope=None, cross: bool = True,
                   depths: range | None = None):
        """Sections `sections` (global indices, rows of x [S, B, T, d]) through every depth (or `depths`).
        memory: the normalised memory of the rows with cross-attention, for new slots (training,
        prefill); a decode step writes it with write_memory instead. cross=False: no
        cross-attention (the source's own layers, as in exact_outputs)."""
        run = Run(self, sections, place, cache, memory, rope if rope is not None else self.rope_for(place))
        if not cross:
            run.first_cross = None
        for j in depths if depths is not None else range(len(self.blocks)):
            block = self.blocks[j]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, run, j, use_reentrant=False)
            else:
                x = block(x, run, j)
        return x

    def _sets(self, sections: slice) -> slice:
        """Local cross weight sets (and memory-norm / input sets) of the sections `sections` (all > 0)."""
        h = max(self.held.start, 1)
        return slice(0, 1) if self.config.shared else slice(sections.start - h, sections.stop - h)

    def section_inputs(self, emb, prev_emb, prev_below, prev_ok, sections: slice, place: Place, cache=None):
        """Inputs [C, B, T, d] of sections s > 0 (`sections`), from prev_below [C, B, T, d], for the
        new tokens at `place` (a form that attends writes its K/V to `cache` there)."""
        h = max(self.held.start, 1)
        rows = None
        if self.section_input.attends:
            if place.rope is None:
                place.rope = self.rope_for(place)
            rows = Rows(place.slots, place.key_valid, place.rope, cache)
        return self.section_input(emb, prev_emb, prev_below, prev_ok, slice(sections.start - h, sections.stop - h), rows)

    # --- training / prefill: section after section over the whole sequence ----------------------
    def place(self, input_ids, attention_mask=None, cache: StagCache | None = None) -> Place:
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if cache is not None:
            return cache.reserve(valid)
        T = input_ids.shape[1]
        return Place(torch.arange(T, device=input_ids.device), (valid.long().cumsum(1) - 1).clamp(min=0), valid,
                     torch.zeros_like(valid[:, 0]), T, valid)

    def run_section(self, s: int, emb, below, place: Place, cache: StagCache | None = None):
        """Section s over new tokens (embeddings emb [B, T, d]); below: section s-1's outputs on
        them (None for s = 0). Returns [B, T, d]; with a cache, fills its K/V (prefill; then
        remember_last() records what the next step's section inputs read)."""
        x, memory = emb, None
        verified = s > 0 and self.config.verified
        if s > 0 and (not verified or (cache is not None and self.section_input.attends)):
            prev_below = torch.cat([(cache.last_out[s - 1] if cache is not None else torch.zeros_like(below[:, 0]))[:, None],
                                    below[:, :-1]], 1)
            prev_emb = torch.cat([(cache.last_emb if cache is not None else torch.zeros_like(emb[:, 0]))[:, None],
                                  emb[:, :-1]], 1)
            prev_ok = torch.cat([place.prev_valid[:, None], place.valid[:, :-1]], 1)
            # verified prefill: only to fill an attending bridge's cache with the prompt's rows (drafts read them)
            x = self.section_inputs(emb, prev_emb, prev_below[None], prev_ok, slice(s, s + 1), place, cache)[0]
            if self.config.exact_first:  # a prompt's first token: section s-1's output there is known
                x = torch.where(((place.positions == 0) & place.valid)[..., None], below, x)
            if self.mem_norm is not None:
                memory = self.mem_norm(below[None], self._sets(slice(s, s + 1)))
        if verified:  # the source's own computation: the exact input
            x = below
        return self.run_blocks(x[None], slice(s, s + 1), place, cache, memory, rope=place.rope)[0]

    def run_sections(self, input_ids, attention_mask=None, cache: StagCache | None = None,
                     memory_override=None):
        """Returns the last section's output [B, T, d]. With a cache, fills it (prefill).
        `memory_override` replaces the last section's memory source (recurrent reference)."""
        place = self.place(input_ids, attention_mask, cache)
        emb = self.embed_tokens(input_ids, place.positions)
        view, outputs = emb, []  # view: what section 2's bridge reads of each token (lower_section)
        for s in range(self.config.sections):
            if s == 0 and self.config.verified:
                view, out = self.lower_section(emb, place, cache)
                outputs.append(out)
                continue
            last = s == self.config.sections - 1
            below = memory_override if (memory_override is not None and last and s > 0) else (outputs or [None])[-1]
            outputs.append(self.run_section(s, view, below, place, cache))
        if cache is not None:
            self.remember_last(cache, view, dict(enumerate(outputs)))
        return outputs[-1]

    @staticmethod
    def remember_last(cache: StagCache, emb, outputs: dict):
        """After a prefill: the last position's embedding (the bridge's view of it, lower_section) and
        section outputs {section: [B, T, d]},
        read by the next step's section inputs (in place: a captured step reads these addresses)."""
        for s, out in outputs.items():
            cache.last_out[s] = out[:, -1]
        cache.last_emb.copy_(emb[:, -1])

    def exact_outputs(self, input_ids, attention_mask=None, upto: int | None = None) -> list:
        """Every section's output [B, T, d] when each reads the section below's output at the SAME
        position and no cross-attention: the source model's residual stream at the section
        boundaries, while the sections hold the source's layers (targets for the bridges, and the
        exact rows of verified decoding)."""
        return self.exact_states(input_ids, attention_mask, upto)[1]

    def exact_states(self, input_ids, attention_mask=None, upto: int | None = None):
        """(view [B, T, d], exact_outputs): also what the bridges read of each token (lower_section)."""
        place = self.place(input_ids, attention_mask)
        view, x = self.lower_section(self.embed_tokens(input_ids, place.positions), place)
        outputs = [x]
        for s in range(1, self.config.sections if upto is None else upto):
            x = self.run_blocks(x[None], slice(s, s + 1), place, cross=False)[0]
            outputs.append(x)
        return view, outputs

    def lower_section(self, emb, place: Place, cache=None):
        """Section 1 over emb [B, T, d], without cross-attention (it has none). Returns (view, output):
        view is what section 2's bridge reads of each token, section 1's state after
        config.bridge_depth of its layers (the embedding itself at depth 0)."""
        view = self.lower_layers(emb, place, cache, before_bridge=True)
        return view, self.lower_layers(view, place, cache, before_bridge=False)

    def lower_layers(self, x, place: Place, cache=None, *, before_bridge: bool):
        """Section 1's layers over x [B, T, d] (no cross-attention): the config.bridge_depth layers the
        bridge reads after (x itself at depth 0), or the rest of them."""
        k = self.config.bridge_depth
        if before_bridge and not k:
            return x
        if place.rope is None:
            place.rope = self.rope_for(place)
        depths = range(k) if before_bridge else range(k, self.config.depth)
        return self.run_blocks(x[None], slice(0, 1), place, cache, rope=place.rope, cross=False, depths=depths)[0]

    def exact_cache_hidden(self, input_ids, attention_mask=None):
        """An exact-cache model's output [B, T, d]: section 2's draft row at every position i > 0 (the
        bridge's input, attending to exact rows j < i and itself); position 0 reads u_0 (exact_first).
        Section 2 runs 2T rows, [exact; draft], in one pass with exact_cache_mask."""
        place = self.place(input_ids, attention_mask)
        view, below = self.lower_section(self.embed_tokens(input_ids, place.positions), place)
        return self.exact_cache_rows(below, self.teacher_forced_inputs(view, below[None], place)[0][0], place)

    def teacher_forced_inputs(self, view, exact, place: Place):
        """Every section s > 0's input at every position when the sections below gave their exact
        outputs exact [C, B, T, d]: the bridges read the view of x_i (lower_section; E[x_i] at depth 0)
        and of x_{i-1}, and u_{i-1} one position late.
        Returns (inputs [C, B, T, d], prev_ok [B, T]: whether position i-1 exists)."""
        shift = lambda t: torch.cat([torch.zeros_like(t[..., :1, :]), t[..., :-1, :]], -2)
        prev_ok = torch.cat([torch.zeros_like(place.valid[:, :1]), place.valid[:, :-1]], 1)
        return self.section_inputs(view, shift(view), shift(exact), prev_ok, slice(1, self.config.sections), place), prev_ok

    def exact_cache_rows(self, below, draft, place: Place):
        """Section 2's draft rows [B, T, d] from section 1's exact outputs below and the predicted
        inputs draft [B, T, d] (position 0 reads below: exact_first)."""
        draft = torch.where(((place.positions == 0) & place.valid)[..., None], below, draft)
        T = below.shape[1]
        both = Place(torch.arange(2 * T, device=below.device), place.positions.repeat(1, 2), place.valid.repeat(1, 2),
                     place.prev_valid, T, place.valid.repeat(1, 2),
                     self_mask=exact_cache_mask(place.valid, self.config.sliding_window))
        return self.run_blocks(torch.cat([below, draft], 1)[None], slice(1, 2), both, cross=False)[0][:, T:]

    def bridge_errors(self, input_ids, attention_mask=None):
        """Per section boundary, how far the section input (a bridge) is from what the source's lower
        layers give at the same position: mean squared error over the mean square of the target, on
        positions > 0 (position 0 reads the exact value). The targets come from exact_outputs under
        no_grad: only the bridges get gradients. Returns [sections - 1]."""
        place = self.place(input_ids, attention_mask)
        with torch.no_grad():
            view, targets = self.exact_states(input_ids, attention_mask, upto=self.config.sections - 1)
            targets = torch.stack(targets)
        pred, prev_ok = self.teacher_forced_inputs(view, targets, place)
        keep = (prev_ok & place.valid)[None, ..., None].to(pred.dtype)
        err = ((pred.float() - targets.float()) ** 2 * keep).sum((1, 2, 3))
        return err / ((targets.float() ** 2) * keep).sum((1, 2, 3)).clamp(min=1e-12)

    def forward(self, input_ids, attention_mask=None, labels=None, logits_to_keep: int = 0,
                output_hidden_states: bool = False, bridge_errors: bool = False, **unused):
        """As transformers' causal LMs: logits for the last `logits_to_keep` positions (0: all);
        hidden_states = (last section's output, its final-normed form) when asked.
        bridge_errors=True: only bridge_errors() as `loss` (the cheap bridge training, through the
        model's own forward so that data-parallel training syncs it)."""
        if bridge_errors:
            return CausalLMOutputWithPast(loss=self.bridge_errors(input_ids, attention_mask))
        drafts = self.config.exact_cache or (self.score_drafts and self.config.verified)
        hidden = (self.exact_cache_hidden if drafts else self.run_sections)(input_ids, attention_mask)
        normed = self.final_hidden(hidden)
        logits = F.linear(normed[:, -logits_to_keep:] if logits_to_keep else normed, self.head_weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      hidden_states=(hidden, normed) if output_hidden_states else None)

    def get_output_embeddings(self):
        return self.embed if self.lm_head is None else self.lm_head

    # --- decoding: every section on the same token at once ---------------------------------------
    def new_cache(self, batch, max_len, dtype=None) -> StagCache:
        held, cfg = self.held, self.config
        form = FORMS.get(cfg.cross_attn) if cfg.cross_sets else None
        attends = self.section_input is not None and self.section_input.attends
        return StagCache(cfg, batch, max_len, self.embed.weight.device, dtype or self.embed.weight.dtype,
                         sections=held.stop - held.start, memories=held.stop - max(held.start, 1),
                         joint=bool(form and form.joint_cache), bridge_kv_heads=cfg.num_kv_heads if attends else 0)

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

    def step_sections(self, token, cache: StagCache, recurrent: bool = False):
        """The held sections (the last one only, when recurrent) on tokens [B] at the next slot.
        Returns (outputs [S, B, d], place). Writes no memory: see write_memory."""
        cfg = self.config
        if recurrent and not (cfg.shared and cfg.sections > 1):
            raise ValueError("recurrent decoding needs a shared-weights model with >= 2 sections")
        place = cache.reserve_one()
        place.rope = self.rope_for(place)
        emb = self.embed_tokens(token[:, None], place.positions)  # [B, 1, d]
        sections = slice(cfg.sections - 1 if recurrent else self.held.start, self.held.stop)
        x = emb[None].expand(sections.stop - sections.start, -1, -1, -1)
        upper = slice(max(sections.start, 1), sections.stop)  # rows that read the section below
        if upper.stop > upper.start and not recurrent:
            inputs = self.section_inputs(emb, cache.last_emb[:, None], cache.last_out[upper.start - 1:upper.stop - 1, :, None],
                                         place.prev_valid[:, None], upper, place, cache)
            x = torch.cat([x[:upper.start - sections.start], inputs]) if upper.start > sections.start else inputs
        out = self.run_blocks(x, sections, place, cache, rope=place.rope)[:, :, -1]
        cache.last_out[sections] = out
        cache.last_emb.copy_(emb[:, -1])
        return out, place

    def decode_step(self, token, cache: StagCache, recurrent: bool = False, memory_kv=None):
        """step() without the host-side bounds check: tensor work only, no host syncs and no
        python state that changes between steps, so it can be captured in a CUDA graph."""
        out, place = self.step_sections(token, cache, recurrent)
        if self.config.cross_sets:  # section s's output becomes section s+1's memory at this slot
            sections = slice(self.config.sections - 1, self.config.sections) if recurrent else slice(1, self.config.sections)
            self.write_memory(out[-1:] if recurrent else out[:-1], cache, place, sections, memory_kv)
        return self.logits(out[-1])

    def verify_step(self, tokens, place: Place, u_prev, cache: StagCache):
        """One step of verified decoding (stagcli/verify.py): tokens [B, 2] at positions t-1, t (per
        row, place.slots [B, 2]). Section 1 runs both; section 2 runs position t-1 on the exact input
        u_prev [B, d] and position t on the bridge's prediction, one batched op per depth for both
        sections (at bridge_depth k > 0: section 1's first k layers, then both chains concurrently).
        Returns (section 2's logits [B, 2, V], section 1's outputs [B, 2, d])."""
        emb = self.embed_tokens(tokens, place.positions)
        ones = torch.ones_like(tokens[:, :1], dtype=torch.bool)
        at_t = Place(place.slots[:, 1:], place.positions[:, 1:], place.key_valid, ones[:, 0], place.length)
        place.rope = self.rope_for(place)
        view = self.lower_layers(emb, place, cache, before_bridge=True)  # at bridge_depth k > 0: k layers first
        draft = self.section_inputs(view[:, 1:], view[:, :1], u_prev[None, :, None], ones, slice(1, 2), at_t, cache)[0]
        upper = torch.cat([u_prev[:, None].to(emb.dtype), draft], 1)
        if not self.config.bridge_depth:  # both sections from the first layer: one batched op per depth
            out = self.run_blocks(torch.stack([emb, upper]), slice(0, 2), place, cache, rope=place.rope, cross=False)
            return self.logits(out[1]), out[0]
        # then two independent chains: section 1's last layers (the next step's exact row) and section 2
        # with the head (this step's logits); on CUDA on two streams at once, so the step is k + L/2 layers
        # deep (devices.run_concurrently)
        lower, logits = run_concurrently(
            lambda: self.lower_layers(view, place, cache, before_bridge=False),
            lambda: self.logits(self.run_blocks(upper[None], slice(1, 2), place, cache, rope=place.rope, cross=False)[0]),
            emb.device)
        return logits, lower

    def memory_kv_weights(self):
        """Every depth's cross-attention K/V projection stacked into one weight [C, depth*2*kv, d]
        (and bias), so write_memory makes all depths' memory K/V in ONE GEMM per step. A snapshot:
        rebuild it after the weights change."""
        if not self.config.cross_sets:
            return None
        weight = torch.cat([b.cross.kv.weight for b in self.blocks], 1).detach()
        biases = [b.cross.kv.bias for b in self.blocks]
        bias = None if biases[0] is None else torch.cat(biases, 1).detach()
        k_norm = None  # [C, depth, hd]
        if self.config.qk_norm:
            k_norm = torch.stack([b.cross.k_norm.weight for b in self.blocks], 1).detach()
        return weight, bias, k_norm

    def write_memory(self, source, cache, place: Place, sections: slice, memory_kv=None):
        """K/V of every depth's cross-attention for the memory of `sections` (global, all > 0) from
        the outputs of the sections below them, source [C, B, d], at this step's slot. With
        memory_kv (see memory_kv_weights) all depths come from one GEMM and two copies."""
        cfg = self.config
        cross, h = self._sets(sections), max(self.held.start, 1)
        rows = slice(sections.start - h, sections.stop - h)
        memory = self.mem_norm(source[:, :, None], cross)
        rope = place.rope if place.rope is not None else self.rope_for(place)
        if memory_kv is None:
            for j, block in enumerate(self.blocks):
                cache.update_memory(j, rows, place.slots, *block.cross.memory_kv(memory, cross, rope))
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
        cache.mem_k[:, rows].index_copy_(4, place.slots, k.to(cache.mem_k.dtype))
        cache.mem_v[:, rows].index_copy_(4, place.slots, v.to(cache.mem_v.dtype))


# `AutoModelForCausalLM.from_pretrained(dir)` works on stag output once this module is imported;
# without stagcli, with trust_remote_code=True: save_pretrained copies this file and the modules it
# imports into the checkpoint and writes config.auto_map (Hugging Face's remote-code convention).
AutoConfig.register("stag", StagConfig, exist_ok=True)
AutoModelForCausalLM.register(StagConfig, StagForCausalLM, exist_ok=True)
StagConfig.register_for_auto_class()
StagForCausalLM.register_for_auto_class("AutoModelForCausalLM")
