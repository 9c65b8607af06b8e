"""A fingerprint that ties profiles and plans to the model they were computed on."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from moetrim.model.view import find_moe_layers

_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture and every router's weights rounded to bfloat16.

    Rounding makes the same checkpoint loaded in float32, bfloat16 or float16 (from a bf16 file)
    agree, while any other model (or a compressed one, whose routers changed) does not.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(json.dumps({k: cfg.get(k) for k in _CONFIG_KEYS}, sort_keys=True).encode())
    for layer in find_moe_layers(model):
        w = layer.router_weight.detach()
        h.update(f"{layer.index}:{tuple(w.shape)}:{layer.widths[0]}".encode())
        h.update(w.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
