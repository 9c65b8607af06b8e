"""Decode loops pass the KV cache under the name the model's forward declares."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moetrim.assets.tiny import tiny_model
from moetrim.evaluate.throughput import decode_seconds
from moetrim.model.kv_cache import cache_kwargs, cache_of


class _OldStyle(nn.Module):
    """A forward that takes `past_key_values`, as transformers before 5.24 declares it."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=False):
        return input_ids, past_key_values


def test_old_and_new_argument_names():
    assert cache_kwargs(_OldStyle(), "kv") == {"past_key_values": "kv"}
    m = tiny_model("qwen3_moe")
    name = next(iter(cache_kwargs(m, None)))
    assert name in ("cache", "past_key_values")
    out = m(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert cache_of(out) is not None and cache_of(out).get_seq_length() == 3


def test_decoding_raises_no_deprecation_warning():
    m = tiny_model("qwen3_moe").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_seconds(m, torch.tensor([[1, 2, 3]]), steps=2)
