"""What a model is made of: MoE layers, experts, widths, parameters and weight memory by part."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from moetrim.model.replaced import REPLACED_KEY
from moetrim.model.routing import ROUTING_KEY
from moetrim.model.varwidth import VARWIDTH_KEY
from moetrim.model.view import find_moe_layers

PARTS = ("routed_experts", "routers", "shared_experts", "attention", "dense_mlp", "embeddings", "other")


def summarize(model: nn.Module) -> dict:
    """A JSON-ready description; works on meta-device models (shapes only)."""
    layers = find_moe_layers(model)
    owner: dict[int, str] = {}
    for layer in layers:
        for p in layer.experts.parameters():
            owner[id(p)] = "routed_experts"
        for p in layer.router.parameters():
            owner[id(p)] = "routers"
        for _, m in layer.shared:
            for p in m.parameters():
                owner[id(p)] = "shared_experts"
    params: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = owner.get(id(p))
        if part is None:
            leaf = name.split(".")
            if any(k in leaf for k in ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")):
                part = "embeddings"
            elif any(k in leaf for k in ("self_attn", "attn", "attention")):
                part = "attention"
            elif any(k in leaf for k in ("mlp", "feed_forward")):
                part = "dense_mlp"
            else:
                part = "other"
        params[part] += p.numel()
        nbytes[part] += p.numel() * p.element_size()
    cfg = model.config
    first = next(iter(model.parameters()))
    return {
        "family": getattr(cfg, "model_type", type(model).__name__),
        "class": type(model).__name__,
        "dtype": str(first.dtype).replace("torch.", ""),
        "decoder_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "moe_layers": [
            {
                "layer": l.index,
                "experts": l.num_experts,
                "top_k": l.top_k,
                "width_min": min(l.widths),
                "width_mean": round(sum(l.widths) / len(l.widths), 2),
                "width_max": max(l.widths),
                "routing": l.routing,
                "shared": [n for n, _ in l.shared],
                "routed_params": l.routed_params(),
            }
            for l in layers
        ],
        "params": {k: params.get(k, 0) for k in PARTS},
        "bytes": {k: nbytes.get(k, 0) for k in PARTS},
        "total_params": sum(params.values()),
        "total_bytes": sum(nbytes.values()),
        "format": " + ".join(name for name, key in _RECORDS if getattr(cfg, key, None)) or "standard",
        "recipe": getattr(cfg, "moetrim", None),
    }


# moetrim's layer records, by the format each names; a checkpoint may carry several (an auto plan's sliced
# and replaced layers; a fine-tuned compressed model's routing)
_RECORDS = (("varwidth", VARWIDTH_KEY), ("replaced", REPLACED_KEY), ("routed", ROUTING_KEY))


def weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
