"""Bridges: section inputs predicted from what a section may read (stagcli/bridge.py, section_input.py)."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, tiny_hf_model, tiny_tokenizer
from stagcli.cli import app
from stagcli.convert import convert_model, load_model
from stagcli.layout import Layout

runner = CliRunner()
WORDS = "and the lord spake unto moses saying speak unto the children of israel that they go forward".split()


@pytest.fixture(autouse=True)
def _private_cache(private_cache):
    pass


def test_ridge_fit_is_the_least_squares_optimum(corpus):
    """On the calibration text, the fitted map has a lower bridge error than the zero input, than the
    lagged input, and than the same map nudged in any of a few random directions."""
    from stagcli.bridge import calibration_ids, fit_ridge
    hf = tiny_hf_model("llama", layers=4)
    ids = calibration_ids([str(corpus)], tiny_tokenizer(), 4096, seq_len=64)
    model = fit_ridge(convert_model(hf, Layout(sections=2, bridge="ridge")), ids, lam=1e-6)
    with torch.no_grad():
        fitted = model.bridge_errors(ids).item()
        for init in ("zero", "lagged"):
            assert convert_model(hf, Layout(sections=2, init=init)).bridge_errors(ids).item() > fitted
        weight = model.section_input.linear.weight
        for seed in range(3):
            nudge = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)) * 1e-2 * weight.std()
            weight.add_(nudge)
            assert model.bridge_errors(ids).item() > fitted
            weight.sub_(nudge)
    assert fitted < 0.5  # most of the missing input is predictable here


@pytest.mark.parametrize("bridge, learned_output", [("mlp", "down"), ("attn", "out")])
def test_convert_with_a_bridge_writes_a_loadable_fitted_model(src, corpus, tmp_path, bridge, learned_output):
    out = tmp_path / "bridged"
    result = runner.invoke(app, ["convert", str(src), str(out), "--sections", "2", "--bridge", bridge,
                                 "--calibrate", str(corpus), "--calibrate-tokens", "2000"])
    assert result.exit_code == 0, result.output
    assert f"{bridge} bridge" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["section_input"] == bridge and config["exact_first"]
    assert config["stag_recipe"]["calibrate"] == [str(corpus)]
    model, _ = load_model(str(out))
    assert not torch.equal(model.section_input.feature_scale, torch.ones_like(model.section_input.feature_scale))
    # the learned part's output starts at zero: converted, the bridge is the fitted ridge map
    assert getattr(model.section_input, learned_output).weight.abs().max() == 0
    ids = torch.randint(3, VOCAB, (2, 9))
    from transformers import AutoModelForCausalLM
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("args, fragment", [
    (["--bridge", "ridge"], "give --calibrate"),
    (["--calibrate", "{corpus}"], "give --bridge"),
    (["--bridge", "ridge", "--mode", "shared", "--calibrate", "{corpus}"], "--bridge applies to --mode split"),
    (["--bridge", "ridge", "--sections", "1", "--calibrate", "{corpus}"], "--bridge applies to --mode split"),
    (["--bridge", "ridge", "--init", "lagged", "--calibrate", "{corpus}"], "--bridge replaces --init"),
    (["--bridge", "ridge", "--calibrate", "{tmp}/none.txt"], "data not found"),
    (["--bridge", "ridge", "--calibrate", "{short}", "--calibrate-tokens", "64"], "fewer than 256 tokens"),
])
def test_bridge_errors_are_one_line(src, corpus, tmp_path, args, fragment):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS[:8]))
    args = [a.format(corpus=corpus, tmp=tmp_path, short=short) for a in args]
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_too_few_calibration_positions_for_the_features():
    from stagcli.bridge import fit_ridge
    from stagcli.errors import StagError
    model = convert_model(tiny_hf_model("llama"), Layout(sections=2, bridge="ridge"))  # 3 x 32 features
    with pytest.raises(StagError, match="more than 97 positions"):
        fit_ridge(model, torch.randint(3, VOCAB, (1, 50)))


@pytest.mark.parametrize("bridge", ["mlp", "attn"])
def test_bridge_objective_trains_only_the_bridge_and_lowers_its_error(src, corpus, tmp_path, bridge):
    from stagcli.train import TrainConfig, finetune
    from stagcli.convert import convert
    convert(str(src), str(tmp_path / "m"), Layout(sections=2, bridge=bridge), calibrate=[str(corpus)],
            calibrate_tokens=2000)
    model, tokenizer = load_model(str(tmp_path / "m"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data=[str(corpus)], seq_len=64, batch_size=8, max_steps=20, lr=3e-4, warmup_steps=3,
                      objective="bridge", eval_every=6, eval_sequences=4)
    finetune(model, tokenizer, cfg, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert "bridge_mse" in rows[1] and rows[-1]["bridge_mse"] < rows[1]["bridge_mse"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("section_input.") for k in changed)
    assert not {"section_input.feature_scale", "section_input.linear.weight"} & changed  # fitted in closed form


def test_train_bridge_needs_a_bridge(corpus, tmp_path):
    from stagcli.errors import StagError
    from stagcli.train import TrainConfig, finetune
    model = convert_model(tiny_hf_model("llama"), Layout(sections=2))
    with pytest.raises(StagError, match="no learned bridge"):
        finetune(model, tiny_tokenizer(), TrainConfig(data=[str(corpus)], objective="bridge"), tmp_path / "o")


def test_bridge_from_copies_a_trained_bridge_into_a_verified_model(src, corpus, tmp_path):
    """A bridge trained on a split conversion serves a verified conversion of the same source; a
    checkpoint whose bridge does not fit is refused in one line, nothing written."""
    from stagcli.convert import convert
    convert(str(src), str(tmp_path / "split"), Layout(sections=2, bridge="mlp"), calibrate=[str(corpus)],
            calibrate_tokens=2000)
    split, _ = load_model(str(tmp_path / "split"))
    with torch.no_grad():
        split.section_input.down.weight.normal_()  # as if trained
    split.save_pretrained(tmp_path / "split")
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "verify"), "--mode", "verify", "--bridge", "mlp",
                                 "--bridge-from", str(tmp_path / "split")])
    assert result.exit_code == 0, result.output
    verify, _ = load_model(str(tmp_path / "verify"))
    assert verify.config.verified
    for name, value in split.section_input.state_dict().items():
        assert torch.equal(verify.section_input.state_dict()[name], value), name
    for args, fragment in ((["--bridge", "ridge"], "section_input mlp (need ridge)"),
                           (["--bridge", "mlp", "--calibrate", str(corpus)], "not both"),
                           ([], "give --bridge")):
        result = runner.invoke(app, ["convert", str(src), str(tmp_path / "bad"), "--mode", "verify",
                                     "--bridge-from", str(tmp_path / "split"), *args])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert not (tmp_path / "bad").exists()


def test_self_text_is_keyed_by_the_sources_weights_not_the_staggering_fields():
    """The source's own samples are cached under a fingerprint of the 1-section model: a new conversion
    option must not resample them, a changed weight must."""
    from stagcli.bridge import source_fingerprint, self_text
    hf = tiny_hf_model("llama")
    source = convert_model(hf, Layout(sections=1))
    again = convert_model(hf, Layout(sections=1))
    again.config.bridge_depth, again.config.stag_recipe = 3, {"note": "a field the sampler never reads"}
    assert source_fingerprint(again) == source_fingerprint(source)
    with torch.no_grad():
        again.embed.weight[5, 0] += 1e-3
    assert source_fingerprint(again) != source_fingerprint(source)
    with pytest.raises(ValueError, match="1-section"):
        self_text(convert_model(hf, Layout(sections=2, bridge="ridge")), tiny_tokenizer(), "self:64")
