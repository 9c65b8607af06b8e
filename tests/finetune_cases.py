"""Fine-tuning runs named by a string, the same in one process and under torchrun (tests/dist_finetune.py)."""

from __future__ import annotations

import torch

from moetrim.assets.tiny import tiny_model, tiny_tokenizer
from moetrim.train import FinetuneConfig, finetune


def records(n: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        out.append({"prompt": f"add {a} {b} =", "response": f" {a + b}\n"})
    return out


def run_case(case: str, batch_size: int):
    """case: NAME=METHOD[,key:value...] (values parsed as int, float, or left as text)."""
    _, spec = case.split("=", 1)
    method, *pairs = spec.split(",")
    kw = dict(method=method, lr=1e-3, max_steps=3, batch_size=batch_size, seq_len=64, progress=False, logging_steps=1,
              gamma=0.01)
    for pair in pairs:
        key, value = pair.split(":", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        kw[key] = value
    model = tiny_model("qwen3_moe", norm_topk_prob=True)  # a renormalising family
    return finetune(model, tiny_tokenizer(), records(), FinetuneConfig(**kw))
