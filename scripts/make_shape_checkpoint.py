"""Write a random-weight Llama checkpoint with a real model's shape (for speed measurements only:
latency does not depend on the weights). Needs no hub and no gguf.

    python scripts/make_shape_checkpoint.py smollm2-135m runs/shapes/smollm2-135m
"""
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {  # the design note's shapes (docs/performance.md)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "qwen-0.5b-like": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}

if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **SHAPES[name]))
    model.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()):,} parameters")
