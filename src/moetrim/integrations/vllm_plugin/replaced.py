"""Replaced experts -> the stock per-expert tensors vLLM loads: the labelled fallback for serving a replaced
checkpoint (replace, naive, merge, D²-MoE).

A replaced layer stores kept experts stacked, one base per group and rank-r factors per replaced expert
(`moetrim.model.replaced`). vLLM has no shared-base + low-rank expert kernel, so the plugin serves such a
checkpoint as the family's stock model: every replaced expert is rebuilt here, at load, as its effective
weights W_base + B A (what `ReplacedExperts.expert_weights` computes, so the served function is exact).
What the shared base saves in memory is NOT kept in vLLM: the served model holds every expert at full
size, and the plugin says so in a warning. Pure torch (no vLLM import), so CI tests it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

from moetrim.integrations.vllm_plugin.unpack import ExpertNames, LayoutError
from moetrim.model.replaced import _FACTORS, _SPEC_FIELDS, REPLACED_KEY

_STACKS = ("kept_gate_up", "kept_down", "base_gate_up", "base_down")
_TENSOR = re.compile(r"^(?P<layer>.*\.layers\.(?P<index>\d+)\.)mlp\.experts\.(?P<what>" + "|".join(_STACKS + _FACTORS) + r")$")


def replaced_records(config) -> dict[int, dict]:
    """Layer index -> its record (num_experts, width, kept, groups, rank) from a config (object or dict);
    {} when the checkpoint has no replaced layers."""
    record = config.get(REPLACED_KEY) if isinstance(config, Mapping) else getattr(config, REPLACED_KEY, None)
    if not record:
        return {}
    layers = record.get("layers") if isinstance(record, Mapping) else None
    if not isinstance(layers, Mapping) or not layers:
        raise LayoutError(f"config.json's '{REPLACED_KEY}' has no per-layer record; restore the config.json moetrim wrote")
    out = {}
    for key, spec in layers.items():
        if not str(key).isdigit() or not isinstance(spec, Mapping) or not set(_SPEC_FIELDS) <= set(spec):
            raise LayoutError(f"config.json's '{REPLACED_KEY}' layer {key!r} needs {', '.join(_SPEC_FIELDS)}")
        out[int(key)] = dict(spec)
    return out


def check_reconstructible(records: Mapping[int, Mapping]) -> None:
    """LayoutError in one line for a layer the reconstruction cannot serve: novices (MoNE) output a constant
    vector that no stock expert computes (the native path serves them)."""
    for index, spec in sorted(records.items()):
        if spec.get("novices"):
            raise LayoutError(f"layer {index} has novice experts (MoNE): a constant output that vLLM's stock fused MoE cannot "
                              "compute, and this layer is served reconstructed; serve it natively (unset "
                              "MOETRIM_VLLM_REPLACED, one GPU or CPU process) or with transformers")


def _needed(spec: Mapping) -> set[str]:
    """The tensors a layer stores (an empty stack is not saved: no kept experts, no groups, rank 0)."""
    need = set()
    if spec["kept"]:
        need |= {"kept_gate_up", "kept_down"}
    if spec["groups"]:
        need |= {"base_gate_up", "base_down"}
        if spec["rank"]:
            need |= set(_FACTORS)
    return need


def expert_weights(tensors: Mapping[str, torch.Tensor], spec: Mapping) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(gate [I, H], up [I, H], down [H, I]) of every expert id, replaced ones as W_base + B A (computed in
    float32, returned in the stored dtype)."""
    width, kept, groups, rank = int(spec["width"]), list(spec["kept"]), [list(g) for g in spec["groups"]], int(spec["rank"])
    replaced = sorted(e for g in groups for e in g)  # factor row m belongs to expert replaced[m]
    member = {e: m for m, e in enumerate(replaced)}
    out: list = [None] * int(spec["num_experts"])
    for u, e in enumerate(kept):
        gate_up, down = tensors["kept_gate_up"][u], tensors["kept_down"][u]
        out[e] = (gate_up[:width].contiguous(), gate_up[width:].contiguous(), down.contiguous())
    for g, experts in enumerate(groups):
        gate_up, down = tensors["base_gate_up"][g], tensors["base_down"][g]
        for e in experts:
            gate, up, dn = gate_up[:width], gate_up[width:], down
            if rank:
                m, dtype = member[e], gate.dtype

                def corr(b: str, a: str) -> torch.Tensor:
                    return tensors[b][m].float() @ tensors[a][m].float()

                gate = (gate.float() + corr("gate_b", "gate_a")).to(dtype)
                up = (up.float() + corr("up_b", "up_a")).to(dtype)
                dn = (dn.float() + corr("down_b", "down_a")).to(dtype)
            out[e] = (gate.contiguous(), up.contiguous(), dn.contiguous())
    missing = [e for e, w in enumerate(out) if w is None]
    if missing:
        raise LayoutError(f"experts {missing} are neither kept nor in a group of the layer's record")
    return out


def per_expert_replaced(weights: Iterable[tuple[str, torch.Tensor]], records: Mapping[int, Mapping],
                        names: ExpertNames) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a replaced checkpoint's tensors with every replaced layer's stacks and factors turned into the
    engine's per-expert tensors (each layer once all of its tensors have been seen); every other tensor
    passes through unchanged."""
    check_reconstructible(records)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    done: set[int] = set()
    for name, t in weights:
        m = _TENSOR.match(name)
        if m is None:
            yield name, t
            continue
        index = int(m["index"])
        if index not in records:
            raise LayoutError(f"{name}: layer {index} is not in the checkpoint's '{REPLACED_KEY}' record")
        got = pending.setdefault(index, {"prefix": m["layer"]})
        got[m["what"]] = t
        if not _needed(records[index]) <= set(got):
            continue
        prefix = f"{got.pop('prefix')}{names.block}.experts."
        for e, (gate, up, down) in enumerate(expert_weights(got, records[index])):
            yield f"{prefix}{e}.{names.gate}.weight", gate
            yield f"{prefix}{e}.{names.up}.weight", up
            yield f"{prefix}{e}.{names.down}.weight", down
        del pending[index]
        done.add(index)
    missing = {i: sorted(_needed(records[i]) - set(pending.get(i, {}))) for i in records if i not in done}
    if missing:
        raise LayoutError(f"replaced layers miss tensors in the checkpoint: {missing}")
