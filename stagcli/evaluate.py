"""Evaluation on lm-evaluation-harness (lm_eval 0.4.x): staggered and plain models side by side.

- `StagLM` is lm-eval's HFLM with two changes: it loads any model `stag` can load (a stag
  directory, or a plain checkpoint / .gguf / alias converted in memory with one section, which is
  numerically the source model) and it generates through the staggered decode path
  (`stagcli.decode.generate`) instead of `transformers.generate`. Loglikelihood and rolling
  loglikelihood reuse HFLM unchanged: they call the model's full-sequence forward.
- It is registered as lm-eval model type `stag` (`--model stag --model_args pretrained=DIR`).
- `run_eval` runs lm-eval's `simple_evaluate` once per model on the same tasks and seed and
  summarises the metrics (`EvalReport.rows`): one row per task/metric, one value per model, and
  the delta against the first model.

lm-eval 0.4.13 has no plugin entry point for models, so its own CLI learns about `stag` only when
something imports this package first: the local task YAMLs do (see stagcli/tasks.py), and
`python -m stagcli.evaluate ...` is lm-eval's CLI with `stag` registered (any task, built-in too).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import tasks as local_tasks
from .convert import DTYPES, load_model
from .errors import StagError

LOCAL_TASKS_DIR = local_tasks.DEFAULT_DIR
# the closest local look-alike of well-known built-in tasks, for the offline message
LOOKALIKES = {"wikitext": "kjv_ppl", "lambada": "kjv_lastword", "hellaswag": "kjv_cloze_mc",
              "arc": "kjv_cloze_mc", "piqa": "kjv_cloze_mc", "winogrande": "kjv_cloze_mc",
              "mmlu": "kjv_cloze_mc", "gsm8k": "kjv_complete", "triviaqa": "kjv_complete",
              "nq_open": "kjv_complete", "coqa": "kjv_complete"}


class _ProgressHook:
    """Stands in for lm-eval's CacheHook (which HFLM calls once per finished request) to drive a
    progress callback; it caches nothing, as the default hook does without --use_cache."""

    def __init__(self, on_request: Callable[[str], None] | None):
        self.on_request = on_request
        self.kind = None

    def add_partial(self, attr, req, res):
        if self.on_request is not None and attr == self.kind:
            self.on_request(attr)


class StagLM(HFLM):
    """lm-eval model type `stag`. model_args: pretrained (stag dir, HF dir, .gguf or alias),
    tokenizer (path; default: the one saved with the model), dtype (float32|bfloat16|float16),
    device (cpu|cuda|...), recurrent (shared-weights decode approximation), max_length,
    batch_size, plus any HFLM option that applies to an in-memory model."""

    def __init__(self, pretrained, tokenizer=None, dtype="float32", device=None, recurrent=False,
                 max_length=None, batch_size=1, on_request: Callable[[str], None] | None = None,
                 on_start: Callable[[str, int], None] | None = None, **kwargs):
        if dtype in (None, "auto"):
            dtype = "float32"
        if dtype not in DTYPES:
            raise StagError(f"dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
        name = str(pretrained)
        if isinstance(pretrained, str):
            model, saved_tokenizer = load_model(pretrained, dtype)
        else:
            model, saved_tokenizer = pretrained, None
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        tokenizer = tokenizer or saved_tokenizer
        if tokenizer is None:
            raise StagError(f"{name} has no tokenizer; pass one (model_args tokenizer=PATH)")
        if device in (None, "cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's default device is cuda; fall back quietly on CPU machines
        model = model.to(device or "cuda").eval()
        # HFLM with an in-memory model: no hub access, the given tokenizer, a causal backend
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                         max_length=int(max_length or model.config.max_positions), **kwargs)
        self.pretrained = name
        self.recurrent = str(recurrent).lower() in ("1", "true", "yes")
        self._on_start = on_start
        self.cache_hook = _ProgressHook(on_request)

    # HFLM calls set_cache_hook only through CachingLM (--use_cache); keep ours otherwise
    def _begin(self, kind: str, requests):
        if isinstance(self.cache_hook, _ProgressHook):
            self.cache_hook.kind = kind
        if self._on_start is not None:
            self._on_start(kind, len(requests))

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._begin("loglikelihood", requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self._on_start is not None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._begin("loglikelihood_rolling", requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self._on_start is not None)

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._begin("generate_until", requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm or self._on_start is not None)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # HFLM's rolling loglikelihood forces inner tqdm bars on; ours (Rich) already show progress
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or self._on_start is not None,
                                             override_bs=override_bs)

    def _model_generate(self, context, max_length, stop, attention_mask=None, **generation_kwargs):
        """Generation through the staggered decoder: every section advances on the same token.
        Returns context + new tokens, as HFLM expects from transformers.generate."""
        from .decode import generate
        do_sample = generation_kwargs.pop("do_sample", None)
        temperature = float(generation_kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        top_k = int(generation_kwargs.pop("top_k", 0) or 0)
        top_p = float(generation_kwargs.pop("top_p", 1.0) or 1.0)
        # stop strings that are single tokens end a row early (exactly the text HFLM would keep:
        # it cuts the decoded text at the first stop string anyway)
        eos = {self.eot_token_id} if self.eot_token_id is not None else set()
        for text in stop or []:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1 and self.tokenizer.decode(ids) == text:
                eos.add(ids[0])
        new = generate(self.model, context, attention_mask, max_new_tokens=max_length - context.shape[1],
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=sorted(eos) or None,
                       recurrent=self.recurrent, pad_token_id=self.tokenizer.pad_token_id)
        return torch.cat([context, new.to(context.device)], dim=1)

    def get_model_info(self) -> dict:
        cfg = self.model.config
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.dtype), "model_path": self.pretrained,
                "stag_sections": cfg.sections, "stag_shared": cfg.shared, "stag_window": cfg.window,
                "stag_recipe": dict(cfg.stag_recipe or {}), "recurrent_decode": self.recurrent}


# `--model stag`. Registered here rather than with a class decorator: when this file runs as
# `python -m stagcli.evaluate` its classes live in __main__, and the registry (which stagcli.tasks
# pointed lazily at stagcli.evaluate:StagLM) must get the importable copy instead.
if __name__ != "__main__":
    register_model("stag")(StagLM)


# --- tasks -------------------------------------------------------------------------------------
def local_task_names(include_paths=()) -> list[str]:
    return sorted(_task_manager(False, include_paths).all_tasks)


def _task_manager(include_defaults: bool, include_paths=()):
    from lm_eval.tasks import TaskManager
    paths = [str(LOCAL_TASKS_DIR)] + [str(p) for p in include_paths]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def _is_offline_error(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = f"{type(err).__name__} {err}".lower()
        if any(s in text for s in ("offlinemodeisenabled", "offline mode", "connectionerror",
                                   "couldn't connect", "failed to resolve", "network is unreachable")):
            return True
        err = err.__cause__ or err.__context__
    return False


def resolve_tasks(names: list[str], include_paths=()):
    """A TaskManager that knows every requested task (built-in ones indexed only when asked for).
    Unknown names and built-in tasks that cannot load (no hub) raise a one-line StagError."""
    if not names:
        raise StagError("no tasks given; local tasks: " + ", ".join(local_task_names(include_paths)))
    local = _task_manager(False, include_paths)
    builtin = [n for n in names if not local.match_tasks([n])]
    if not builtin:
        return local
    manager = _task_manager(True, include_paths)
    alternatives = ", ".join(local.all_tasks)
    unknown = [n for n in builtin if not manager.match_tasks([n])]
    if unknown:
        raise StagError(f"unknown task(s): {', '.join(unknown)}; local tasks: {alternatives} "
                        "(or any lm-eval task name; list them with `lm_eval ls tasks`)")
    for name in builtin:
        try:
            manager.load([name])  # downloads (or reads the datasets cache); fails fast offline
        except Exception as err:  # datasets/hub raise many types; the user needs one line
            if _is_offline_error(err):
                close = next((v for k, v in LOOKALIKES.items() if name.startswith(k)), None)
                hint = f"try {close} (or: {alternatives})" if close else f"local look-alikes: {alternatives}"
                raise StagError(f"task '{name}' needs its dataset from the Hugging Face hub, which is "
                                f"unreachable (offline); {hint}") from err
            first = (str(err).strip().splitlines() or [""])[0]
            raise StagError(f"cannot load task '{name}': {type(err).__name__}: {first}") from err
    return manager


# --- running and summarising -------------------------------------------------------------------
@dataclass
class ModelRun:
    label: str
    path: str
    results: dict          # what lm-eval's simple_evaluate returned (samples dropped)
    seconds: float


@dataclass
class EvalReport:
    models: list[ModelRun]
    tasks: list[str]
    settings: dict
    rows: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"settings": self.settings, "tasks": self.tasks,
                "models": [{"label": m.label, "path": m.path, "seconds": round(m.seconds, 2)} for m in self.models],
                "summary": self.rows,
                "lm_eval": {m.label: m.results for m in self.models}}


def model_labels(paths: list[str]) -> list[str]:
    """Short unique column names: the last path component, with as many parent directories as it
    takes to tell repeated names apart (runs/a/finetuned vs runs/b/finetuned -> a/finetuned,
    b/finetuned); the same path given twice is numbered."""
    parts = [Path(p.rstrip("/")).parts or (p,) for p in paths]
    labels = []
    for mine in parts:
        depth = 1
        while depth < len(mine) and sum(other[-depth:] == mine[-depth:] for other in parts) > 1:
            depth += 1
        labels.append("/".join(mine[-depth:]))
    return [label if labels.count(label) == 1 else f"{label}#{labels[:i + 1].count(label)}"
            for i, label in enumerate(labels)]


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarise(runs: list[ModelRun]) -> list[dict]:
    """One row per (task, metric, filter): every model's value and stderr, and value - first."""
    rows, index = [], {}
    for run in runs:
        higher = run.results.get("higher_is_better", {})
        for task, metrics in run.results.get("results", {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not filt or metric.endswith("_stderr") or _number(value) is None:
                    continue
                row_key = (task, metric, filt)
                if row_key not in index:
                    index[row_key] = len(rows)
                    rows.append({"task": task, "metric": metric, "filter": filt,
                                 "higher_is_better": higher.get(task, {}).get(metric), "values": {}, "delta": {}})
                stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
                rows[index[row_key]]["values"][run.label] = {
                    "value": value, "stderr": None if stderr is None or math.isnan(stderr) else stderr}
    first = runs[0].label if runs else None
    for row in rows:
        base = row["values"].get(first)
        for label, cell in row["values"].items():
            if label != first and base is not None:
                row["delta"][label] = cell["value"] - base["value"]
    return rows


def _jsonable(results: dict) -> dict:
    import json
    from lm_eval.utils import handle_non_serializable
    results = {k: v for k, v in results.items() if k != "samples"}
    return json.loads(json.dumps(results, default=handle_non_serializable))


def run_eval(models: list[str], task_names: list[str], *, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = 1, seed: int = 1234,
             device: str | None = None, dtype: str = "float32", include_paths=(),
             model_args: dict | None = None, recurrent: bool = False,
             progress: Callable[..., None] | None = None) -> EvalReport:
    """Evaluate every model on the same tasks with the same seeds. progress(event, **info) gets
    ("model", index, label), ("requests", kind, total) and ("request",) events."""
    from lm_eval import simple_evaluate
    if not models:
        raise StagError("give at least one model")
    if batch_size < 1:
        raise StagError(f"--batch-size must be >= 1, not {batch_size}")
    if limit is not None and limit <= 0:
        raise StagError(f"--limit must be > 0, not {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise StagError(f"--num-fewshot must be >= 0, not {num_fewshot}")
    if limit is not None and limit >= 1 and limit == int(limit):
        limit = int(limit)  # a count (lm-eval reads values below 1 as a fraction of the task)
    manager = resolve_tasks(task_names, include_paths)
    report = progress or (lambda *a, **k: None)
    labels = model_labels(models)
    runs = []
    for i, (path, label) in enumerate(zip(models, labels)):
        report("model", index=i, label=label)
        start = time.perf_counter()
        lm = StagLM(path, dtype=dtype, device=device, batch_size=batch_size, recurrent=recurrent,
                    on_start=lambda kind, n: report("requests", kind=kind, total=n),
                    on_request=lambda kind: report("request"), **(model_args or {}))
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval print()s notes; stdout is for results
            results = simple_evaluate(model=lm, tasks=list(task_names), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
        runs.append(ModelRun(label, path, _jsonable(results), time.perf_counter() - start))
        del lm
    settings = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
                "device": device or ("cuda" if torch.cuda.is_available() else "cpu"), "dtype": dtype,
                "recurrent": recurrent}
    return EvalReport(runs, list(task_names), settings, summarise(runs))


def quiet_lm_eval(level=logging.ERROR):
    """For `stag eval`, which shows its own Rich progress: lm-eval logs many INFO/WARNING lines per
    run (e.g. about in-memory models), draws tqdm bars (task building, bootstrapping, GGUF loading
    in transformers) and lets `git describe` complain on stderr outside a repository."""
    import functools
    import subprocess

    import datasets
    import lm_eval.evaluator
    import tqdm
    import transformers
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(level)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # lm-eval's task-building and bootstrap bars take no switch; a one-shot CLI process can
    # default every tqdm bar to off (an explicit disable= from the caller still wins)
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)

    def quiet_git_hash():
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None
    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash


if __name__ == "__main__":  # lm-eval's own CLI, with `--model stag` registered (any task)
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
