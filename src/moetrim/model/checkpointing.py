"""Activation checkpointing under the names this transformers uses.

transformers 5.20 renamed gradient checkpointing to activation checkpointing (TrainingArguments fields and
the model's enable/disable methods). moetrim supports transformers >= 5.0, and vLLM's CPU build pins
transformers < 5.20, so a user with vLLM installed has the old names: both are resolved here, once.
"""

from __future__ import annotations

import dataclasses

from torch import nn


def _new_names() -> bool:
    from transformers import TrainingArguments

    return "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}


def training_arguments(on: bool) -> dict:
    """The TrainingArguments keywords that turn activation checkpointing on (non-reentrant) or off."""
    key = "activation_checkpointing" if _new_names() else "gradient_checkpointing"
    return {key: on, f"{key}_kwargs": {"use_reentrant": False} if on else None}


def is_on(model: nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def enable(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on every checkpointing layer of `model`."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable(model: nn.Module) -> None:
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
