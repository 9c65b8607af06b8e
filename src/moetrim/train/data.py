"""Fine-tuning data: `.jsonl` prompt/response or chat records, or `.txt` for language modelling.

Every example becomes `input_ids` and `labels` of at most `seq_len` tokens, with labels -100 on
everything the model is not trained to produce (prompts, user turns, padding):

* `{"prompt": ..., "response": ...}`: loss on the response tokens only;
* `{"messages": [{"role": ..., "content": ...}, ...]}`: the tokenizer's chat template when it has
  one, else `role: content` lines; loss on every assistant turn;
* `{"text": ...}` and `.txt` paragraphs: plain language modelling, loss on every token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from moetrim.errors import UsageError
from moetrim.evaluate.tasks_eval import pad_id  # noqa: F401  (the engine pads with the evaluator's choice)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(tokenizer, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Append end-of-text, trained like the response: the model learns to stop."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _prompt_response(tokenizer, prompt: str, response: str) -> Example:
    p = _ids(tokenizer, prompt)
    full = _ids(tokenizer, prompt + response)
    if full[: len(p)] == p and len(full) > len(p):
        ids, labels = full, [IGNORE] * len(p) + full[len(p):]
    else:  # the tokenizer merged across the boundary: tokenise the response on its own
        r = _ids(tokenizer, response, special=False)
        ids, labels = p + r, [IGNORE] * len(p) + r
    return Example(*_with_eos(tokenizer, ids, labels))


def _chat(tokenizer, messages: list[dict], where: str) -> Example:
    template = getattr(tokenizer, "chat_template", None)
    if template:
        def render(msgs, gen=False):
            return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
    else:
        def render(msgs, gen=False):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
            return _ids(tokenizer, text + ("assistant:" if gen else ""))
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True)
        upto = render(messages[: i + 1])
        if upto[: len(ids)] != ids or before[: len(ids)] != ids or upto[: len(before)] != before:
            raise UsageError(f"{where}: the chat template does not render turns as a growing prefix; give prompt/response records")
        labels += [IGNORE] * (len(before) - len(ids)) + upto[len(before):]
        ids = upto
    if not ids:
        raise UsageError(f"{where}: 'messages' has no assistant turn to learn")
    return Example(ids, labels)


def _record_example(tokenizer, record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: each line must be a JSON object")
    if "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise UsageError(f"{where}: a record with 'prompt' needs string fields 'prompt' and 'response'")
        if not record["response"].strip():
            raise UsageError(f"{where}: 'response' is empty")
        return _prompt_response(tokenizer, record["prompt"], record["response"])
    if "messages" in record:
        msgs = record["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok:
            raise UsageError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}}")
        return _chat(tokenizer, msgs, where)
    if isinstance(record.get("text"), str):
        ids = _ids(tokenizer, record["text"])
        return Example(*_with_eos(tokenizer, ids, list(ids)))
    raise UsageError(f"{where}: each record needs 'prompt' and 'response', 'messages', or 'text'")


def load_examples(data: str | os.PathLike | Sequence[dict] | Sequence[Example], tokenizer, *, seq_len: int = 1024) -> list[Example]:
    """Tokenised examples of a data file (or a list of records, or of examples), truncated to `seq_len` tokens."""
    if tokenizer is None:
        raise UsageError("fine-tuning data needs the model's tokenizer: save it beside the model")
    if seq_len < 2:
        raise UsageError("--seq-len must be at least 2")
    examples: list[Example] = []
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise UsageError(f"data file not found: {path}")
        if path.suffix == ".jsonl":
            from moetrim.data.text import iter_jsonl

            examples = [_record_example(tokenizer, record, f"{path}:{n}") for n, record in iter_jsonl(path)]
        elif path.suffix == ".txt":
            from moetrim.data.text import token_chunks

            for chunk in token_chunks(path, tokenizer, seq_len=seq_len):
                ids = chunk.tolist()
                examples.append(Example(ids, list(ids)))
        else:
            raise UsageError(f"{path}: give a .jsonl (prompt/response, messages or text records) or a .txt file")
        where = str(path)
    elif data and all(isinstance(x, Example) for x in data):  # already tokenised (e.g. checked by the CLI)
        examples = list(data)
        where = "the examples"
    else:
        examples = [_record_example(tokenizer, r, f"record {i}") for i, r in enumerate(data)]
        where = "the records"
    kept = []
    for ex in examples:
        ids, labels = ex.input_ids[:seq_len], ex.labels[:seq_len]
        if any(l != IGNORE for l in labels[1:]):  # something left to learn after the first token
            kept.append(Example(ids, labels))
    if not kept:
        raise UsageError(f"{where} has no examples with tokens to learn (empty, or every response cut off by --seq-len {seq_len})")
    return kept


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


class PadCollator:
    """Right-pads a batch; padding is masked out of attention and labels."""

    def __init__(self, pad_token: int):
        self.pad_id = pad_token

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
