"""Hugging Face checkpoint -> StagFormer, driven by the family table in families.py."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from .assets import resolve_alias
from .errors import StagError
from .families import Cat, Family, T, family_for, supported_model_types
from .files import new_dir, write_json
from .layout import Layout
from .model import StagConfig, StagForCausalLM  # also registers "stag" with the Auto classes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _hparam(family: Family, hf_config, name: str):
    attr = family.hparams[name]
    return attr(hf_config) if callable(attr) else getattr(hf_config, attr)


def stag_config_for(hf_config, state, layout: Layout, recipe=None) -> StagConfig:
    family = family_of(hf_config)
    fields = dict(family.fixed)
    for name in family.hparams:
        fields[name] = _hparam(family, hf_config, name)
    prefix0 = family.layer_prefix.format(i=0)
    for flag, weight in family.presence_flags.items():
        fields[flag] = _read(state, family.layer[weight], prefix0) is not None
    layout.validate(fields["num_layers"])
    special = {k: getattr(hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return StagConfig(**fields, **layout.config_fields(), stag_recipe=recipe or {}, **special)


def convert_model(hf_model, layout: Layout | None = None, recipe=None) -> StagForCausalLM:
    """Staggered copy of an in-memory transformers model (fp32); default: one section, which is
    numerically the source. A shared layout with its zero-output cross-attention reproduces the
    source logits exactly too."""
    layout = layout or Layout(sections=1)
    state = hf_model.state_dict()
    family = family_of(hf_model.config)
    recipe = recipe or {"tool": "stag convert (in memory)", **layout.as_dict()}
    cfg = stag_config_for(hf_model.config, state, layout, recipe)
    with torch.device("meta"):
        model = StagForCausalLM(cfg)
    model = model.to_empty(device="cpu").float()
    ours = model.state_dict()
    filled = set()
    widened = model.blocks[0].cross.widened if model.blocks[0].cross is not None else ()

    def put(name, tensor, index=None):
        target = ours[name] if index is None else ours[name][index]
        if name.endswith(widened) and tensor.dim() == target.dim() and tensor.shape != target.shape \
                and all(a <= b for a, b in zip(tensor.shape, target.shape)):
            # a form that lives inside qkv (rows) and o (columns): the source fills the leading block
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
    _init_added(model, filled)
    missing = set(ours) - filled
    if missing:
        raise StagError(f"internal: weights left unset: {sorted(missing)[:3]}")
    return model.eval()


@torch.no_grad()
def _init_added(model, filled):
    """[ours] What staggering adds starts from the source: each section's cross-attention as a copy
    of the same layer's self-attention with a zero output (see the forms), the memory norm as the
    source's final norm. So a shared conversion computes what the source did, and fine-tuning
    starts from meaningful attention patterns."""
    cfg = model.config
    if model.section_input is not None:  # a bridge: its MLP starts at zero; stag convert fits the rest
        for module in model.section_input.modules():
            model._init_weights(module)
        for name, buffer in model.section_input.named_buffers():
            buffer.fill_(1.0)
            filled.add(f"section_input.{name}")
    if cfg.cross_sets:
        owners = [0] if cfg.shared else list(range(1, cfg.sections))  # weight set owning each cross set
        for block in model.blocks:
            block.cross.init_from_source(block, owners)
        for c in range(cfg.cross_sets):
            model.mem_norm.weight[c].copy_(model.final_norm.weight[0])
            if model.mem_norm.bias is not None:
                model.mem_norm.bias[c].copy_(model.final_norm.bias[0])
    filled.update(n for n, _, _ in model.added_weights())


# --- the whole job: stag convert ----------------------------------------------------------------
@dataclass
class ConvertResult:
    out: Path
    config: StagConfig
    source_params: int
    stag_params: int
    bytes_written: int


def check_output_dir(out: Path, force: bool, protected=()):
    """Refuse an OUT that exists (without --force) or that --force must not delete: anything but a
    previous stag output, the current directory, a protected path (the source) or one of its parents."""
    out = Path(out)
    for path in protected:  # writing into the source checkpoint would change it
        if Path(path).resolve() in out.resolve().parents:
            raise StagError(f"{out} is inside the source {path}; choose an output outside it")
    if not (out.exists() or out.is_symlink()):
        writable_parent(out)
        return
    if not force:
        raise StagError(f"{out} already exists; pass --force to replace it")
    resolved = out.resolve()
    for path in [Path.cwd(), *protected]:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            what = "the current directory" if path == Path.cwd().resolve() else f"{path}"
            raise StagError(f"--force will not replace {out}: it is or contains {what}")
    if not (out.is_dir() and is_stag_output(out)):
        raise StagError(f"--force replaces only a previous stag output; {out} is not one (no stag config.json)")


def writable_parent(out: Path):
    """Fail now, before minutes of loading, if OUT's directory cannot be created or written."""
    import tempfile
    parent = Path(out).absolute().parent
    while not parent.exists():  # the nearest existing ancestor: nothing is created here
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory", str(parent))
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise StagError(f"cannot write {out}: {err.strerror or err} ({parent})") from None


def is_stag_output(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "stag"
    except (OSError, ValueError, AttributeError):
        return False


def bridge_donor(path: str, layout: Layout, hf_config, family) -> dict:
    """The bridge weights of stag checkpoint PATH, checked to fit LAYOUT on this source."""
    from safetensors.torch import load_file
    if not is_stag_output(Path(path)):
        raise StagError(f"--bridge-from {path}: not a stag checkpoint (no stag config.json)")
    donor = json.loads((Path(path) / "config.json").read_text())
    want = {"section_input": layout.bridge, "sections": layout.sections, "bridge_depth": layout.bridge_depth,
            "hidden_size": _hparam(family, hf_config, "hidden_size"),
            "num_layers": _hparam(family, hf_config, "num_layers")}
    donor.setdefault("bridge_depth", 0)  # written before bridge_depth existed
    wrong = [f"{k} {donor.get(k)} (need {v})" for k, v in want.items() if donor.get(k) != v]
    if wrong:
        raise StagError(f"--bridge-from {path}: its bridge does not fit this conversion: {', '.join(wrong)}")
    weights = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        weights.update({k[len("section_input."):]: v for k, v in load_file(file).items()
                        if k.startswith("section_input.")})
    if not weights:
        raise StagError(f"--bridge-from {path}: holds no bridge weights")
    return weights


def convert(src: str, out: str, layout: Layout = Layout(), dtype: str = "float32", force: bool = False,
            progress=None, calibrate=None, calibrate_tokens: int = 65536, calibrate_progress=None,
            bridge_from: Optional[str] = None) -> ConvertResult:
    """Read SRC, stagger it, write OUT atomically (a temporary directory renamed at the end).
    calibrate: text (data specs) on which a --bridge is fitted, calibrate_tokens of it.
    bridge_from: a stag checkpoint of the same source and split whose (trained) bridge is copied
    instead, e.g. a split conversion whose bridge was trained with `finetune --train bridge`."""
    out_path = Path(out)
    if dtype not in DTYPES:
        raise StagError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if calibrate and bridge_from:
        raise StagError("give --calibrate (fit a new bridge) or --bridge-from (copy a trained one), not both")
    if bridge_from and not layout.bridge:
        raise StagError("--bridge-from copies a bridge: give --bridge ridge, mlp or attn too")
    if layout.bridge and not (calibrate or bridge_from):
        raise StagError(f"--bridge {layout.bridge} is fitted on text: give --calibrate DATA (e.g. kjv:train) "
                        "or --bridge-from a checkpoint with a trained bridge")
    if calibrate and not layout.bridge:
        raise StagError("--calibrate fits a bridge: give --bridge ridge, mlp or attn")
    if calibrate and calibrate_tokens < 1:
        raise StagError(f"--calibrate-tokens must be >= 1, not {calibrate_tokens}")
    source = Path(resolve_alias(src))
    check_output_dir(out_path, force, protected=[source] if source.exists() else [])
    hf_config = load_hf_config(src)
    family = family_of(hf_config)
    num_layers = _hparam(family, hf_config, "num_layers")
    layout.validate(num_layers)  # before the (slow) weight load
    donor = bridge_donor(bridge_from, layout, hf_config, family) if bridge_from else None
    if calibrate:
        from .bridge import is_self_spec
        from .data import resolve_sources
        real = [s for s in calibrate if not is_self_spec(s)]
        if real:
            resolve_sources(real)  # a missing file fails now, not after the weight load
    report = progress or (lambda msg: None)
    report("loading source weights")
    hf_model, tokenizer = load_hf_model(src)
    recipe = {"tool": "stag convert", "source": str(src), "source_model_type": hf_config.model_type,
              "source_layers": num_layers, **layout.as_dict(), "dtype": dtype}
    report("staggering")
    if calibrate:
        recipe.update(calibrate=calibrate, calibrate_tokens=calibrate_tokens)
    model = convert_model(hf_model, layout, recipe)
    if calibrate:
        from .bridge import calibration_ids, fit_ridge, is_self_spec, self_text
        if any(is_self_spec(s) for s in calibrate):
            report("sampling the source's own text")
            source = convert_model(hf_model, Layout(sections=1))
            calibrate = [self_text(source, tokenizer, s, progress=calibrate_progress) if is_self_spec(s) else s
                         for s in calibrate]
            del source
        report("fitting the bridge")
        del hf_model  # not needed any more: the converted sections hold the source's layers
        fit_ridge(model, calibration_ids(calibrate, tokenizer, calibrate_tokens), progress=calibrate_progress)
    if donor is not None:
        recipe["bridge_from"] = str(bridge_from)
        try:
            model.section_input.load_state_dict(donor)
        except RuntimeError as e:  # another bridge width: name the first mismatch only
            raise StagError(f"--bridge-from {bridge_from}: its bridge does not fit: {str(e).splitlines()[-1].strip()}")
    model = model.to(DTYPES[dtype])
    report("writing")
    with new_dir(out_path, replace=force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "stag_recipe.json", recipe)
        tmp.chmod(0o755)
    size = sum(f.stat().st_size for f in out_path.glob("*.safetensors"))
    added = sum((p if index is None else p[index]).numel() for _, p, index in model.added_weights())
    total = sum(p.numel() for p in model.parameters())
    return ConvertResult(out_path, model.config, total - added, total, size)


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
    return convert_model(hf_model, Layout(sections=1), recipe).to(DTYPES[dtype]).eval(), tokenizer
