"""The backbone: every variant's full-sequence forward equals its cached step-by-step decode."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, tiny_hf_model
from stagcli.layout import Layout
from stagcli.convert import convert_model
from stagcli.model import StagConfig, StagForCausalLM

VARIANTS = {
    "p1": dict(sections=1),
    "split2": dict(sections=2),
    "split2-lagged": dict(sections=2, init="lagged"),
    "split2-window1": dict(sections=2, window=1),
    "split4-window3": dict(sections=4, window=3),
    "shared2": dict(sections=2, mode="shared"),
    "shared2-window2": dict(sections=2, mode="shared", window=2),
    "shared3": dict(sections=3, mode="shared"),
    "split2-parallel": dict(sections=2, cross_attn="parallel"),
    "split4-parallel-window2": dict(sections=4, cross_attn="parallel", window=2),
    "shared2-parallel": dict(sections=2, mode="shared", cross_attn="parallel"),
    "split2-ridge": dict(sections=2, bridge="ridge"),
    "split2-mlp-parallel": dict(sections=2, bridge="mlp", cross_attn="parallel"),
    "split4-mlp-window2": dict(sections=4, bridge="mlp", window=2),
    "split2-attn": dict(sections=2, bridge="attn"),
    "split4-attn-parallel": dict(sections=4, bridge="attn", cross_attn="parallel"),
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral-window", "gpt2"]


def staggered(family, variant, seed=0):
    """A converted tiny model whose cross-attention is switched on (random output projection), so
    that the tests see the cross-attention path and not a zero."""
    model = convert_model(tiny_hf_model(family, seed=seed), Layout(**VARIANTS[variant]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cross.o." in name or "mem_norm" in name or ".cross.k_norm" in name or ".cross.q_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            if name.startswith("section_input."):  # a bridge: its MLP output starts at zero too
                p.add_(torch.randn_like(p) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("feature_scale"):
                buffer.uniform_(0.5, 2.0)
        if model.config.cross_attn == "parallel":  # o's columns for the cross heads start at zero too
            for block in model.blocks:
                cross_columns = block.o.weight[:, :, block.heads * model.config.head_dim:]
                cross_columns.add_(torch.randn_like(cross_columns) * 0.2)
    return model


def decode_logits(model, ids, prompt_len, mask=None, recurrent=False, fused_memory=False):
    """Prefill the prompt, then feed the remaining tokens one step at a time. fused_memory: every
    depth's memory K/V from one GEMM (memory_kv_weights), as the decode engine does."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
    memory_kv = model.memory_kv_weights() if fused_memory else None
    logits = [model.prefill(ids[:, :prompt_len], cache, None if mask is None else mask[:, :prompt_len])]
    for t in range(prompt_len, ids.shape[1]):
        logits.append(model.step(ids[:, t], cache, recurrent=recurrent, memory_kv=memory_kv))
    return torch.stack(logits, 1)  # logits after positions prompt_len-1 .. T-1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_equals_cached_decode(family, variant):
    model = staggered(family, variant)
    ids = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    for prompt_len in (1, 6):
        dec = decode_logits(model, ids, prompt_len)
        assert (dec - full[:, prompt_len - 1:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["split2", "split4-window3", "shared3", "split4-parallel-window2"])
def test_fused_memory_kv_equals_per_depth(family, variant):
    """The decode engine's one-GEMM memory K/V (with Qwen3's per-depth key norms) = the plain path."""
    model = staggered(family, variant)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    assert (decode_logits(model, ids, 4, fused_memory=True) - full[:, 3:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["split2", "split2-lagged", "shared2-window2", "split2-attn"])
def test_left_padded_batch_decodes_like_each_row_alone(variant):
    model = staggered("llama", variant)
    rows = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    cache = model.new_cache(len(rows), width + 4)
    padded = [model.prefill(ids, cache, mask)]
    extra = torch.randint(0, VOCAB, (len(rows), 3), generator=torch.Generator().manual_seed(7))
    for t in range(3):
        padded.append(model.step(extra[:, t], cache))
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, extra[b]])[None]).logits[0, len(r) - 1:]
        assert (torch.stack([p[b] for p in padded]) - alone).abs().max().item() < 1e-4


def test_causality_and_staggering():
    """Changing token i never changes logits before i; section 2 reads section 1 only at < i, so
    with window=1 the logits at i depend on tokens i and i-1 only through section 1's output at i-1."""
    model = staggered("llama", "split2")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_split_model_differs_from_source_until_trained():
    """Sanity for the equivalence tests above: a split conversion really changes the function."""
    hf = tiny_hf_model("llama")
    ids = torch.randint(0, VOCAB, (2, 8))
    assert (convert_model(hf, Layout(sections=2))(ids).logits - hf(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["shared2", "shared2-parallel"])
def test_recurrent_decode_matches_uncached_reference(variant):
    """Recurrent approximation (shared p=2): generated positions skip pass 1, and pass 2 reads its
    OWN earlier outputs as memory. Reference without caches: memory slot k holds pass 1's output
    for prompt positions and pass 2's output for generated ones; recompute the prefix each step."""
    hf = tiny_hf_model("llama")
    model = staggered("llama", variant)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    prompt_len = 4
    dec = decode_logits(model, ids, prompt_len, recurrent=True)
    with torch.no_grad():
        memory = convert_model(hf, Layout(sections=1)).run_sections(ids[:, :prompt_len])  # = pass-1 outputs
        reference = []
        for t in range(prompt_len - 1, ids.shape[1]):
            slots = memory[:, :t + 1] if memory.shape[1] > t else torch.cat(
                [memory, memory.new_zeros(memory.shape[0], t + 1 - memory.shape[1], memory.shape[2])], 1)
            hidden = model.run_sections(ids[:, :t + 1], memory_override=slots)  # slot t itself is never read
            reference.append(model.logits(hidden[:, t]))
            if t >= prompt_len:
                memory = torch.cat([memory, hidden[:, t:t + 1]], 1)
    assert (dec - torch.stack(reference, 1)).abs().max().item() < 1e-4
    two_pass = model(ids).logits[:, prompt_len - 1:]
    assert (dec - two_pass).abs().max().item() > 1e-4  # an approximation, not the two-pass model


def test_no_nan_with_empty_memory_rows():
    model = staggered("gpt2", "split2-window1")
    logits = model(torch.randint(0, VOCAB, (2, 5))).logits
    assert torch.isfinite(logits).all()


def test_save_and_load_roundtrip(tmp_path):
    model = staggered("qwen2", "split4-window3")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, StagForCausalLM)
    assert (loaded.config.sections, loaded.config.window, loaded.config.shared) == (4, 3, False)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_from_scratch_model_trains_one_step():
    cfg = StagConfig(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, sections=2)
    model = StagForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    ids = torch.randint(0, VOCAB, (2, 16))
    out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual)
    out.loss.backward()
    assert model.blocks[0].cross.o.weight.grad.abs().sum() > 0  # zero-initialised but trainable


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_position_zero_reads_the_section_below(family):
    """A split conversion's section 2 reads section 1's output at a prompt's first position (never a
    decode step), so there, with the cross-attention still at zero, it computes the source's logits
    exactly, left padding included."""
    hf = tiny_hf_model(family)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 starts at slot 3
    for variant in ("split2", "split4-mlp-window2"):
        model = convert_model(hf, Layout(**VARIANTS[variant]))
        assert model.config.exact_first
        ours = model(ids, attention_mask=mask).logits
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        assert (ours[0, 0] - ref[0, 0]).abs().max() < 1e-4 and (ours[1, 3] - ref[1, 3]).abs().max() < 1e-4
        assert (ours[0, 1:] - ref[0, 1:]).abs().max() > 1e-3  # later positions lost their input


@pytest.mark.parametrize("sets, rows", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 9)])  # 9 > FEW_ROWS: plain path
def test_stacked_linear_few_row_path_equals_the_plain_product(sets, rows):
    """Decode steps on CPU take weight @ rows^T (few_row_matmul); same numbers as the plain product,
    for one or several weight sets, a single (doubled) row, and past the few-row limit."""
    from stagcli.layers import StackedLinear, few_row_logits
    layer = StackedLinear(sets, 16, 24, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(sets, rows, 16)
    want = torch.einsum("sri,soi->sro", x, layer.weight) + layer.bias[:, None]
    with torch.no_grad():
        assert torch.allclose(layer(x, slice(0, sets)), want, atol=1e-5)
        head = torch.randn(50, 16)
        assert torch.allclose(few_row_logits(x[0], head), x[0] @ head.T, atol=1e-5)
