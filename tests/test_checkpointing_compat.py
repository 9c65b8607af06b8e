"""Activation checkpointing under both transformers namings (5.20 renamed gradient_* to activation_*; vLLM's
CPU build pins transformers < 5.20, so users with vLLM installed have the old names)."""

from __future__ import annotations

import torch

from moetrim.assets.tiny import tiny_model
from moetrim.model import checkpointing


def test_training_arguments_turn_checkpointing_on_and_off(tmp_path):
    from transformers import TrainingArguments

    for on in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **checkpointing.training_arguments(on))
        flag = getattr(args, "activation_checkpointing", None)
        assert (flag if flag is not None else args.gradient_checkpointing) is on


def test_enable_and_disable_toggle_the_model_and_keep_gradients():
    m = tiny_model("qwen3_moe", hidden_size=128, head_dim=32)
    m.train()
    assert not checkpointing.is_on(m)
    checkpointing.enable(m)
    assert checkpointing.is_on(m)
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    m(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "layers.0.self_attn" in n)
    checkpointing.disable(m)
    assert not checkpointing.is_on(m)
