"""The decode engine: greedy tokens equal the full forward's argmax for every variant; the p=1
path equals transformers' own greedy generate; padding, sampling and multi-rank decoding."""
import pytest
import torch

from conftest import VOCAB, tiny_hf_model
from stagcli.layout import Layout
from stagcli.convert import convert_model
from stagcli.decode import full_forward_greedy, generate, left_pad
from stagcli.errors import StagError
from test_model import VARIANTS, staggered


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_engine_equals_full_forward_argmax(family, variant):
    model = staggered(family, variant)
    prompt = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, prompt, max_new_tokens=10), full_forward_greedy(model, prompt, 10))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_unconverted_path_equals_transformers_generate(family):
    hf = tiny_hf_model(family)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                      do_sample=False, pad_token_id=0)[:, prompt.shape[1]:]
    assert torch.equal(generate(convert_model(hf), prompt, max_new_tokens=12), ref)


def test_left_padded_batch_equals_rows_alone():
    model = staggered("llama", "split2-lagged")
    rows = [[5, 9, 11, 4, 7, 30], [8, 3], [40, 41, 42, 43]]
    ids, mask = left_pad(rows)
    batched = generate(model, ids, mask, max_new_tokens=8)
    for b, row in enumerate(rows):
        assert torch.equal(batched[b], generate(model, torch.tensor([row]), max_new_tokens=8)[0])


def test_recurrent_generation_runs_and_differs_from_exact():
    model = staggered("llama", "shared2")
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    recurrent = generate(model, prompt, max_new_tokens=12, recurrent=True)
    assert recurrent.shape == (2, 12)
    with pytest.raises(StagError):
        generate(staggered("llama", "split2"), prompt, max_new_tokens=2, recurrent=True)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = staggered("qwen2", "split2")
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    a = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, max_new_tokens=10)
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=0.7, top_k=1, seed=5), greedy)


def test_eos_stops_rows_and_pads():
    model = staggered("llama", "p1")
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, max_new_tokens=6)[0]
    eos = int(free[2])
    first = free.tolist().index(eos)
    stopped = generate(model, prompt, max_new_tokens=6, eos_token_id=eos)[0]
    assert stopped.tolist() == free.tolist()[:first + 1]  # stops right after the first EOS


@pytest.mark.parametrize("variant, sampling", [
    ("split2-lagged", {}),                                            # greedy, left-padded rows
    ("shared2", dict(temperature=1.0, top_k=20, top_p=0.95, seed=3)),  # seeded sampling
    ("split2-parallel", {}),                                          # widened qkv / o, narrowed per rank
])
def test_one_rank_per_section_equals_single_process(variant, sampling):
    """torch.distributed with gloo on CPU: section r in process r, sections running concurrently."""
    from stagcli.decode_ranks import generate_on_devices
    model = staggered("llama", variant)
    ids, mask = left_pad([[5, 9, 11, 4, 7], [8, 3]])
    single = generate(model, ids, mask, max_new_tokens=8, **sampling)
    ranks = generate_on_devices(model, ids, mask, max_new_tokens=8, devices=["cpu", "cpu"], timeout_s=120,
                                **sampling)
    assert torch.equal(ranks, single)


def test_multi_device_decoding_checks_the_request_first():
    """The same checks as one process (decode.check_request), before any rank is started."""
    from stagcli.decode_ranks import generate_on_devices
    from stagcli.errors import StagError
    model = staggered("llama", "split2-lagged")
    ids = torch.randint(3, VOCAB, (1, 4))
    limit = model.config.max_positions
    for kwargs, message in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=limit), "context"),
                            (dict(max_new_tokens=4, top_p=0.0), "top")]:
        with pytest.raises(StagError, match=message):
            generate_on_devices(model, ids, devices=["cpu", "cpu"], **kwargs)


def test_recurrent_greedy_equals_uncached_reference():
    """Recurrent approximation without caches: memory slot k holds pass 1's output for prompt
    positions and pass 2's own output for generated ones; the whole prefix is recomputed each step."""
    model = staggered("llama", "shared2")
    pass1 = convert_model(tiny_hf_model("llama"), Layout(sections=1))  # pass 1 of shared2 = the source model
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        memory, ids = pass1.run_sections(prompt), prompt
        for _ in range(8):
            t = ids.shape[1] - 1
            slots = torch.cat([memory, memory.new_zeros(memory.shape[0], t + 1 - memory.shape[1], memory.shape[2])], 1)
            hidden = model.run_sections(ids, memory_override=slots)  # slot t itself is never read at t
            if t >= prompt.shape[1]:
                memory = torch.cat([memory, hidden[:, t:t + 1]], 1)
            ids = torch.cat([ids, model.logits(hidden[:, t]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(generate(model, prompt, max_new_tokens=8, recurrent=True), ids[:, prompt.shape[1]:])


@pytest.mark.parametrize("variant", ["split2-lagged", "shared2-parallel"])
def test_decode_step_traces_as_one_graph(variant):
    """What torch.compile and CUDA-graph capture need on the GPU: the step is one graph with no
    graph breaks (no host syncs, no data-dependent python). Checked with dynamo on CPU."""
    from stagcli.decode import DecodeEngine
    model = staggered("llama", variant)
    engine = DecodeEngine(model, 2, 16)
    engine.prefill(torch.randint(0, VOCAB, (2, 5)))
    engine.cache.claim(1)
    with torch.no_grad():
        explained = torch._dynamo.explain(model.decode_step)(torch.tensor([3, 4]), engine.cache, False,
                                                             engine.memory_kv)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_attention_takes_a_non_contiguous_kernel_output(monkeypatch):
    """Found on an H100: CUDA's memory-efficient SDPA kernel returns its output in a transposed
    layout, which a .view() of the result cannot take (an fp32 verify prefill crashed). Simulated
    here with a kernel that returns the same values in that layout."""
    import torch.nn.functional as F

    from stagcli import layers
    sdpa = F.scaled_dot_product_attention

    def transposed(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    model = staggered("llama", "split2-lagged")
    ids = torch.randint(0, VOCAB, (2, 7))
    expected = model(ids).logits
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", transposed)
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_compiling_many_engines_in_one_process_is_allowed():
    """Found on an H100: scripts/gpu_decode.py compiled the decode step for 9 (model, batch) pairs
    and hit dynamo's recompile limit of 8 (fullgraph=True makes that an error)."""
    from stagcli.decode import allow_recompiles
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    allow_recompiles()
    assert getattr(config, name) >= 64
