"""Architecture knowledge as data (one table, LitGPT/mergekit style).

Each family says how a Hugging Face config maps to StagConfig fields, and how its weight names
map to ours. A weight spec is a source name (relative to the layer prefix for per-layer weights),
Cat(...) for tensors fused along dim 0 (q|k|v, gate|up), or T(...) for GPT-2's Conv1D [in, out].
Weights listed in `optional` may be absent (biases, an untied head); the model gets them iff present.
Adding a family is adding an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Union


@dataclass(frozen=True)
class Cat:
    names: tuple[str, ...]


@dataclass(frozen=True)
class T:
    name: str


Spec = Union[str, Cat, T]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    fixed: dict                      # StagConfig fields that are the same for the whole family
    hparams: dict                    # StagConfig field -> HF config attribute, or callable(hf_config)
    layer_prefix: str
    globals: dict[str, Spec]
    layer: dict[str, Spec]
    optional: frozenset = field(default_factory=frozenset)
    # StagConfig flag -> weight whose presence turns it on
    presence_flags: dict = field(default_factory=dict)
    check: Callable | None = None    # hf_config -> error message or None


def _rope_theta(cfg):
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _rope_scaling(cfg):
    """The scaling part of HF's rope_parameters (None for plain RoPE)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.pop("rope_theta", None)
    params["rope_type"] = params.pop("type", None) or params.get("rope_type", "default")  # older configs: "type"
    if params["rope_type"] == "llama3":  # as transformers: defaults to the model's context
        params.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    return params if params["rope_type"] != "default" else None


def _llama_check(cfg):
    from .model import ROPE_SCALINGS
    rope_type = (_rope_scaling(cfg) or {}).get("rope_type", "default")
    if rope_type not in ROPE_SCALINGS:
        return f"RoPE scaling type '{rope_type}' is not supported yet (supported: {', '.join(ROPE_SCALINGS)})"
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:  # Phi-4-mini rotates 3/4 of each head
        return f"partial rotary embeddings (partial_rotary_factor={cfg.partial_rotary_factor}) are not supported yet"
    if getattr(cfg, "use_sliding_window", False):  # Qwen2/Qwen3 option, off in released checkpoints
        return "sliding-window attention (use_sliding_window=True) is not supported yet"
    return None


def _gpt2_check(cfg):
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, flag, False):
            return f"GPT-2 option {flag}=True is not supported"
    if not getattr(cfg, "scale_attn_weights", True):  # attention without the 1/sqrt(head_dim) scale
        return "GPT-2 option scale_attn_weights=False is not supported"
    return None


_q_k_v = lambda kind: Cat((f"self_attn.q_proj.{kind}", f"self_attn.k_proj.{kind}", f"self_attn.v_proj.{kind}"))

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    fixed=dict(norm="rms", positions="rope", mlp="gated"),
    hparams=dict(
        vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
        num_heads="num_attention_heads",
        num_kv_heads=lambda c: getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        intermediate_size="intermediate_size", norm_eps="rms_norm_eps",
        max_positions="max_position_embeddings", activation="hidden_act", rope_theta=_rope_theta,
        rope_scaling_params=_rope_scaling,
        sliding_window=lambda c: getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None,
        tie_embeddings=lambda c: bool(getattr(c, "tie_word_embeddings", False)),
    ),
    layer_prefix="model.layers.{i}.",
    globals={"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"},
    layer={
        "attn_norm.weight": "input_layernorm.weight",
        "qkv.weight": _q_k_v("weight"),
        "qkv.bias": _q_k_v("bias"),
        "o.weight": "self_attn.o_proj.weight",
        "o.bias": "self_attn.o_proj.bias",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "up.weight": Cat(("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        "up.bias": Cat(("mlp.gate_proj.bias", "mlp.up_proj.bias")),
        "down.weight": "mlp.down_proj.weight",
        "down.bias": "mlp.down_proj.bias",
        "q_norm.weight": "self_attn.q_norm.weight",  # Qwen3: per-head RMSNorm on q and k
        "k_norm.weight": "self_attn.k_norm.weight",
    },
    optional=frozenset({"qkv.bias", "o.bias", "up.bias", "down.bias", "lm_head.weight", "q_norm.weight",
                        "k_norm.weight"}),
    presence_flags={"qkv_bias": "qkv.bias", "o_bias": "o.bias", "mlp_bias": "up.bias", "qk_norm": "q_norm.weight"},
    check=_llama_check,
)

# Phi-3 / Phi-4: Llama's layout with q|k|v and gate|up already fused in the checkpoint
PHI3 = replace(
    LLAMA, name="phi3", model_types=("phi3",),
    layer={**{name: spec for name, spec in LLAMA.layer.items()
              if not name.endswith("bias") and name not in ("q_norm.weight", "k_norm.weight")},
           "qkv.weight": "self_attn.qkv_proj.weight", "up.weight": "mlp.gate_up_proj.weight"},
    optional=frozenset({"lm_head.weight"}), presence_flags={},
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    fixed=dict(norm="layer", positions="learned", mlp="plain", qkv_bias=True, o_bias=True, mlp_bias=True),
    hparams=dict(
        vocab_size="vocab_size", hidden_size="n_embd", num_layers="n_layer", num_heads="n_head",
        num_kv_heads="n_head", head_dim=lambda c: c.n_embd // c.n_head,
        intermediate_size=lambda c: c.n_inner or 4 * c.n_embd, norm_eps="layer_norm_epsilon",
        max_positions="n_positions", activation="activation_function",
        tie_embeddings=lambda c: bool(getattr(c, "tie_word_embeddings", True)),
    ),
    layer_prefix="transformer.h.{i}.",
    globals={"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight",
             "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias",
             "lm_head.weight": "lm_head.weight"},
    layer={
        "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
        "qkv.weight": T("attn.c_attn.weight"), "qkv.bias": "attn.c_attn.bias",
        "o.weight": T("attn.c_proj.weight"), "o.bias": "attn.c_proj.bias",
        "mlp_norm.weight": "ln_2.weight", "mlp_norm.bias": "ln_2.bias",
        "up.weight": T("mlp.c_fc.weight"), "up.bias": "mlp.c_fc.bias",
        "down.weight": T("mlp.c_proj.weight"), "down.bias": "mlp.c_proj.bias",
    },
    check=_gpt2_check,
)

FAMILIES = (LLAMA, PHI3, GPT2)


def family_for(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)
