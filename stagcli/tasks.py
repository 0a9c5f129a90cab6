"""Offline look-alikes of common lm-eval tasks, built from held-out King James Bible text.

`python -m stagcli.tasks [OUT_DIR]` (default stagcli/task_data) rewrites the JSONL files that the task
YAMLs in stagcli/task_data read. Only held-out chapters are used (`stagcli.corpora.is_heldout`, the
same fixed split that `stag finetune` never trains on), and every random choice comes from one
seeded generator, so the files are byte-for-byte reproducible.

| task | lm-eval output type | looks like | metrics |
|---|---|---|---|
| kjv_ppl | loglikelihood_rolling | wikitext | word_perplexity, byte_perplexity, bits_per_byte |
| kjv_lastword | loglikelihood | lambada_openai | perplexity, acc |
| kjv_cloze_mc | multiple_choice | hellaswag | acc, acc_norm |
| kjv_complete | generate_until | a short-answer generative task | exact_match, prefix_words |

This module is also imported by the task YAMLs (`custom_dataset` / `process_results`), which is how
`lm_eval --model stag` works from lm-eval's own CLI: lm-eval 0.4.13 has no plugin entry point for
models, so importing this module registers the `stag` model type (lazily: lm-eval imports
stagcli.evaluate only when a `stag` model is created).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 1234
MC_ITEMS = 250
LASTWORD_ITEMS = 250
COMPLETE_ITEMS = 200
COMPLETE_WORDS = 4          # kjv_complete scores the first few words of the true continuation
DEFAULT_DIR = Path(__file__).resolve().parent / "task_data"  # package data: ships in the wheel
TASK_NAMES = ("kjv_ppl", "kjv_lastword", "kjv_cloze_mc", "kjv_complete")


# --- registration with lm-eval (cheap: no torch / transformers import) ---------------------------
def register_stag_model() -> None:
    """Make `--model stag` known to lm-eval's registry, pointing lazily at stagcli.evaluate.StagLM."""
    try:
        import lm_eval.models  # noqa: F401  (fills the registry first: get_model skips it when non-empty)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return
    if "stag" not in model_registry:
        model_registry.register("stag", target="stagcli.evaluate:StagLM")


register_stag_model()


# --- hooks the task YAMLs call ---------------------------------------------------------------------
def local_dataset(data_file: str, **_metadata):
    """custom_dataset for the local tasks: {"test": Dataset} from a JSONL file, relative names
    resolved against stagcli/task_data. lm-eval calls it with the task metadata too (ignored).
    Referencing it from a YAML makes lm-eval import this module (registering `--model stag`)."""
    import datasets
    from .errors import StagError
    path = Path(data_file)
    path = path if path.is_absolute() else DEFAULT_DIR / path
    if not path.is_file():
        raise StagError(f"local task data {path} is missing; rebuild it with: python -m stagcli.tasks")
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _words(text: str) -> list[str]:
    """Words compared case-sensitively but without surrounding punctuation."""
    return [w for w in (w.strip(".,;:?!'\"()") for w in text.split()) if w]


def score_completion(doc: dict, results: list[str]) -> dict:
    """kjv_complete metrics for one document. exact_match: the first COMPLETE_WORDS generated words
    equal the true continuation's; prefix_words: the fraction of those words matched in order
    before the first mismatch (partial credit)."""
    want = _words(doc["target"])[:COMPLETE_WORDS]
    got = _words(results[0])[:len(want)]
    matched = 0
    for a, b in zip(got, want):
        if a != b:
            break
        matched += 1
    return {"exact_match": float(matched == len(want)), "prefix_words": matched / len(want)}


# --- building the data --------------------------------------------------------------------------
def heldout_verses() -> tuple[list[dict], list[dict]]:
    """(chapters, verses) of the held-out split, in Bible order."""
    from .assets import package_file
    from .corpora import CORPORA, _kjv_chapters, is_heldout
    from .errors import StagError
    package, file, install = CORPORA["kjv"]
    source = package_file(package, file)
    if source is None:
        raise StagError(f"building the local tasks needs the KJV text: {install}")
    chapters, verses = [], []
    for (book, chapter), texts in _kjv_chapters(source).items():
        if not is_heldout(book, chapter):
            continue
        texts = [" ".join(t.split()) for t in texts]
        chapters.append({"text": " ".join(texts), "source": f"{book} {chapter}"})
        verses += [{"text": t, "source": f"{book} {chapter}:{i + 1}"} for i, t in enumerate(texts)]
    return chapters, verses


def _split_words(text: str, fraction: float) -> tuple[str, str]:
    words = text.split()
    cut = max(1, round(len(words) * fraction))
    return " ".join(words[:cut]), " ".join(words[cut:])


def build_docs(seed: int = SEED) -> dict[str, list[dict]]:
    """Every local task's documents. Verses are drawn without replacement per task."""
    rng = random.Random(seed)
    chapters, verses = heldout_verses()
    docs: dict[str, list[dict]] = {"kjv_ppl": chapters}

    # lambada-like: a whole verse, predict its last word (punctuation stays with the context side)
    pool = [v for v in verses if len(v["text"].split()) >= 10 and v["text"].split()[-1].strip(".,;:?!").isalpha()]
    lastword = []
    for v in rng.sample(pool, LASTWORD_ITEMS):
        words = v["text"].split()
        last = words[-1]
        core = last.rstrip(".,;:?!")
        lastword.append({"context": " ".join(words[:-1]), "target": core, "tail": last[len(core):],
                         "source": v["source"]})
    docs["kjv_lastword"] = lastword

    # hellaswag-like: first half of a verse, pick its true second half among 4
    pool = [v for v in verses if 12 <= len(v["text"].split()) <= 40]
    chosen = rng.sample(pool, MC_ITEMS)
    endings = [_split_words(v["text"], 0.5)[1] for v in pool]
    mc = []
    for v in chosen:
        context, ending = _split_words(v["text"], 0.5)
        distractors = []
        while len(distractors) < 3:
            candidate = rng.choice(endings)
            if candidate != ending and candidate not in distractors:
                distractors.append(candidate)
        gold = rng.randrange(4)
        choices = distractors[:gold] + [ending] + distractors[gold:]
        mc.append({"context": context, "choices": choices, "gold": gold, "source": v["source"]})
    docs["kjv_cloze_mc"] = mc

    # generative: continue a verse from its first 60%; the answer is the rest of the verse
    pool = [v for v in verses if 12 <= len(v["text"].split()) <= 40]
    complete = []
    for v in rng.sample(pool, COMPLETE_ITEMS):
        prompt, target = _split_words(v["text"], 0.6)
        complete.append({"prompt": prompt, "target": target, "source": v["source"]})
    docs["kjv_complete"] = complete
    return docs


def write_tasks(out_dir: Path = DEFAULT_DIR, seed: int = SEED) -> dict[str, Path]:
    """Write <task>.jsonl for every local task into out_dir (the YAMLs live there already)."""
    from .files import new_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in build_docs(seed).items():
        path = out_dir / f"{name}.jsonl"
        with new_file(path) as tmp, tmp.open("w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        written[name] = path
    return written


if __name__ == "__main__":
    for task, path in write_tasks(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR).items():
        print(f"{task}: {path} ({sum(1 for _ in path.open())} documents, {path.stat().st_size / 1024:.0f} KiB)")
