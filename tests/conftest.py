"""Shared fixtures: tiny (<1M parameter) random checkpoints built with transformers itself."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 97


def tiny_hf_model(family: str, layers: int = 4, tie: bool = True, seed: int = 0):
    """A random transformers model of the given family, well under 1M parameters."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    torch.manual_seed(seed)
    llama_like = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_like))
    elif family == "llama-bias":  # attention_bias=True: q, k, v and o biases
        model = LlamaForCausalLM(LlamaConfig(**llama_like, attention_bias=True))
    elif family == "qwen2":  # q, k, v biases, no o bias
        model = Qwen2ForCausalLM(Qwen2Config(**llama_like))
    elif family == "llama3-rope":  # Llama 3.1's RoPE scaling, with a context short enough to matter here
        model = LlamaForCausalLM(LlamaConfig(**llama_like, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8)))
    elif family == "linear-rope":
        model = LlamaForCausalLM(LlamaConfig(**llama_like, rope_parameters=dict(rope_type="linear", factor=2.0)))
    elif family == "qwen3":  # per-head q/k RMSNorm; head_dim not hidden/heads, as in real Qwen3
        model = Qwen3ForCausalLM(Qwen3Config(**llama_like, head_dim=16))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**llama_like, sliding_window=None))
    elif family == "mistral-window":  # Mistral 7B v0.1's sliding-window self-attention, short enough to act
        model = MistralForCausalLM(MistralConfig(**llama_like, sliding_window=4))
    elif family == "phi3":  # fused qkv_proj and gate_up_proj; Phi-3-mini-4k's sliding window
        model = Phi3ForCausalLM(Phi3Config(**llama_like, sliding_window=5, pad_token_id=0))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                           n_positions=128, bos_token_id=1, eos_token_id=2,
                                           tie_word_embeddings=tie))
    else:
        raise ValueError(family)
    with torch.no_grad():  # random biases and norms, so that a wrong mapping cannot hide behind zeros/ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


WORDS = "the lord said unto moses go down and speak to the people that they may hear and believe".split()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Tokenized data and corpora cached under this test's tmp_path."""
    monkeypatch.setenv("STAG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path, private_cache):
    """300 lines of 12 KJV-ish words (a fixed seed), as a text file."""
    import random
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)))
    return path


@pytest.fixture
def src(tmp_path):
    """A tiny Llama checkpoint directory with a tokenizer."""
    path = tmp_path / "src"
    tiny_hf_model("llama").save_pretrained(path)
    tiny_tokenizer(path)
    return path


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a tiny transformers model to a directory and return (path, model)."""
    def make(family="llama", **kw):
        model = tiny_hf_model(family, **kw)
        path = tmp_path / f"hf-{family}"
        model.save_pretrained(path)
        return path, model
    return make


TINY_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()\n"


def tiny_tokenizer(path=None):
    """A character-level fast tokenizer (lower-cased, ids < VOCAB; 0 pad, 1 bos, 2 eos, 3 unk) for the
    tiny models, which ship none. Saved to `path` (e.g. next to a tiny checkpoint) when given."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(TINY_CHARS)})
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one id per char
    backend.normalizer = normalizers.Lowercase()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    if path is not None:
        tok.save_pretrained(path)
    return tok
