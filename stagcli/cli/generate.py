"""`stag generate MODEL --prompt ...`."""
from __future__ import annotations

import time
from typing import List, Optional

import typer

from . import app
from .common import console, err_console, handles_errors


@app.command()
@handles_errors
def generate(
    model: str = typer.Argument(..., help="A stag directory, or a plain checkpoint / .gguf / alias (decoded "
                                "unconverted by the same engine, p = 1)."),
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt text; repeat for a batch (left-padded)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt as a user turn with the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most (stops at EOS)."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples from softmax(logits / T)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample only among the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: the smallest set reaching probability p (1 = all)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (same seed, same tokens)."),
    recurrent: bool = typer.Option(False, "--recurrent", help="Recurrent approximation (shared-weights "
                                   "models): skip pass 1 for generated tokens."),
    devices: Optional[str] = typer.Option(None, help="Comma-separated devices, one per section (e.g. "
                                          "cuda:0,cuda:1): one torch.distributed rank per section, running concurrently."),
    device: Optional[str] = typer.Option(None, help="Device for single-process decoding: cpu, cuda, cuda:1 "
                                         "(default: cuda if available)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the decode step before its "
                                 "CUDA-graph capture (CUDA only): about 2x faster per token on an H100 after ~40-70 s "
                                 "of compiling. In bf16 the fused kernels round differently, so a --mode verify "
                                 "model then gives the source's tokens up to bf16 rounding (bit for bit in fp32)."),
):
    """Generate text with the parallel-section decode engine, streaming tokens as they come."""
    from ..convert import DTYPES, load_model
    from ..decode import generate as run_generate
    from ..decode import left_pad
    from ..devices import resolve_device
    from ..errors import StagError

    if dtype not in DTYPES:
        raise StagError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if max_new_tokens < 1:
        raise StagError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    empty = [i + 1 for i, text in enumerate(prompt) if not text.strip()]
    if empty:
        raise StagError(f"prompt {empty[0]} of {len(prompt)} is empty: give every --prompt some text")
    target = None if devices else resolve_device(device)  # checked before the (slow) model load
    loaded, tokenizer = load_model(model, dtype)
    if tokenizer is None:
        raise StagError(f"{model} has no tokenizer to turn the prompt into tokens")
    texts = list(prompt)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise StagError(f"{model}'s tokenizer has no chat template; drop --chat")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    rows = [tokenizer(t, add_special_tokens=not chat).input_ids for t in texts]
    limit = loaded.config.max_positions
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > limit:
        raise StagError(f"prompt ({longest} tokens) + --max-new-tokens ({max_new_tokens}) exceed the model's "
                        f"context of {limit} tokens; ask for at most {max(limit - longest, 0)} new tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, mask = left_pad(rows, pad)
    streamed: list[int] = []
    stream = len(rows) == 1
    first_token_at = []
    shown = [""]

    def on_token(tokens):
        if not first_token_at:
            first_token_at.append(time.perf_counter())
        if stream:
            streamed.append(int(tokens[0]))
            text = tokenizer.decode(streamed, skip_special_tokens=True)
            console.print(text[len(shown[0]):], end="", markup=False, highlight=False, soft_wrap=True)
            shown[0] = text

    verify_note = ""
    start = time.perf_counter()
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=tokenizer.eos_token_id)
    if devices:
        from ..decode_ranks import generate_on_devices
        if recurrent or compile:
            raise StagError(f"--{'recurrent' if recurrent else 'compile'} runs in one process; drop --devices")
        out = generate_on_devices(model, ids, mask, max_new_tokens, devices=devices.split(","), dtype=dtype,
                                  on_token=on_token, **sampling)
    else:
        verified = []
        loaded = loaded.to(target)
        out = run_generate(loaded, ids, mask, max_new_tokens, recurrent=recurrent, on_token=on_token,
                           on_stats=verified.append, compile=compile, **sampling)
        if verified and loaded.config.exact_cache:
            verify_note = " | exact-cache: drafts emitted unverified"
        elif verified:
            verify_note = (f" | verified: acceptance {verified[0].acceptance:.2f}, "
                           f"{verified[0].tokens_per_step:.2f} tokens/step")
    elapsed = time.perf_counter() - start
    if stream:
        console.print()
    else:
        for text, new in zip(prompt, out):
            console.print(f"[bold]{text}[/]", tokenizer.decode(new.tolist(), skip_special_tokens=True), highlight=False)
    n = out.shape[1]
    ttft = (first_token_at[0] - start) if first_token_at else elapsed
    decode_s = elapsed - ttft
    rate = (out.shape[0] * (n - 1) / decode_s) if n > 1 and decode_s > 0 else float("nan")
    err_console.print(f"{out.shape[0]} x {n} tokens | time to first token {ttft * 1e3:.0f} ms | "
                      f"decode {rate:.1f} tokens/s | {'x'.join(str(s) for s in ids.shape)} prompt tokens "
                      f"| {loaded.config.sections} section(s){' on ' + devices if devices else ''}{verify_note}",
                      highlight=False)

