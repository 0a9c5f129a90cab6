"""`stag experiment RECIPE`: the whole pipeline on one model, end to end.

1. convert the source in every form the recipe lists (split p=2 zero/lagged, p=3, shared, windowed; with
   a bridge fitted and trained first: split, exact-cache, verify);
2. fine-tune each for the same token budget (distilling from the source where asked);
3. fine-tune the unconverted model on the same data and budget: the control;
4. evaluate all of them (held-out perplexity during training, lm-eval tasks at the end);
5. benchmark decode speed, each form on the engine it decodes with (verify: with its acceptance);
6. train the paper's Table 1 from scratch at small scale (12L, 6L, 2x6 separate, 2x6 shared);
7. write results.json, results.md and loss-vs-tokens plots.

`--tiny` swaps in the recipe's `tiny:` overrides: a small Llama with a KJV BPE tokenizer, pretrained
briefly here as the "source", so the full pipeline runs on a CPU in minutes (CI runs it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .devices import machine
from .errors import StagError
from .files import write_json, write_text
from .layout import FIELDS as LAYOUT_FIELDS, Layout
from .recipes import check_keys, load_yaml

RECIPE_KEYS = {"name", "description", "source", "data", "heldout", "finetune", "variants", "eval",
               "bench", "scratch", "tiny", "offdomain"}
VARIANT_TRAIN_KEYS = ("train", "cross_lr_scale", "hidden_weight")  # fine-tuning options a variant may override
# a bridged variant: `calibrate` (data specs, `self:N` for the source's own text), `calibrate_tokens`, and
# `bridge_train` (finetune options of a bridge-only stage before the fine-tune; shared by variants that
# ask for the same conversion and stage)
VARIANT_BRIDGE_KEYS = ("calibrate", "calibrate_tokens", "bridge_train")
VARIANT_KEYS = {*LAYOUT_FIELDS, "distill", *VARIANT_TRAIN_KEYS, *VARIANT_BRIDGE_KEYS}
# `bench:` (decode speed of every fine-tuned variant, stag bench's engine for its form); prompt_data: real
# text for the prompts (a data spec), which a verify variant's acceptance needs; default: random tokens
BENCH_KEYS = {"batch_size", "prompt_len", "new_tokens", "repeats", "prompt_data"}


def load_experiment(path, tiny: bool = False) -> dict:
    recipe = load_yaml(path)
    check_keys(recipe, RECIPE_KEYS, f"recipe {path}")
    if tiny:
        if "tiny" not in recipe:
            raise StagError(f"recipe {path} has no `tiny:` section for --tiny")
        recipe = _merge(recipe, recipe["tiny"])
    check_keys(recipe.get("bench") or {}, BENCH_KEYS, f"recipe {path}: bench")
    for name, variant in (recipe.get("variants") or {}).items():
        check_keys(variant, VARIANT_KEYS, f"recipe {path}: variant {name}")
        variant_layout(variant)  # fail early on a bad value
        if variant.get("bridge_train"):
            from .train import TrainConfig
            TrainConfig.from_dict(variant["bridge_train"], where=f"recipe {path}: variant {name}: bridge_train")
    if not recipe.get("variants") and not recipe.get("scratch"):
        raise StagError(f"recipe {path} lists no variants and no scratch models")
    if recipe.get("variants") and not recipe.get("source"):
        raise StagError(f"recipe {path}: variants need a source model")
    return recipe


def _merge(base: dict, override: dict) -> dict:
    out = {k: v for k, v in base.items() if k != "tiny"}
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            and key != "variants" else value
    return out


# --- the tiny source: a tokenizer and a small Llama trained here ------------------------------------
def train_bpe_tokenizer(data_specs, vocab_size: int):
    """A byte-level BPE tokenizer trained on the training text (never the held-out split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import read_documents, resolve_sources
    texts = (doc for path in resolve_sources(data_specs) for doc in read_documents(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_tiny_source(spec: dict, recipe: dict, out: Path, report) -> str:
    """Train a small Llama from scratch on the recipe's data; returns its checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .train import TrainConfig, finetune
    target = out / "source"
    if (target / "config.json").is_file():
        return str(target)
    report("source", f"training the tiny source model ({spec.get('pretrain_tokens')} tokens)")
    tokenizer = train_bpe_tokenizer(recipe["data"], spec.get("vocab_size", 1024))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **spec["model"])
    model = LlamaForCausalLM(config)
    cfg = TrainConfig.from_dict({**recipe.get("finetune", {}), "data": recipe["data"],
                                 "heldout": recipe.get("heldout"), "max_tokens": spec["pretrain_tokens"],
                                 "lr": spec.get("pretrain_lr", 1e-3)}, where="tiny source")
    finetune(model, tokenizer, cfg, target)
    shutil.rmtree(target / "checkpoints", ignore_errors=True)
    return str(target)


# --- the steps --------------------------------------------------------------------------------------
def _train_config(recipe: dict, extra: Optional[dict] = None):
    from .train import TrainConfig
    return TrainConfig.from_dict({**(recipe.get("finetune") or {}), "data": recipe["data"],
                                  "heldout": recipe.get("heldout"), **(extra or {})}, where="experiment")


def _resume_or_restart(run_dir: Path) -> bool:
    """An interrupted run (killed, out of time) continues from its last checkpoint; one killed before
    its first checkpoint starts over (its directory belongs to the experiment, so clearing it is safe)."""
    from .train import last_checkpoint
    if last_checkpoint(run_dir) is not None:
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def variant_train_options(variant: dict) -> dict:
    """The fine-tuning options a variant overrides; the rest come from the recipe's `finetune:`."""
    return {key: variant[key] for key in VARIANT_TRAIN_KEYS if key in variant}


def variant_layout(variant: dict) -> Layout:
    """A variant's layout: its Layout keys over Layout's defaults; no `sections` means the control."""
    return Layout.from_dict({"sections": 1, **{k: v for k, v in variant.items() if k in LAYOUT_FIELDS}},
                            where="experiment variant")


def convert_and_finetune(name: str, variant: dict, source: str, recipe: dict, out: Path, report,
                         callbacks=()) -> dict:
    from .convert import convert, load_model
    from .train import finetune
    work = out / "variants" / name
    layout = variant_layout(variant)
    model_path = source
    if layout.sections > 1:
        model_path = prepare_bridged(name, variant, layout, source, recipe, out, report) if layout.bridge else \
            str(work / "converted")
        if not layout.bridge and not (work / "converted" / "config.json").is_file():
            report(name, "converting")
            convert(source, model_path, layout, force=True)
    finetuned = work / "finetuned"
    if not (finetuned / "stag_recipe.json").is_file():
        resume = _resume_or_restart(finetuned)
        model, tokenizer = load_model(model_path)
        teacher = load_model(source)[0] if variant.get("distill") else None
        extra = variant_train_options(variant)
        if teacher is None:
            extra["distill_alpha"] = 0.0
        report(name, ("resuming " if resume else "") + "fine-tuning"
               + (" with distillation" if teacher is not None else ""))
        start = time.perf_counter()
        finetune(model, tokenizer, _train_config(recipe, extra), finetuned, teacher=teacher, resume=resume,
                 callbacks=callbacks, run_info={"model": model_path, "teacher": source if teacher is not None else None})
        write_json(work / "time.json", {"finetune_s": time.perf_counter() - start})
        shutil.rmtree(finetuned / "checkpoints", ignore_errors=True)  # the final model is kept
    return {"name": name, **variant, "converted": model_path, "finetuned": str(finetuned),
            "curve": _curve(finetuned / "metrics.jsonl")}


def prepare_bridged(name: str, variant: dict, layout: Layout, source: str, recipe: dict, out: Path, report) -> str:
    """Convert with a fitted bridge, then (bridge_train) train the bridge alone; variants asking for the
    same conversion and stage share the result (OUT/bridged/<hash>; a verify variant shares the stage of
    the exact-cache layout). Returns the model to fine-tune."""
    import hashlib

    from .convert import convert, load_model
    from .train import TrainConfig, finetune
    # layout fields at their defaults left out: a new option must not orphan finished stages
    defaults = Layout().as_dict()
    spec = {k: variant.get(k) for k in VARIANT_BRIDGE_KEYS} | {
        "layout": {k: v for k, v in layout.as_dict().items() if v != defaults[k]}}
    root = out / "bridged" / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    if layout.mode == "verify":
        # a verify model's drafts are what an exact-cache model of the same layout outputs: fit and train
        # the bridge in that form (shared with such a variant) and copy it in
        twin = prepare_bridged(name, variant, dataclasses.replace(layout, mode="exact-cache"), source, recipe, out,
                               report)
        if not (root / "verify" / "config.json").is_file():
            report(name, "converting with the trained bridge")
            convert(source, str(root / "verify"), layout, force=True, bridge_from=twin)
        return str(root / "verify")
    converted, trained = root / "converted", root / "bridge-trained"
    if not (converted / "config.json").is_file():
        report(name, "converting with a fitted bridge")
        convert(source, str(converted), layout, force=True, calibrate=variant.get("calibrate") or recipe["data"],
                calibrate_tokens=int(variant.get("calibrate_tokens", 65536)))
    stage = variant.get("bridge_train")
    if not stage:
        return str(converted)
    if not (trained / "stag_recipe.json").is_file():
        resume = _resume_or_restart(trained)
        report(name, ("resuming " if resume else "") + "training the bridge")
        model, tokenizer = load_model(str(converted))
        options = {"data": recipe["data"], "heldout": recipe.get("heldout"), **stage}
        teacher = load_model(source)[0] if options.get("distill_from") else None
        finetune(model, tokenizer, TrainConfig.from_dict(options, where=f"variant {name}: bridge_train"), trained,
                 teacher=teacher, resume=resume)
        shutil.rmtree(trained / "checkpoints", ignore_errors=True)
    write_json(root / "spec.json", spec)
    return str(trained)


def _run_config(finetuned) -> dict:
    """The TrainConfig a fine-tune actually ran with (defaults resolved)."""
    path = Path(finetuned) / "run.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}


def _curve(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{"tokens": r["tokens"], "heldout_loss": r["heldout_loss"]} for r in rows if "heldout_loss" in r]


def scratch_tokenizer(spec: dict, recipe: dict, source, out: Path):
    """The scratch models' tokenizer: `tokenizer: {bpe_vocab: N}` trains a byte-level BPE on the
    training data (kept in OUT/scratch/tokenizer), a path or alias loads one, and by default the
    source model's is used."""
    from transformers import AutoTokenizer

    from .convert import load_model
    choice = spec.get("tokenizer")
    if isinstance(choice, dict):
        saved = out / "scratch" / "tokenizer"
        if not (saved / "tokenizer.json").is_file():
            train_bpe_tokenizer(recipe["data"], int(choice["bpe_vocab"])).save_pretrained(saved)
        return AutoTokenizer.from_pretrained(saved)
    if choice is None and source is None:
        raise StagError("scratch: give `tokenizer:` ({bpe_vocab: N} or a path) when the recipe has no source")
    return load_model(str(choice or source))[1]


def scratch_runs(recipe: dict, source, out: Path, report) -> list[dict]:
    """The paper's Table 1 at small scale: L-layer and L/2-layer baselines, 2 x L/2 separate and shared."""
    from .convert import load_model
    from .model import StagConfig, StagForCausalLM
    from .train import finetune
    spec = recipe["scratch"]
    tokenizer = scratch_tokenizer(spec, recipe, source, out)
    layers = spec["layers"]
    shapes = {f"base-{layers}L": dict(num_layers=layers), f"base-{layers // 2}L": dict(num_layers=layers // 2),
              f"stag-2x{layers // 2}-separate": dict(num_layers=layers, sections=2),
              f"stag-2x{layers // 2}-shared": dict(num_layers=layers // 2, sections=2, shared=True)}
    results = []
    for name, shape in shapes.items():
        target = out / "scratch" / name
        if not (target / "stag_recipe.json").is_file():
            resume = _resume_or_restart(target)
            report(name, ("resuming" if resume else "training") + " from scratch")
            torch.manual_seed(0)
            cfg = StagConfig(vocab_size=len(tokenizer), **spec["model"], **shape,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             stag_recipe={"tool": "stag experiment (from scratch)", **shape})
            train_cfg = _train_config(recipe, {"cross_lr_scale": 1.0, **(spec.get("finetune") or {})})
            finetune(StagForCausalLM(cfg), tokenizer, train_cfg, target, resume=resume)
            shutil.rmtree(target / "checkpoints", ignore_errors=True)
        curve = _curve(target / "metrics.jsonl")
        params = sum(p.numel() for p in load_model(str(target))[0].parameters())
        results.append({"name": name, **shape, "params": params, "curve": curve,
                        "heldout_ppl": math.exp(curve[-1]["heldout_loss"])})
    return results


def offdomain_ppl(recipe: dict, source: str, entries: list[dict], report) -> dict:
    """Perplexity on text no variant was calibrated or trained on (recipe `offdomain: {data, sequences,
    seq_len}`), for the source and every fine-tuned variant, on the same sequences."""
    from .convert import load_model
    from .data import load_packed
    from .train import perplexity
    spec = recipe["offdomain"]
    report("offdomain", f"perplexity on {spec['data']}")
    result = {}
    for name, path in [("source", source)] + [(e["name"], e["finetuned"]) for e in entries]:
        model, tokenizer = load_model(path)
        ids = load_packed(spec["data"], tokenizer, spec.get("seq_len", 256))[:spec.get("sequences", 32)]
        result[name] = perplexity(model, ids)
    return {"data": spec["data"], "ppl": result, "ratio": {k: v / result["source"] for k, v in result.items()}}


def bench_variants(entries: list[dict], recipe: dict, report) -> dict:
    from .bench import bench_model
    settings = recipe.get("bench") or {}
    speeds = {}
    for entry in entries:
        report(entry["name"], "benchmarking decode")
        speeds[entry["name"]] = bench_model(entry["finetuned"], batch_size=settings.get("batch_size", 1),
                                            prompt_len=settings.get("prompt_len", 32),
                                            new_tokens=settings.get("new_tokens", 32),
                                            repeats=settings.get("repeats", 3), prompt_data=settings.get("prompt_data"))
    return speeds


# --- the whole experiment ---------------------------------------------------------------------------
STEPS = ("eval", "bench", "scratch")  # the optional steps after fine-tuning


def select(recipe: dict, variants: Optional[list[str]] = None, max_tokens: Optional[int] = None,
           skip: Optional[list[str]] = None) -> dict:
    """The recipe narrowed to some variants, with another token budget, or without some steps."""
    recipe = dict(recipe)
    if variants:
        unknown = [v for v in variants if v not in (recipe.get("variants") or {})]
        if unknown:
            raise StagError(f"no variant {', '.join(unknown)} in the recipe; it has: "
                            f"{', '.join(recipe.get('variants') or {}) or 'none'}")
        recipe["variants"] = {v: recipe["variants"][v] for v in variants}
    if max_tokens is not None:
        if max_tokens <= 0:
            raise StagError(f"--max-tokens must be positive, got {max_tokens}")
        recipe["finetune"] = {**(recipe.get("finetune") or {}), "max_tokens": max_tokens}
        if recipe.get("scratch"):
            scratch_ft = {**(recipe["scratch"].get("finetune") or {}), "max_tokens": max_tokens}
            recipe["scratch"] = {**recipe["scratch"], "finetune": scratch_ft}
    for step in skip or []:
        if step not in STEPS:
            raise StagError(f"--skip takes {', '.join(STEPS)}; got '{step}'")
        recipe.pop(step, None)
    return recipe


def run_experiment(recipe_path, out_dir, results_dir, tiny: bool = False,
                   report: Optional[Callable[[str, str], None]] = None, variants: Optional[list[str]] = None,
                   max_tokens: Optional[int] = None, skip: Optional[list[str]] = None, callbacks=()) -> dict:
    """The whole pipeline; `callbacks` (train.Callback) see every fine-tune."""
    report = report or (lambda who, what: None)
    recipe = select(load_experiment(recipe_path, tiny), variants, max_tokens, skip)
    out, results = Path(out_dir), Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = recipe.get("source")
    if isinstance(source, dict):  # tiny: build it here
        source = build_tiny_source(source, recipe, out, report)

    entries = [convert_and_finetune(name, v or {}, source, recipe, out, report, callbacks)
               for name, v in (recipe.get("variants") or {}).items()]

    evaluation = None
    if recipe.get("eval") and entries:
        from .evaluate import run_eval
        report("eval", "lm-eval on the source and every fine-tuned variant")
        spec = recipe["eval"]
        paths = [source] + [e["finetuned"] for e in entries]
        evaluation = run_eval(paths, spec["tasks"], limit=spec.get("limit"),
                              batch_size=spec.get("batch_size", 4), seed=spec.get("seed", 1234))
    speeds = bench_variants(entries, recipe, report) if recipe.get("bench") else {}
    offdomain = offdomain_ppl(recipe, source, entries, report) if recipe.get("offdomain") and entries else {}
    scratch = scratch_runs(recipe, source, out, report) if recipe.get("scratch") else []

    summary = summarise(recipe, source, entries, evaluation, speeds, scratch,
                        seconds=time.perf_counter() - started, tiny=tiny, recipe_path=str(recipe_path))
    summary["offdomain"] = offdomain
    write_results(summary, results)
    return summary


def summarise(recipe, source, entries, evaluation, speeds, scratch, seconds, tiny, recipe_path) -> dict:
    control = next((e for e in entries if e.get("sections", 1) == 1), None)
    control_ppl = math.exp(control["curve"][-1]["heldout_loss"]) if control else None
    control_speed = speeds.get(control["name"]) if control else None
    rows = []
    for e in entries:
        curve = e["curve"]
        converted = e.get("sections", 1) > 1
        row = {"variant": e["name"], "sections": e.get("sections", 1),
               "mode": e.get("mode", "split") if converted else "unconverted", "window": e.get("window"),
               "init": (e.get("bridge") or e.get("init", "zero")) if converted else "", "distill": bool(e.get("distill")),
               "cross_attn": variant_layout(e).config_fields()["cross_attn"] if converted else "",
               "cross_lr_scale": _run_config(e["finetuned"]).get("cross_lr_scale") if converted else None,
               "heldout_ppl_before": math.exp(curve[0]["heldout_loss"]),
               "heldout_ppl_after": math.exp(curve[-1]["heldout_loss"]), "tokens": curve[-1]["tokens"]}
        if control_ppl:
            row["ppl_vs_control"] = row["heldout_ppl_after"] / control_ppl - 1
        if e.get("bridge_depth"):
            row["bridge_depth"] = e["bridge_depth"]
        speed = speeds.get(e["name"])
        if speed:
            row["ms_per_token"] = speed["ms_per_token"]
            if row["mode"] == "verify":  # an exact-cache model emits every draft: nothing to accept
                row["acceptance"] = speed["acceptance"]
            if control_speed:
                row["latency_vs_control"] = speed["ms_per_token"] / control_speed["ms_per_token"]
        rows.append(row)
    labels = ["source"] + [e["name"] for e in entries]
    tasks = []
    if evaluation is not None:  # lm-eval labels columns by path; name them by variant instead
        names = dict(zip([m.label for m in evaluation.models], labels))
        for row in evaluation.rows:
            tasks.append({"task": row["task"], "metric": row["metric"], "filter": row["filter"],
                          "values": [row["values"].get(k, {}).get("value") for k in names],
                          "stderr": [row["values"].get(k, {}).get("stderr") for k in names]})
    return {"recipe": recipe_path, "tiny": tiny, "source": source, "machine": machine(),
            "seconds": round(seconds, 1), "finetune": recipe.get("finetune"), "variants": rows,
            "curves": {e["name"]: e["curve"] for e in entries}, "tasks": tasks, "task_models": labels,
            "bench": speeds, "scratch": scratch, "scratch_settings": recipe.get("scratch")}


def write_results(summary: dict, results: Path):
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "results.json", summary)
    if summary["curves"]:
        _plot(summary["curves"], results / "heldout_loss.png", "Held-out loss while fine-tuning (conversions vs control)")
    if summary["scratch"]:
        _plot({r["name"]: r["curve"] for r in summary["scratch"]}, results / "scratch_heldout_loss.png",
              "From scratch: held-out loss (paper Table 1 at small scale)")
    write_text(results / "results.md", results_markdown(summary))


def _plot(curves: dict, path: Path, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional extras (pip install -e ".[dev]")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([p["tokens"] for p in curve], [p["heldout_loss"] for p in curve], marker=".", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_markdown(s: dict) -> str:
    fmt = lambda v, spec=".2f", unit="": "" if v is None else format(v, spec) + unit
    lines = [f"# Results: `{s['recipe']}`" + (" (--tiny)" if s["tiny"] else ""), "",
             f"- machine: {s['machine']}", *([f"- source: `{s['source']}`"] if s['source'] else []),
             f"- wall time: {s['seconds']} s",
             *([f"- fine-tuning (same for every variant): `{json.dumps(s['finetune'])}`"] if s["variants"] else []), ""]
    if s["variants"]:
        lines += ["## Conversions, fine-tuned for the same token budget", "",
                  "| variant | sections | mode | window | init | cross-attn | cross lr x | distil | tokens | "
                  "held-out ppl after convert | after fine-tune | vs control | decode ms/token | latency vs control | "
                  "acceptance |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["variants"]:
        mode = r["mode"] + (f", bridge depth {r['bridge_depth']}" if r.get("bridge_depth") else "")
        lines.append(f"| {r['variant']} | {r['sections']} | {mode} | {r['window'] or ''} | {r['init']} | "
                     f"{r.get('cross_attn', '')} | {fmt(r.get('cross_lr_scale'), 'g')} | "
                     f"{'yes' if r['distill'] else ''} | {r['tokens']:,} | {fmt(r['heldout_ppl_before'])} | "
                     f"{fmt(r['heldout_ppl_after'])} | {fmt(r.get('ppl_vs_control'), '+.1%')} | "
                     f"{fmt(r.get('ms_per_token'))} | {fmt(r.get('latency_vs_control'), unit='x')} | "
                     f"{fmt(r.get('acceptance'))} |")
    if s["tasks"]:
        lines += ["", "## lm-eval tasks", "", "| task | metric | " + " | ".join(s["task_models"]) + " |",
                  "|---|---|" + "---|" * len(s["task_models"])]
        for row in s["tasks"]:
            values = " | ".join(fmt(v, ".4g") for v in row["values"])
            lines.append(f"| {row['task']} | {row['metric']} | {values} |")
    if s["scratch"]:
        settings = s.get("scratch_settings") or {}
        lines += ["", "## From scratch (the paper's Table 1 at small scale)", "",
                  f"Model: `{json.dumps(settings.get('model'))}`; training (same for every model): "
                  f"`{json.dumps({**(s['finetune'] or {}), **(settings.get('finetune') or {})})}`", "",
                  "| model | layers | sections | shared | parameters | held-out ppl |", "|---|---|---|---|---|---|"]
        for r in s["scratch"]:
            lines.append(f"| {r['name']} | {r['num_layers']} | {r.get('sections', 1)} | "
                         f"{'yes' if r.get('shared') else ''} | {r['params']:,} | {r['heldout_ppl']:.2f} |")
    if s.get("offdomain"):
        o = s["offdomain"]
        lines += ["", f"## Off-domain perplexity ({o['data']}, never calibrated or trained on)", "",
                  "| model | ppl | vs source |", "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {o['ratio'][k]:.2f}x |" for k, v in o["ppl"].items()]
    plots = (["`heldout_loss.png`"] if s["curves"] else []) + (["`scratch_heldout_loss.png`"] if s["scratch"] else [])
    lines += ["", "Plots: " + ", ".join(plots), ""]
    return "\n".join(lines)
