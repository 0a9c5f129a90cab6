"""`stag generate` and `stag bench` on tiny checkpoints (CPU; timings are not asserted)."""
import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_tokenizer
from stagcli.cli import app

runner = CliRunner()


@pytest.fixture
def tiny_pair(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    tiny_tokenizer(src)
    out = tmp_path / "stag"
    assert runner.invoke(app, ["convert", str(src), str(out), "--sections", "2"]).exit_code == 0
    return src, out


def test_generate_streams_and_reports(tiny_pair):
    _, model = tiny_pair
    result = runner.invoke(app, ["generate", str(model), "--prompt", "in the beginning", "-n", "8"])
    assert result.exit_code == 0, result.output
    assert "time to first token" in result.output and "tokens/s" in result.output
    assert "2 section(s)" in result.output


def test_generate_batch_and_sampling(tiny_pair):
    _, model = tiny_pair
    args = ["generate", str(model), "-p", "abc", "-p", "a longer prompt", "-n", "5", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "1"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    strip = lambda out: out.split("time to first token")[0]
    assert strip(first.output).split("\n")[:2] == strip(second.output).split("\n")[:2]


def test_generate_errors(tiny_pair):
    _, model = tiny_pair
    result = runner.invoke(app, ["generate", str(model), "-p", "x", "--chat"])
    assert result.exit_code == 2 and "chat template" in result.output
    result = runner.invoke(app, ["generate", str(model), "-p", "x", "--recurrent"])
    assert result.exit_code == 2 and "shared" in result.output


def test_bench_writes_json_with_all_systems(tiny_pair, tmp_path):
    src, model = tiny_pair
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(model), "--baseline", str(src), "--batch-sizes", "1,2",
                                 "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    names = {(r["name"], r["batch_size"]) for r in data["rows"]}
    assert names == {(n, b) for n in ("staggered", "baseline (same engine)", "baseline (HF static generate)")
                     for b in (1, 2)}
    for row in data["rows"]:
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0 and row["bandwidth_GBps"] > 0
        assert len(row["runs_ms_per_token"]) == 2
        if row["name"] != "baseline (HF static generate)":
            assert row["ops_per_step"]["heavy"] > 0 and row["ops_per_step"]["other"] > 0
    assert data["machine"] and data["baseline"] == str(src)
    assert "stag bench" in result.output and "staggered" in result.output


def test_bench_bad_batch_sizes(tiny_pair):
    _, model = tiny_pair
    result = runner.invoke(app, ["bench", str(model), "--batch-sizes", "one"])
    assert result.exit_code == 2 and "--batch-sizes" in result.output


def test_decode_op_counts_rank_the_forms():
    """One decode step's GEMM + attention count: the parallel form needs fewer than the paper's
    sequential sublayer, and a 2-section split fewer than the unconverted model (half the depth)."""
    from conftest import tiny_hf_model
    from stagcli.bench import count_decode_ops
    from stagcli.layout import Layout
    from stagcli.convert import convert_model
    hf = tiny_hf_model("llama", layers=4)
    heavy = {name: count_decode_ops(convert_model(hf, Layout(**kw)))["heavy"] for name, kw in {
        "base": dict(sections=1), "split2": dict(sections=2),
        "split2-parallel": dict(sections=2, cross_attn="parallel"), "shared2": dict(sections=2, mode="shared"),
        "shared2-parallel": dict(sections=2, mode="shared", cross_attn="parallel")}.items()}
    assert heavy["split2-parallel"] < heavy["split2"] < heavy["base"]
    assert heavy["base"] < heavy["shared2-parallel"] < heavy["shared2"]


def test_verified_op_counts_include_the_bridge():
    """One greedy verified step runs half the source's depth (both halves batched per depth index), so
    fewer GEMM + attention calls than a source step; a learned bridge's own layers show in the count."""
    from conftest import tiny_hf_model
    from stagcli.bench import count_decode_ops, count_verified_ops
    from stagcli.convert import convert_model
    from stagcli.layout import Layout
    hf = tiny_hf_model("llama", layers=4)
    base = count_decode_ops(convert_model(hf, Layout(sections=1)))["heavy"]
    heavy = {b: count_verified_ops(convert_model(hf, Layout(sections=2, mode="verify", bridge=b)))["heavy"]
             for b in ("ridge", "mlp", "attn")}
    assert heavy["ridge"] < heavy["mlp"] < heavy["attn"]
    assert heavy["ridge"] < base
