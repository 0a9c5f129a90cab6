"""Training text -> fixed-length token sequences, tokenized once and cached.

A data source is a named corpus (`kjv:train`, see corpora.py), a file, a directory (every file
under it, recursively) or a glob; several may be given. `.jsonl` files hold one document per line
in a `text` field; any other file is one document. Documents are tokenized without special tokens,
joined with the tokenizer's end-of-sequence token and cut into `seq_len`-token sequences (the
remainder is dropped). The packed tensor is cached as safetensors under $STAG_CACHE/tokenized,
keyed by a hash of the file contents, the tokenizer and seq_len.

Held-out data: a separate source when one is given; otherwise the LAST `HELDOUT_FRACTION` of the
packed sequences (at least one), in file order, before any shuffling. Training never sees them.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpora import cache_dir, corpus_path, is_corpus_spec
from .errors import StagError
from .files import new_file

HELDOUT_FRACTION = 0.05
CACHE_FORMAT = "stag-packed-v1"  # bump when the packing rule changes, so old caches are not reused
TOKENIZE_BATCH = 256  # documents per tokenizer call


def split_specs(specs) -> list[str]:
    """Accept one string, a comma-separated string, or a list of either."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    return [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]


def resolve_sources(specs) -> list[Path]:
    """The files behind data specs, in a stable order; an error for anything missing or empty."""
    files: list[Path] = []
    for spec in split_specs(specs):
        if is_corpus_spec(spec):
            found = [corpus_path(spec)]
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and not p.name.startswith("."))
        elif Path(spec).is_file():
            found = [Path(spec)]
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        else:
            raise StagError(f"data not found: {spec} (no such file, directory, glob match or corpus)")
        if not found:
            raise StagError(f"data source {spec} matches no files")
        files.extend(found)
    if not files:
        raise StagError("no data given")
    for f in files:
        if f.stat().st_size == 0:
            raise StagError(f"data file {f} is empty")
    return list(dict.fromkeys(f.resolve() for f in files))  # no file twice


def read_documents(path: Path):
    """Yield the documents in one file: JSONL `text` fields, or the whole file as one text."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise StagError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
                if text:
                    yield str(text)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StagError(f"{path} is not UTF-8 text") from None
        if text.strip():
            yield text


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(files: list[Path], tokenizer, seq_len: int) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{seq_len}|{tokenizer_fingerprint(tokenizer)}".encode())
    for f in files:
        h.update(f"|{f.suffix}|{_file_digest(f)}".encode())
    return h.hexdigest()[:32]


def pack(files: list[Path], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize every document, join them with EOS, cut into [N, seq_len] (remainder dropped)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    batch: list[str] = []

    def flush():
        if not batch:  # the documents filled the last batch exactly
            return
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        batch.clear()

    for f in files:
        for doc in read_documents(f):
            batch.append(doc)
            if len(batch) == TOKENIZE_BATCH:
                flush()
    flush()
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def load_packed(specs, tokenizer, seq_len: int, use_cache: bool = True) -> torch.Tensor:
    """[N, seq_len] int64 token ids for the data specs, from the cache when possible."""
    if seq_len < 2:
        raise StagError(f"--seq-len must be >= 2, not {seq_len}")
    files = resolve_sources(specs)
    path = cache_dir() / "tokenized" / f"{cache_key(files, tokenizer, seq_len)}.safetensors"
    if use_cache and path.exists():
        from safetensors.torch import load_file
        return load_file(path)["input_ids"].long()
    packed = pack(files, tokenizer, seq_len)
    if packed.shape[0] == 0:
        raise StagError(f"the data ({', '.join(split_specs(specs))}) holds fewer than {seq_len} tokens: "
                        "not one full sequence; give more text or a smaller --seq-len")
    if use_cache:
        from safetensors.torch import save_file
        with new_file(path) as tmp:  # written whole, then renamed
            save_file({"input_ids": packed}, str(tmp), metadata={"seq_len": str(seq_len),
                                                                  "files": json.dumps([str(f) for f in files])})
    return packed.long()


@dataclass
class PackedData:
    train: torch.Tensor    # [N, seq_len] int64
    heldout: torch.Tensor  # [M, seq_len] int64, never trained on
    heldout_source: str    # how the held-out part was chosen, for the run record

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]


def load_balanced(specs, tokenizer, seq_len: int, use_cache: bool = True) -> torch.Tensor:
    """As load_packed, but each spec packed on its own and cut to the sequence count of the smallest
    (evenly spaced through each, so a book or a topic is not cut off whole), then joined in spec order:
    a small source weighs as much as a large one."""
    parts = [load_packed(spec, tokenizer, seq_len, use_cache) for spec in split_specs(specs)]
    n = min(len(p) for p in parts)
    return torch.cat([p[torch.linspace(0, len(p) - 1, n).round().long()] for p in parts])


def build_data(data, tokenizer, seq_len: int, heldout=None, heldout_fraction: float = HELDOUT_FRACTION,
               use_cache: bool = True, balance: bool = False) -> PackedData:
    """Training and held-out sequences; see the module docstring for the held-out rule. balance: the
    training sources in equal shares (load_balanced)."""
    load = load_balanced if balance else load_packed
    if heldout:
        overlap = set(resolve_sources(data)) & set(resolve_sources(heldout))
        if overlap:
            raise StagError(f"held-out data overlaps the training data: {sorted(map(str, overlap))[0]}")
        return PackedData(load(data, tokenizer, seq_len, use_cache),
                          load_packed(heldout, tokenizer, seq_len, use_cache), ", ".join(split_specs(heldout)))
    if not 0 < heldout_fraction < 1:
        raise StagError(f"held-out fraction must be between 0 and 1, not {heldout_fraction}")
    packed = load(data, tokenizer, seq_len, use_cache)
    n_held = max(1, math.ceil(heldout_fraction * packed.shape[0]))
    if packed.shape[0] - n_held < 1:
        raise StagError(f"the data gives only {packed.shape[0]} sequence(s) of {seq_len} tokens: too few to "
                        "hold some out; give more text, a smaller --seq-len, or --heldout")
    return PackedData(packed[:-n_held], packed[-n_held:],
                      f"last {n_held} of {packed.shape[0]} packed sequences ({heldout_fraction:.0%})")
