"""Calibration data: plain text and `.jsonl` files, strings, or token tensors -> fixed-length chunks.

Documents are tokenised with the model's own tokenizer, joined with its end-of-text token and cut
into `seq_len`-token chunks, so every calibration sequence has the same length (Fisher sums
per-sequence gradients; equal lengths keep sequences equally weighted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from moetrim.errors import UsageError

DataSource = str | os.PathLike | Sequence[str] | Iterable[torch.Tensor]


def record_text(record: object) -> str | None:
    """The running text of one .jsonl record: 'text', or 'prompt' + 'response', or its 'messages'
    contents joined; None when the record has none of them. Fine-tuning files thereby also serve as
    calibration and routing data."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return record["prompt"] + record["response"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return "\n".join(m["content"] for m in messages)
    return None


def read_text_file(path: str | os.PathLike) -> str:
    """A data file's text, the one reader of .txt and .jsonl: UTF-8 (a leading byte-order mark dropped),
    newlines as Python's text mode gives them; bytes that are not UTF-8 are a UsageError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _lone_surrogate(record: object) -> str | None:
    """The first string in a parsed record that cannot be UTF-8 (a lone surrogate such as "\\ud800"), as an escape."""
    stack = [record]
    while stack:  # iterative: records may nest as deep as the JSON parser allowed
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return item[exc.start].encode("unicode_escape").decode("ascii")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank line of a .jsonl file. Bad JSON, nesting deeper than the
    parser goes, and strings that are not text are each a UsageError naming the line."""
    for n, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{path}:{n}: JSON nested too deeply to read; give one flat record per line") from None
        bad = _lone_surrogate(record)
        if bad is not None:
            raise UsageError(f"{path}:{n}: a string holds {bad}, half of a surrogate pair, which is not text; fix the escape")
        yield n, record


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a .txt file (paragraphs split on blank lines) or a .jsonl file (see `record_text`)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        for n, record in iter_jsonl(path):
            text = record_text(record)
            if text is None:
                raise UsageError(f"{path}:{n}: each .jsonl line needs a string field 'text', 'prompt' and 'response', or 'messages'")
            docs.append(text)
        return [d for d in docs if d.strip()]
    return [p.strip() for p in read_text_file(path).split("\n\n") if p.strip()]


def _tokenize(docs: Iterable[str], tokenizer, max_tokens: int | None) -> torch.Tensor:
    if tokenizer is None:
        raise UsageError("text data needs a tokenizer: the model directory has none (pass input_ids tensors instead)")
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def token_chunks(
    data: DataSource,
    tokenizer=None,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Cut calibration data into 1-D LongTensor chunks of `seq_len` tokens (the last may be shorter)."""
    if seq_len < 2:
        raise UsageError("--seq-len must be at least 2")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2")
    streams: list[torch.Tensor]
    if isinstance(data, (str, os.PathLike)):
        paths = [Path(p) for p in str(data).split(",")] if isinstance(data, str) else [Path(data)]
        docs = [d for p in paths for d in read_documents(p)]
        streams = [_tokenize(docs, tokenizer, max_tokens)]
    else:
        items = list(data)
        if items and all(isinstance(x, str) for x in items):
            streams = [_tokenize(items, tokenizer, max_tokens)]
        elif all(isinstance(x, torch.Tensor) for x in items):
            streams = [row for x in items for row in (x.reshape(1, -1) if x.ndim < 2 else x)]
        else:
            raise UsageError("data must be a file path, a list of strings, or an iterable of input_ids tensors")
    chunks: list[torch.Tensor] = []
    budget = max_tokens
    for stream in streams:
        stream = stream.to(torch.long).reshape(-1)
        for start in range(0, stream.numel(), seq_len):
            piece = stream[start : start + seq_len]
            if budget is not None:
                piece = piece[:budget]
            if piece.numel() >= 2:
                chunks.append(piece)
                if budget is not None:
                    budget -= piece.numel()
            if budget is not None and budget <= 0:
                return chunks
    return chunks


def batches(chunks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length chunks into [B, S] batches, keeping data order (a short tail is its own batch)."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    out: list[torch.Tensor] = []
    by_len: dict[int, list[torch.Tensor]] = {}
    for c in chunks:
        by_len.setdefault(c.numel(), []).append(c)
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            out.append(torch.stack(group[i : i + batch_size]))
    return out
