"""Task-suite evaluation: greedy exact-match accuracy and answer perplexity per domain.

Works with any causal LM that takes ``input_ids / attention_mask / position_ids`` and a KV cache (plain
``transformers`` models and ones whose expert modules were swapped out alike) and any tokenizer. Prompts are
left-padded and decoded with the KV cache; a row stops once it emits end-of-text or a token containing a
newline (the suite's end-of-answer marker).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import torch

from moetrim.checkpoint.placement import input_device
from moetrim.data.tasks import TaskItem, get_items
from moetrim.model.kv_cache import cache_kwargs, cache_of


def pad_id(tokenizer: Any) -> int:
    """The token that pads batches: the tokenizer's pad, else end-of-text, else begin-of-text, else 0."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _stop_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids that end an answer: end-of-text plus every token whose text contains a newline."""
    vocab = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab)])
    ids = {i for i, t in enumerate(texts) if "\n" in t}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return torch.tensor(sorted(ids), dtype=torch.long)


def _model_kwargs(model: Any) -> dict[str, Any]:
    # Router logits / aux loss are useless at inference; skip them when the model would compute them.
    if getattr(model.config, "output_router_logits", False):
        return {"output_router_logits": False}
    return {}


def _encode_pairs(tokenizer: Any, items: Sequence[TaskItem]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per item, with the prompt tokenized exactly as generation sees it."""
    pairs = []
    for item in items:
        prompt_ids = list(tokenizer(item.prompt).input_ids)
        full_ids = list(tokenizer(item.text).input_ids)
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            answer_ids = full_ids[len(prompt_ids):]
        else:  # the tokenizer merged across the boundary: fall back to tokenizing the answer alone
            answer_ids = list(tokenizer(item.completion, add_special_tokens=False).input_ids)
        pairs.append((prompt_ids, answer_ids))
    return pairs


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations (cut at the first newline) for already-tokenized prompts."""
    device = input_device(model)
    pad, stops = pad_id(tokenizer), _stop_ids(tokenizer).to(device)
    extra = _model_kwargs(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    results: list[str] = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = prompt_ids[i]
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        generated = []
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1, :].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones((len(idx), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **cache_kwargs(model, cache_of(out)),
                **extra,
            )
        tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in idx]
        for row, i in enumerate(idx):
            text = tokenizer.decode(tokens[row], skip_special_tokens=True)
            results[i] = text.split("\n", 1)[0]
    return results


@torch.inference_mode()
def answer_nll(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int = 32
) -> tuple[float, int]:
    """Summed negative log-likelihood of the answer tokens given their prompts, and the token count."""
    device = input_device(model)
    extra = _model_kwargs(model)
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (p, a) in enumerate(chunk):
            seq = p + a
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            targets[row, len(p) : len(seq)] = torch.tensor(a, dtype=torch.long)
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits.float()
        # Token t is predicted from position t-1.
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        total += float(nll)
        count += int((targets[:, 1:] != -100).sum())
    return total, count


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    domains: list[str],
    n: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
    split: str = "eval",
) -> dict[str, dict[str, float | int]]:
    """Exact-match accuracy (greedy) and answer perplexity (teacher-forced) on each domain's eval split
    (or `split`: the training script watches "calib" and never looks at eval).

    Returns ``{"accuracy": {d: float}, "perplexity": {d: float}, "n": {d: int}}``. ``n=None`` uses the
    default size of the split; ``max_new_tokens=None`` allows the longest reference answer + 8.
    """
    was_training = model.training
    model.eval()
    result: dict[str, dict[str, Any]] = {"accuracy": {}, "perplexity": {}, "n": {}}
    try:
        for domain in domains:
            items = get_items(domain, split, n)
            pairs = _encode_pairs(tokenizer, items)
            budget = max_new_tokens or (max(len(a) for _, a in pairs) + 8)
            outputs = greedy_generate(model, tokenizer, [p for p, _ in pairs], budget, batch_size)
            correct = sum(out.strip() == item.answer.strip() for out, item in zip(outputs, items))
            nll, count = answer_nll(model, pairs, pad_id(tokenizer), batch_size)
            result["accuracy"][domain] = correct / len(items)
            result["perplexity"][domain] = math.exp(nll / max(count, 1))
            result["n"][domain] = len(items)
            if progress:
                print(
                    f"[eval] {domain}: accuracy {correct / len(items):.3f} "
                    f"perplexity {result['perplexity'][domain]:.3f} (n={len(items)})",
                    file=sys.stderr, flush=True,
                )
    finally:
        model.train(was_training)
    return result
