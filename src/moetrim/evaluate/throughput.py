"""Tokens per second for prefill and decode, for several models measured side by side.

Measurements alternate between the models (A B A B ...) and report medians, so a slow moment of
the machine hits every model alike; only ratios from one run are meant to be compared.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from moetrim.model.kv_cache import cache_kwargs, cache_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """One prompt pass as a server does it: fill the KV cache, logits for the last position only."""
    dev = ids.device
    _sync(dev)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(dev)
    return time.perf_counter() - t


@torch.inference_mode()
def decode_seconds(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Time of `steps` one-token decode steps after a prompt (the prompt pass is not timed)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)
    dev = ids.device
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        cache = cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(dev)
    return time.perf_counter() - t


def compare_throughput(
    models: dict[str, nn.Module],
    *,
    vocab_size: int,
    prompt_len: int = 128,
    decode_steps: int = 32,
    batch_sizes: tuple[int, ...] = (1,),
    prefill_batch: int = 1,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{name: {"prefill_tokens_per_s", "decode_tokens_per_s" (batch 1), "decode_tokens_per_s_b{B}"}}.

    threads: CPU threads while measuring (None: leave as is). Small models are timed best on one
    thread: intra-op threads only add synchronisation, and on a busy machine make timings erratic."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _compare(models, vocab_size, prompt_len, decode_steps, batch_sizes, prefill_batch, repeats, seed, progress)
    finally:
        torch.set_num_threads(previous)


def _compare(models, vocab_size, prompt_len, decode_steps, batch_sizes, prefill_batch, repeats, seed, progress):
    gen = torch.Generator().manual_seed(seed)
    device = next(next(iter(models.values())).parameters()).device
    prompt = torch.randint(0, vocab_size, (max(max(batch_sizes), prefill_batch), prompt_len), generator=gen).to(device)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in models}
    for name, m in models.items():  # warm-up
        prefill_seconds(m, prompt[:prefill_batch])
        decode_seconds(m, prompt[:1, :16], 2)
    for r in range(repeats):
        for name, m in models.items():
            if progress:
                progress(f"{name} repeat {r + 1}/{repeats}")
            s = samples[name]
            s.setdefault("prefill", []).append(prefill_batch * prompt_len / prefill_seconds(m, prompt[:prefill_batch]))
            for b in batch_sizes:
                key = "decode" if b == 1 else f"decode_b{b}"
                s.setdefault(key, []).append(b * decode_steps / decode_seconds(m, prompt[:b], decode_steps))
    out = {}
    for name, s in samples.items():
        row = {"prefill_tokens_per_s": statistics.median(s["prefill"])}
        for key, vals in s.items():
            if key.startswith("decode"):
                suffix = "" if key == "decode" else "_" + key.split("_")[1]
                row[f"decode_tokens_per_s{suffix}"] = statistics.median(vals)
        out[name] = row
    return out
