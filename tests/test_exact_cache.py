"""Exact-cache staggering (--mode exact-cache): the verify layout, every draft emitted unverified.
Its full-sequence forward must equal its decode, and only position i's own input may be predicted."""
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, tiny_hf_model
from stagcli.convert import convert_model
from stagcli.decode import generate, left_pad
from stagcli.layout import Layout
from test_verify import hf_greedy, verified

runner = CliRunner()


def exact_cache(hf, bridge="ridge", fit=True, depth=0):
    model = verified(hf, bridge, fit, depth)
    model.config.exact_cache = True  # the same weights as the verify model: only the output rule differs
    return model


def reference_row(model, hf, ids, i):
    """The output at position i, computed naively: section 2 over positions 0..i, reading the source's
    residual stream after L/2 layers before i and the bridge's prediction at i (the definition, no
    2T-row mask). The bridge reads the source's residual after bridge_depth layers (the embedding at 0)."""
    with torch.no_grad():
        states = hf(ids[:, :i + 1], output_hidden_states=True).hidden_states
    exact, view = states[model.config.depth], states[model.config.bridge_depth]
    shift = lambda t: torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], 1)
    place = model.place(ids[:, :i + 1])
    draft = model.section_inputs(view, shift(view), shift(exact)[None], shift(place.valid), slice(1, 2), place)[0]
    x = torch.cat([exact[:, :i], draft[:, i:]], 1) if i > 0 else exact
    return model.logits(model.run_blocks(x[None], slice(1, 2), place, cross=False)[0][:, -1])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("bridge, depth", [("ridge", 0), ("attn", 0), ("ridge", 2), ("attn", 1)])
def test_forward_is_the_definition(family, bridge, depth):
    hf = tiny_hf_model(family, layers=6)
    model = exact_cache(hf, bridge, depth=depth).eval()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
        for i in (0, 1, 4, 9):
            assert (logits[:, i] - reference_row(model, hf, ids, i)).abs().max().item() < 1e-4, i
        source = hf(ids).logits
    assert (logits[:, 0] - source[:, 0]).abs().max().item() < 1e-4  # position 0 reads u_0: the source's
    assert (logits[:, 1:] - source[:, 1:]).abs().max().item() > 1e-3  # later positions are drafts


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bridge, fit, depth", [("ridge", True, 0), ("attn", True, 0), ("mlp", False, 0),
                                                ("ridge", True, 1), ("attn", True, 2)])
def test_cached_steps_equal_the_forward(family, bridge, fit, depth):
    """Teacher-forced decode steps on left-padded rows give the full forward's logits at every new
    position; greedy generation emits their argmax (the prompt's last position is exact in decoding:
    the prefill runs the source). At bridge depth k > 0 section 2 starts k layers late."""
    from stagcli.verify import VerifiedEngine
    hf = tiny_hf_model(family, layers=6 if depth else 4)
    model = exact_cache(hf, bridge, fit, depth).eval()
    ids, mask = left_pad([[5, 9, 11, 4, 7, 30], [8, 3], [40, 41, 42, 43]])
    forced = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    engine = VerifiedEngine(model, 3, ids.shape[1] + forced.shape[1] + 2)
    _, count = engine.prefill(ids, mask)
    prev, u_prev, steps = ids[:, -1], engine.cache.last_out[0].clone(), []
    for k in range(forced.shape[1]):
        pos = count + k
        logits, u_rows = engine.step(torch.stack([prev, forced[:, k]], 1), torch.stack([pos - 1, pos], 1), u_prev)
        steps.append(logits[:, 1])
        prev, u_prev = forced[:, k], u_rows[:, 1]
    with torch.no_grad():
        full = model(torch.cat([ids, forced], 1), attention_mask=torch.cat([mask, torch.ones_like(forced)], 1)).logits
    assert (full[:, ids.shape[1]:] - torch.stack(steps, 1)).abs().max().item() < 1e-4

    out = generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(out[:, 0], hf_greedy(hf, ids, 1, mask)[:, 0])
    with torch.no_grad():
        logits = model(torch.cat([ids, out], 1), attention_mask=torch.cat([mask, torch.ones_like(out)], 1)).logits
    assert torch.equal(logits[:, ids.shape[1]:-1].argmax(-1), out[:, 1:])


@pytest.mark.parametrize("depth", [0, 1])
def test_sampling_is_seeded_and_every_draft_is_accepted(depth):
    from stagcli.verify import generate_verified
    model = exact_cache(tiny_hf_model("qwen2", layers=6 if depth else 4), depth=depth)
    prompt = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    run = lambda seed: generate_verified(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
    (a, stats), (b, _), (c, _) = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one token per step, after a first step that only drafts (the prefill's token is known)
    assert stats.acceptance == 1.0 and stats.steps == 8 and stats.emitted == [8, 8]


@pytest.mark.parametrize("depth", [0, 2])
def test_training_reaches_the_bridge_and_both_row_kinds(depth):
    model = exact_cache(tiny_hf_model("llama", layers=6), "attn", depth=depth)
    ids = torch.randint(3, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert model.section_input.out.weight.grad.abs().sum() > 0
    assert model.blocks[0].qkv.weight.grad[1].abs().sum() > 0  # section 2's layers (exact and draft rows)
    assert model.blocks[0].qkv.weight.grad[0].abs().sum() > 0  # section 1's, through the exact rows and the bridge
    assert model.blocks[2].qkv.weight.grad[0].abs().sum() > 0  # its last layer: through the exact rows only


def test_cli_convert_generate_bench(tmp_path, src, corpus):
    from stagcli.cli import app
    out = tmp_path / "ec"
    result = runner.invoke(app, ["convert", str(src), str(out), "--mode", "exact-cache", "--bridge", "ridge",
                                 "--calibrate", str(corpus), "--calibrate-tokens", "2000"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", str(out), "-p", "and the lord", "-n", "6"])
    assert result.exit_code == 0 and "exact-cache" in result.output, result.output
    result = runner.invoke(app, ["bench", str(out), "--baseline", str(src), "--batch-sizes", "1", "--prompt-len", "8",
                                 "--new-tokens", "4", "--repeats", "1", "--no-hf", "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["acceptance"] for r in rows if r["system"] == "stag exact-cache"] == [1.0]
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "bad"), "--mode", "exact-cache"])
    assert result.exit_code == 2 and "--mode exact-cache takes --sections 2" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_deeper_view_fits_a_better_ridge_bridge():
    """The ridge fit reads section 1's state after bridge_depth layers: closer to the target (the state
    after L/2 layers) than the embedding, so its error on held-out text is lower."""
    hf = tiny_hf_model("llama", layers=6)
    held_out = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(9))
    errors = [exact_cache(hf, depth=k).bridge_errors(held_out).item() for k in (0, 2)]
    assert errors[1] < 0.8 * errors[0], errors


def test_bridge_depth_errors(tmp_path, src, corpus):
    from stagcli.cli import app
    from stagcli.decode_ranks import generate_on_devices
    from stagcli.errors import StagError
    Layout(sections=1).validate(1)  # the range applies to a depth that is set: a 1-layer source converts
    with pytest.raises(StagError, match="one process"):  # the multi-process engine decodes split models only
        generate_on_devices(exact_cache(tiny_hf_model("llama")), torch.tensor([[5, 6]]), devices=["cpu", "cpu"])
    for args, message in [(["--mode", "split", "--bridge-depth", "1"], "--bridge-depth applies to --mode verify"),
                          (["--mode", "exact-cache", "--bridge-depth", "2"], "--bridge-depth must be in 0..1")]:
        result = runner.invoke(app, ["convert", str(src), str(tmp_path / "bad"), "--bridge", "ridge", "--calibrate",
                                     str(corpus), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad").exists()
    donor = tmp_path / "donor"
    result = runner.invoke(app, ["convert", str(src), str(donor), "--mode", "exact-cache", "--bridge", "ridge",
                                 "--bridge-depth", "1", "--calibrate", str(corpus), "--calibrate-tokens", "2000"])
    assert result.exit_code == 0 and json.loads((donor / "config.json").read_text())["bridge_depth"] == 1
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "bad"), "--mode", "exact-cache", "--bridge",
                                 "ridge", "--bridge-from", str(donor)])
    assert result.exit_code == 2 and "bridge_depth 1 (need 0)" in result.output, result.output


def test_layout_fields():
    fields = Layout(sections=2, mode="exact-cache", bridge="attn").config_fields()
    assert fields["verified"] and fields["exact_cache"] and fields["cross_attn"] == "none"
    assert not Layout(sections=2, mode="verify", bridge="attn").config_fields()["exact_cache"]
    assert convert_model(tiny_hf_model("llama"), Layout(sections=2, mode="exact-cache", bridge="ridge")).config.exact_cache
