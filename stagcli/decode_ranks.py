"""Multi-process decoding: one section per device, the sections running concurrently.

One torch.distributed rank per section (NCCL on GPUs, gloo on CPU). Each rank holds only its
section's weights and caches. Per decode step every rank runs its section on token i at the same
time; then the [B, d] section outputs are exchanged with one all_gather (section r's output at i
becomes section r+1's cross-attention memory at slot i), the last rank samples the next token and
broadcasts it. Prefill runs the sections one after another, each sending its outputs up the chain.
The tokens equal single-process decoding (tests/test_decode.py checks it on CPU with gloo).
"""
from __future__ import annotations

import dataclasses
import os
import queue as queue_lib
import socket
import traceback

import torch

from .errors import StagError


def narrow_to_section(model, rank: int):
    """Drop every weight set but section `rank`'s (in place). Shared-weight models keep their one set."""
    from .model import StackedLinear, StackedNorm
    cfg = model.config

    def keep(module, index):
        for name in ("weight", "bias"):
            p = getattr(module, name, None)
            if p is not None:
                p.data = p.data[index:index + 1].clone() if index >= 0 else p.data[:0].clone()

    if cfg.shared:
        return model
    for block in model.blocks:  # every stacked weight: section r's set, or cross set r - 1
        for name, module in block.named_children():
            if isinstance(module, (StackedLinear, StackedNorm)):
                keep(module, rank - 1 if name.startswith("cross_") else rank)
    if model.mem_norm is not None:
        keep(model.mem_norm, rank - 1)
    return model


class SectionRank:
    """Section `rank` of a model narrowed with narrow_to_section, with its own static cache."""

    def __init__(self, model, rank: int, batch: int, max_len: int):
        self.model, self.rank, self.cfg = model, rank, model.config
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        from .cache import StagCache
        self.cache = StagCache(self.cfg, batch, max_len, device, dtype, sections=1, memories=1 if rank else 0)
        self.memory_kv = model.memory_kv_weights() if rank else None

    def _run(self, positions, key_valid, slots, memory=None):
        run = self.model._run(slice(self.rank, self.rank + 1), positions, key_valid, slots, self.cache, memory)
        # this rank's weights and caches hold one set, at index 0
        return dataclasses.replace(run, weights=slice(0, 1), cross=slice(0, 1), cross_rows=slice(0, 1),
                                   sections=slice(0, 1))

    def prefill(self, input_ids, attention_mask, source):
        """Run this section over the prompt. source: the section below's outputs [B, T, d]
        (None for section 0). Returns this section's outputs [B, T, d]."""
        model, cache, r = self.model, self.cache, self.rank
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        slots, positions, key_valid, prev_valid = cache.reserve(valid)
        emb = model.embed_tokens(input_ids, positions)
        x, memory = emb, None
        if r > 0:
            if self.cfg.lagged_input:
                x = emb + model._lag(emb, source, valid, prev_valid, cache, r)
            memory = model.mem_norm(source[None], slice(0, 1))
            cache.last_out[r - 1] = source[:, -1]
        out = model._blocks(x[None], self._run(positions, key_valid, slots, memory))[0]
        cache.last_out[r] = out[:, -1]
        cache.last_emb.copy_(emb[:, -1])
        return out

    def step(self, token):
        """This section on tokens [B]; returns its output [B, d]. Memory is written by remember()."""
        model, cache, r = self.model, self.cache, self.rank
        cache.claim(1)
        slots, positions, key_valid, prev_valid = cache.reserve_one()
        self._slots, self._positions = slots, positions
        emb = model.embed_tokens(token[:, None], positions)
        x = emb
        if self.cfg.lagged_input and r > 0:
            x = x + ((cache.last_out[r - 1] - cache.last_emb) * prev_valid[:, None].to(emb.dtype))[:, None]
        out = model._blocks(x[None], self._run(positions, key_valid, slots))[0, :, -1]
        cache.last_emb.copy_(emb[:, -1])
        return out

    def remember(self, outputs):
        """After a step: outputs [p, B, d] of every section; the one below becomes this memory."""
        if self.rank:
            self.model.write_memory(outputs[self.rank - 1][None], self.cache, self._slots, self._positions,
                                    self.memory_kv, rows=slice(0, 1))
        self.cache.last_out.copy_(outputs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, device, model_source, dtype, input_ids, attention_mask,
               max_new_tokens, sampling_kw, seed, eos_token_id, out_queue):
    import torch.distributed as dist
    from .decode import Sampling, sample, _eos_ids
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
        eos = torch.tensor(_eos_ids(eos_token_id), dtype=torch.long, device=device)
        pad = int(eos[0]) if len(eos) else 0
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        last = world - 1
        token = torch.zeros(batch, dtype=torch.long, device=device)

        with torch.no_grad():
            source = None
            if rank:  # prefill: sections one after another, outputs passed up the chain
                source = torch.empty(batch, prompt_len, model.config.hidden_size, device=device,
                                     dtype=model.embed.weight.dtype)
                dist.recv(source, rank - 1)
            out = section.prefill(input_ids, attention_mask, source)
            if rank < last:
                dist.send(out.contiguous(), rank + 1)
            logits = model.logits(out[:, -1]) if rank == last else None
            for i in range(max_new_tokens):
                if rank == last:
                    token = sample(logits, sampling, generator)
                dist.broadcast(token, last)
                if len(eos):
                    token = token.masked_fill(done, pad)
                    done = done | torch.isin(token, eos)
                if rank == 0:
                    out_queue.put(("token", token.cpu().clone()))  # a copy: queued tensors share memory
                if i == max_new_tokens - 1 or (len(eos) and bool(done.all())):
                    break
                out = section.step(token)          # every section at once, one per device
                gathered = [torch.empty_like(out) for _ in range(world)]
                dist.all_gather(gathered, out.contiguous())
                section.remember(torch.stack(gathered))
                if rank == last:
                    logits = model.logits(out)
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
    from .decode import Sampling
    Sampling(temperature, top_k, top_p).check()
    config = model_source.config if not isinstance(model_source, str) else None
    if config is None:
        from .convert import load_hf_config
        config = load_hf_config(model_source)
    sections = getattr(config, "sections", 1)
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
