"""Hugging Face checkpoint -> StagFormer, driven by the family table in families.py."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .assets import resolve_alias
from .errors import StagError
from .families import Cat, Family, T, family_for, supported_model_types
from .model import StagConfig, StagForCausalLM  # also registers "stag" with the Auto classes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("split", "shared")
INITS = ("zero", "lagged")
CROSS_ATTN = ("sequential", "parallel")


# --- reading a source checkpoint --------------------------------------------------------------
def _source_kwargs(src: str) -> tuple[str, dict]:
    """Where transformers should load from: a directory, a GGUF file, or (online only) a hub id."""
    src = resolve_alias(src)
    path = Path(src)
    if path.is_file():
        if path.suffix != ".gguf":
            raise StagError(f"{src} is a file but not a .gguf checkpoint; pass a checkpoint directory")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StagError(f"{src} has no config.json: not a Hugging Face checkpoint directory")
        return str(path), {}
    if src.count("/") == 1 and not src.startswith((".", "/")) and os.environ.get("HF_HUB_OFFLINE") != "1":
        return src, {}  # a hub id; only reachable with a network
    raise StagError(f"source not found: {src} (no such file or directory"
                    + ("; the hub is offline)" if src.count("/") == 1 else ")"))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_hf_config(src: str):
    from transformers import AutoConfig
    where, kw = _source_kwargs(src)
    try:
        return AutoConfig.from_pretrained(where, **kw)
    except Exception as err:  # transformers raises many types; the user needs one line
        raise StagError(f"cannot read the config of {src}: {_first_line(err)}") from err


@contextmanager
def _quiet_gguf_loader():
    """transformers' GGUF loader draws its own bare tqdm bar, which disable_progress_bar() does not
    reach; it would scribble over our Rich output, so it is switched off while loading."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:
        yield
        return
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None:
        gguf_loader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_loader.tqdm = bar


def load_hf_model(src: str):
    """(model in fp32, tokenizer or None). Works for safetensors/bin directories and GGUF files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where, kw = _source_kwargs(src)
    try:
        with _quiet_gguf_loader():
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    except Exception as err:
        raise StagError(f"cannot load the weights of {src}: {_first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except Exception:
        tokenizer = None  # small test checkpoints often ship none; conversion does not need one
    return model.eval(), tokenizer


def family_of(hf_config) -> Family:
    family = family_for(getattr(hf_config, "model_type", ""))
    if family is None:
        raise StagError(f"unsupported architecture '{getattr(hf_config, 'model_type', '?')}'; "
                        f"supported: {', '.join(supported_model_types())}")
    problem = family.check(hf_config) if family.check else None
    if problem:
        raise StagError(problem)
    return family


# --- building the staggered model --------------------------------------------------------------
def _read(state, spec, prefix=""):
    """The source tensor for a spec, or None if any part is missing."""
    names = spec.names if isinstance(spec, Cat) else (spec.name if isinstance(spec, T) else spec,)
    if any(prefix + n not in state for n in names):
        return None
    if isinstance(spec, T):
        return state[prefix + spec.name].t()
    return torch.cat([state[prefix + n] for n in names])


def validate_layout(num_layers: int, sections: int, mode: str, window, init: str, cross_attn: str = "sequential"):
    if cross_attn not in CROSS_ATTN:
        raise StagError(f"--cross-attn must be one of {', '.join(CROSS_ATTN)}, not '{cross_attn}'")
    if mode not in MODES:
        raise StagError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    if init not in INITS:
        raise StagError(f"--init must be one of {', '.join(INITS)}, not '{init}'")
    if sections < 1:
        raise StagError(f"--sections must be >= 1, not {sections}")
    if mode == "split" and num_layers % sections:
        raise StagError(f"--sections {sections} does not divide the model's {num_layers} layers")
    if window is not None and window < 1:
        raise StagError(f"--window must be >= 1, not {window}")
    if init == "lagged" and (mode != "split" or sections < 2):
        raise StagError("--init lagged applies to --mode split with --sections >= 2")


def stag_config_for(hf_config, state, sections=1, mode="split", window=None, init="zero",
                    cross_attn="sequential", recipe=None) -> StagConfig:
    family = family_of(hf_config)
    fields = dict(family.fixed)
    for name, attr in family.hparams.items():
        fields[name] = attr(hf_config) if callable(attr) else getattr(hf_config, attr)
    prefix0 = family.layer_prefix.format(i=0)
    for flag, weight in family.presence_flags.items():
        fields[flag] = _read(state, family.layer[weight], prefix0) is not None
    validate_layout(fields["num_layers"], sections, mode, window, init, cross_attn)
    special = {k: getattr(hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return StagConfig(**fields, sections=sections, shared=(mode == "shared" and sections > 1),
                      window=window, lagged_input=(init == "lagged"), cross_attn=cross_attn,
                      stag_recipe=recipe or {}, **special)


def convert_model(hf_model, sections=1, mode="split", window=None, init="zero", cross_attn="sequential",
                  recipe=None) -> StagForCausalLM:
    """Staggered copy of an in-memory transformers model (fp32). Sections=1 or shared mode with the
    zero-initialised cross-attention reproduce the source logits exactly."""
    state = hf_model.state_dict()
    family = family_of(hf_model.config)
    recipe = recipe or {"tool": "stag convert (in memory)", "sections": sections, "mode": mode}
    cfg = stag_config_for(hf_model.config, state, sections, mode, window, init, cross_attn, recipe)
    with torch.device("meta"):
        model = StagForCausalLM(cfg)
    model = model.to_empty(device="cpu").float()
    ours = model.state_dict()
    filled = set()

    widened = ("qkv.weight", "qkv.bias", "o.weight") if cfg.cross_attn == "parallel" and cfg.cross_sets else ()

    def put(name, tensor, index=None):
        target = ours[name] if index is None else ours[name][index]
        if name.endswith(widened) and tensor.dim() == target.dim() and tensor.shape != target.shape \
                and all(a <= b for a, b in zip(tensor.shape, target.shape)):
            # parallel cross-attention widens qkv (rows) and o (columns): the source fills the leading block
            target = target[tuple(slice(0, n) for n in tensor.shape)]
        if tensor.numel() != target.numel():
            raise StagError(f"internal: {name} has shape {tuple(target.shape)}, the source {tuple(tensor.shape)}")
        target.copy_(tensor.reshape(target.shape))
        filled.add(name)

    for name, spec in family.globals.items():
        if name not in ours:
            continue  # e.g. lm_head of a tied model
        tensor = _read(state, spec)
        if tensor is None:
            raise StagError(f"checkpoint lacks weight {spec} needed for {name}")
        put(name, tensor)
    for layer in range(cfg.num_layers):
        set_index, depth = (0, layer) if cfg.shared else divmod(layer, cfg.depth)
        prefix = family.layer_prefix.format(i=layer)
        for name, spec in family.layer.items():
            key = f"blocks.{depth}.{name}"
            if key not in ours:
                continue  # an optional weight this model does not have
            tensor = _read(state, spec, prefix)
            if tensor is None:
                raise StagError(f"checkpoint lacks weight {prefix}{spec} needed for {key}")
            put(key, tensor, set_index)
    _init_cross_attention(model, ours, filled)
    missing = set(ours) - filled
    if missing:
        raise StagError(f"internal: weights left unset: {sorted(missing)[:3]}")
    return model.eval()


def _init_cross_attention(model, ours, filled):
    """[ours] Section s's cross-attention starts as a copy of the same layer's self-attention
    (query, key, value, norms), with a zero output projection: the converted model computes what the
    source did (shared mode) and fine-tuning starts from meaningful attention patterns. The memory
    norm starts as the source's final norm. Parallel form: the query copy goes into the extra qkv
    rows and the zero output into the extra o columns (section 1, which has no memory, gets zeros)."""
    cfg = model.config
    if not cfg.cross_sets:
        return
    q_rows, hd_all = cfg.num_heads * cfg.head_dim, cfg.num_heads * cfg.head_dim
    qkv_rows = q_rows + 2 * cfg.num_kv_heads * cfg.head_dim  # the source's q|k|v
    parallel = cfg.cross_attn == "parallel"
    owner = lambda c: 0 if cfg.shared else c + 1  # weight set of the section that owns cross set c
    for j in range(cfg.depth):
        p = f"blocks.{j}."
        get = lambda name: ours.get(p + name)
        for kind in ("weight", "bias"):
            qkv = get(f"qkv.{kind}")
            if qkv is None:
                continue
            for c in range(cfg.cross_sets):
                get(f"cross_kv.{kind}")[c].copy_(qkv[owner(c)][q_rows:qkv_rows])
                if parallel:
                    qkv[owner(c)][qkv_rows:].copy_(qkv[owner(c)][:q_rows])
                else:
                    get(f"cross_q.{kind}")[c].copy_(qkv[owner(c)][:q_rows])
            if parallel and not cfg.shared:
                qkv[0][qkv_rows:].zero_()  # section 1's cross-query rows: never used
        for c in range(cfg.cross_sets):
            for norm in ("attn_norm.weight", "attn_norm.bias", "q_norm.weight", "k_norm.weight"):
                cross_norm = get("cross_" + norm.replace("attn_", ""))  # cross_norm, cross_q_norm, cross_k_norm
                if cross_norm is not None:
                    cross_norm[c].copy_(get(norm)[owner(c)])
        if parallel:
            get("o.weight")[:, :, hd_all:].zero_()  # the cross heads' output columns
        for name in ours:
            if name.startswith(p + "cross_o."):
                ours[name].zero_()
            if name.startswith(p + "cross_"):
                filled.add(name)
    for c in range(cfg.cross_sets):
        ours["mem_norm.weight"][c].copy_(ours["final_norm.weight"][0])
        if "mem_norm.bias" in ours:
            ours["mem_norm.bias"][c].copy_(ours["final_norm.bias"][0])
    filled.update(n for n in ours if n.startswith("mem_norm."))


# --- the whole job: stag convert ----------------------------------------------------------------
@dataclass
class ConvertResult:
    out: Path
    config: StagConfig
    source_params: int
    stag_params: int
    bytes_written: int


def convert(src: str, out: str, sections: int = 2, mode: str = "split", window: int | None = None,
            init: str = "zero", cross_attn: str = "sequential", dtype: str = "float32", force: bool = False,
            progress=None) -> ConvertResult:
    """Read SRC, stagger it, write OUT atomically (a temporary directory renamed at the end)."""
    out_path = Path(out)
    if dtype not in DTYPES:
        raise StagError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if out_path.exists() and not force:
        raise StagError(f"{out} already exists; pass --force to replace it")
    hf_config = load_hf_config(src)
    family = family_of(hf_config)
    layers_attr = family.hparams["num_layers"]
    num_layers = layers_attr(hf_config) if callable(layers_attr) else getattr(hf_config, layers_attr)
    validate_layout(num_layers, sections, mode, window, init, cross_attn)  # before the (slow) weight load
    report = progress or (lambda msg: None)
    report("loading source weights")
    hf_model, tokenizer = load_hf_model(src)
    recipe = {"tool": "stag convert", "source": str(src), "source_model_type": hf_config.model_type,
              "source_layers": num_layers, "sections": sections, "mode": mode, "window": window,
              "init": init, "cross_attn": cross_attn, "dtype": dtype}
    report("staggering")
    model = convert_model(hf_model, sections, mode, window, init, cross_attn, recipe).to(DTYPES[dtype])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        report("writing")
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "stag_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out_path.glob("*.safetensors"))
    return ConvertResult(out_path, model.config, sum(p.numel() for p in hf_model.parameters()),
                         sum(p.numel() for p in model.parameters()), size)


def load_model(path: str, dtype: str = "float32"):
    """(StagForCausalLM, tokenizer) from a stag directory, or from a plain checkpoint converted in
    memory with one section (numerically the source model), so every command takes either."""
    from transformers import AutoTokenizer
    config = load_hf_config(path)
    if config.model_type == "stag":
        where, kw = _source_kwargs(path)
        try:
            model = StagForCausalLM.from_pretrained(where, dtype=DTYPES[dtype])
        except Exception as err:
            raise StagError(f"cannot load the weights of {path}: {_first_line(err)}") from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except Exception:
            tokenizer = None
        return model.eval(), tokenizer
    hf_model, tokenizer = load_hf_model(path)
    recipe = {"tool": "stag (in-memory, unconverted)", "source": str(path), "sections": 1}
    return convert_model(hf_model, recipe=recipe).to(DTYPES[dtype]).eval(), tokenizer
