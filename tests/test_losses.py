"""The fused, chunked head loss equals the plain one; the compiled chunk equals eager ops; bf16
training follows fp32 training."""
import pytest
import torch
import torch.nn.functional as F

from stagcli.losses import IGNORE, _chunk_math, distill_kl, fused_head_loss


def reference(h, W, y, th, tW, lm_w, kl_w, T):
    logits = h @ W.T
    ce = F.cross_entropy(logits, y, ignore_index=IGNORE)
    ok = y != IGNORE
    s, t = (logits / T).log_softmax(-1), ((th @ tW.T) / T).log_softmax(-1)
    kl = ((t.exp() * (t - s)).sum(-1) * ok).sum() / ok.sum() * T * T
    return lm_w * ce + kl_w * kl, ce, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_chunked_loss_equals_the_full_logits_loss(temperature, chunk):
    torch.manual_seed(0)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, requires_grad=True)
    W = torch.randn(V, d, requires_grad=True)
    y = torch.randint(0, V, (N,))
    y[[3, 20]] = IGNORE
    th, tW = torch.randn(N, d), torch.randn(V, d)
    total, lm, kl = fused_head_loss(h, W, y, th, tW, 0.3, 0.7, temperature, chunk=chunk)
    ref_total, ref_lm, ref_kl = reference(h, W, y, th, tW, 0.3, 0.7, temperature)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)
    assert (lm.item(), kl.item()) == (pytest.approx(ref_lm.item(), rel=1e-5), pytest.approx(ref_kl.item(), rel=1e-5))
    for ours, theirs in zip(torch.autograd.grad(total, [h, W]), torch.autograd.grad(ref_total, [h, W])):
        assert (ours - theirs).abs().max().item() < 1e-5


def test_distill_kl_reference_agrees_with_the_fused_loss():
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    W = torch.eye(11)
    _, _, kl = fused_head_loss(s[:, :-1].flatten(0, 1), W, ids[:, 1:].flatten(), t[:, :-1].flatten(0, 1), W,
                               0.0, 1.0, 1.5)
    assert kl.item() == pytest.approx(distill_kl(s, t, 1.5).item(), rel=1e-5)


def test_compiled_chunk_equals_eager_ops():
    """What big vocabularies run (torch.compile of the elementwise chunk work) = the eager ops."""
    torch.manual_seed(2)
    n, V = 16, 8192
    s, t = torch.randn(n, V) * 3, torch.randn(n, V) * 3
    y = torch.randint(0, V, (n,))
    scale = torch.full((n,), 1 / n)
    eager = _chunk_math(s, t, y, scale, 0.5, 0.5, 1.0)
    compiled = torch.compile(_chunk_math, dynamic=False)(s, t, y, scale, 0.5, 0.5, 1.0)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max().item() < 1e-5 * max(1.0, a.abs().max().item())


def test_bf16_training_follows_fp32(tmp_path):
    """The same 4 steps in bf16 mixed precision and in fp32: losses within 2% (bf16 keeps 8 bits of
    mantissa in the matmuls; master weights and optimizer state stay fp32)."""
    import random

    from conftest import tiny_hf_model, tiny_tokenizer
    from stagcli.convert import convert_model
    from stagcli.layout import Layout
    from stagcli.train import TrainConfig, finetune
    rng = random.Random(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice("abc de fgh ij klm".split()) for _ in range(12)) for _ in range(200)))
    losses = {}
    for precision in ("fp32", "bf16"):
        model = convert_model(tiny_hf_model("llama"), Layout(sections=2))
        teacher = convert_model(tiny_hf_model("llama", seed=1))
        cfg = TrainConfig(data=[str(corpus)], seq_len=32, batch_size=4, max_steps=4, lr=3e-3, eval_every=2,
                          eval_sequences=4, precision=precision, distill_alpha=0.5)
        summary = finetune(model, tiny_tokenizer(), cfg, tmp_path / precision, teacher=teacher)
        assert summary["precision"] == precision
        losses[precision] = [__import__("json").loads(line) for line in (tmp_path / precision / "metrics.jsonl").open()]
    for a, b in zip(losses["fp32"], losses["bf16"]):
        for key in ("loss", "kl_loss", "heldout_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-2), (key, a["step"])
