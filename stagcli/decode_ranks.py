"""Multi-process decoding: one section per device, the sections running concurrently.

One torch.distributed rank per section (NCCL on GPUs, gloo on CPU). Each rank holds only its
section's weights and caches. Per decode step every rank runs its section on token i at the same
time; then the [B, d] section outputs are exchanged with one all_gather (section r's output at i
becomes section r+1's cross-attention memory at slot i), the last rank samples the next token and
broadcasts it. Prefill runs the sections one after another, each sending its outputs up the chain.
The tokens equal single-process decoding (tests/test_decode.py checks it on CPU with gloo).
"""
from __future__ import annotations

import queue as queue_lib
import socket
import traceback

import torch

from .errors import StagError


def narrow_to_section(model, rank: int):
    """Keep only section `rank`'s weights (in place): depth weights of set `rank`, and the
    cross-attention, memory norm and section input of the boundary below it (set rank - 1).
    Shared-weight models keep their one set. The model then holds (model.held) only that section."""
    from .layers import StackedLinear, StackedNorm

    def keep(module, index):
        for p in module.parameters(recurse=False):
            p.data = p.data[index:index + 1].clone() if index >= 0 else p.data[:0].clone()

    if not model.config.shared:
        for name, module in model.named_modules():
            if not isinstance(module, (StackedLinear, StackedNorm)) or name.startswith("final_norm"):
                continue
            boundary = name.startswith(("mem_norm", "section_input")) or ".cross." in name
            keep(module, rank - 1 if boundary else rank)
    model.held = slice(rank, rank + 1)
    return model


class SectionRank:
    """Section `rank` of a model narrowed with narrow_to_section, with its own static cache."""

    def __init__(self, model, rank: int, batch: int, max_len: int):
        self.model, self.rank = model, rank
        self.cache = model.new_cache(batch, max_len)
        self.memory_kv = model.memory_kv_weights() if rank else None
        self.place = None

    def prefill(self, input_ids, attention_mask, below):
        """This section over the prompt. below: the section below's outputs [B, T, d] (None for
        section 0). Returns this section's outputs [B, T, d]."""
        model, r = self.model, self.rank
        place = model.place(input_ids, attention_mask, self.cache)
        emb = model.embed_tokens(input_ids, place.positions)
        out = model.run_section(r, emb, below, place, self.cache)
        model.remember_last(self.cache, emb, {r: out, **({r - 1: below} if r else {})})
        return out

    def step(self, token):
        """This section on tokens [B]; returns its output [B, d]. Memory is written by remember()."""
        self.cache.claim(1)
        out, self.place = self.model.step_sections(token, self.cache)
        return out[0]

    def remember(self, outputs):
        """After a step: outputs [p, B, d] of every section; the one below becomes this memory."""
        if self.rank:
            self.model.write_memory(outputs[self.rank - 1][None], self.cache, self.place,
                                    slice(self.rank, self.rank + 1), self.memory_kv)
        self.cache.last_out.copy_(outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, device, model_source, dtype, input_ids, attention_mask,
               max_new_tokens, sampling_kw, seed, eos_token_id, out_queue):
    import torch.distributed as dist
    from .decode import Sampling, Stopping, decode_loop, sample
    try:
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        if isinstance(model_source, str):
            from .convert import load_model
            model = load_model(model_source, dtype)[0]
        else:
            model = model_source
        model = narrow_to_section(model.eval(), rank).to(device)
        input_ids = input_ids.to(device)
        attention_mask = None if attention_mask is None else attention_mask.to(device)
        batch, prompt_len = input_ids.shape
        section = SectionRank(model, rank, batch, prompt_len + max_new_tokens)
        sampling = Sampling(**sampling_kw)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        last = world - 1

        def choose(logits):  # the last rank samples; every rank gets the token
            token = sample(logits, sampling, generator) if rank == last else \
                torch.zeros(batch, dtype=torch.long, device=device)
            dist.broadcast(token, last)
            return token

        def step(token):  # every section at once, one per device, then the outputs are exchanged
            out = section.step(token)
            gathered = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(gathered, out.contiguous())
            section.remember(torch.stack(gathered))
            return model.logits(out) if rank == last else None

        def on_token(token):
            if rank == 0:
                out_queue.put(("token", token.cpu().clone()))  # a copy: queued tensors share memory

        with torch.no_grad():
            below = None
            if rank:  # prefill: sections one after another, outputs passed up the chain
                below = torch.empty(batch, prompt_len, model.config.hidden_size, device=device,
                                    dtype=model.embed.weight.dtype)
                dist.recv(below, rank - 1)
            out = section.prefill(input_ids, attention_mask, below)
            if rank < last:
                dist.send(out.contiguous(), rank + 1)
            logits = model.logits(out[:, -1]) if rank == last else None
            decode_loop(logits, step, choose, max_new_tokens, Stopping(batch, device, eos_token_id), on_token)
        if rank == 0:
            out_queue.put(("done", None))
        dist.destroy_process_group()
    except Exception as err:  # report to the parent on one line; it raises StagError
        out_queue.put(("error", f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}"))


def generate_on_devices(model_source, input_ids, attention_mask=None, max_new_tokens: int = 32, *,
                        devices: list[str], dtype: str = "float32", temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int | None = None, eos_token_id=None, on_token=None,
                        timeout_s: float = 600.0):
    """Like decode.generate, with section r of the model on devices[r], one process per section.
    model_source: a path load_model understands (each rank loads it) or an in-memory model
    (pickled to the ranks). len(devices) must equal the model's section count."""
    import torch.multiprocessing as mp
    from .decode import Sampling, check_request
    config = model_source.config if not isinstance(model_source, str) else None
    if config is None:
        from .convert import load_hf_config
        config = load_hf_config(model_source)
    check_request(config, input_ids, attention_mask, max_new_tokens, Sampling(temperature, top_k, top_p))
    sections = getattr(config, "sections", 1)
    if getattr(config, "verified", False):
        raise StagError("--devices decodes split models; a verify or exact-cache model decodes in one process")
    if len(devices) != sections or sections < 2:
        raise StagError(f"--devices needs one device per section: the model has {sections} section(s), "
                        f"{len(devices)} device(s) given" + (" (multi-device decoding needs >= 2 sections)" if sections < 2 else ""))
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = _free_port()
    sampling_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(r, len(devices), port, devices[r], model_source, dtype, input_ids.cpu(),
                               None if attention_mask is None else attention_mask.cpu(), max_new_tokens,
                               sampling_kw, seed, eos_token_id, out_queue))
             for r in range(len(devices))]
    for p in procs:
        p.start()
    tokens = []
    try:
        while True:
            try:
                kind, payload = out_queue.get(timeout=timeout_s)
            except queue_lib.Empty:
                raise StagError(f"multi-device decoding produced nothing for {timeout_s:.0f} s") from None
            if kind == "error":
                raise StagError(payload.splitlines()[0])
            if kind == "done":
                break
            tokens.append(payload)
            if on_token is not None:
                on_token(payload)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return torch.stack(tokens, 1)
