"""Rerouted checkpoints in vLLM: moetrim's routing (bias, condensers) as the fused MoE's routing function.

A checkpoint fine-tuned with a routing bias or condenser experts (`moetrim.model.routing`) routes
differently from its family's stock router. vLLM's fused MoE takes a `custom_routing_function`
(hidden_states, gating_output, topk, renormalize) -> (topk_weights, topk_ids) on every platform (GPU
routers and the CPU router alike), so the plugin builds each rerouted layer's fused MoE with a
`ServedRouting` module as that function: the stock gate computes the logits, then

  * the bias is added to the logits (or, recorded as "selection", to the scores top-k ranks only);
  * the condensers are excluded from the routed top-k and appended to every token's slots, weighted by
    their routing probability or their learned gate, so each runs exactly once per token;
  * the fused MoE is built with k' slots per token: k + r (budget "additive") or k (budget "fixed",
    k - r routed beside the r condensers), the same k' the transformers model hands its experts.

The routing math is `moetrim.model.routing.select_routed` / `weigh_routed`, the functions the transformers
hook runs, so vLLM and transformers route alike by construction. Pure tensor ops with no host read, so a
compiled graph (and CUDA-graph capture) goes through it. Pure torch (no vLLM import), so CI tests it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from moetrim.integrations.vllm_plugin.unpack import LayoutError
from moetrim.model.routing import ROUTING_KEY, RoutingSpec, select_routed, weigh_routed

# A router's moetrim state in a checkpoint: model.layers.N.<block>.gate.moetrim_<what>
_TENSOR = re.compile(r"(?:^|\.)layers\.(?P<index>\d+)\..*\.moetrim_(?P<what>bias|condensers|gate_weight|gate_bias)$")


def routing_spec(config) -> RoutingSpec | None:
    """The routing record of a config (object or dict), or None for a checkpoint routed as its family's."""
    record = config.get(ROUTING_KEY) if isinstance(config, Mapping) else getattr(config, ROUTING_KEY, None)
    if not record:
        return None
    try:
        spec = RoutingSpec.from_dict(dict(record))
    except Exception as exc:
        raise LayoutError(f"config.json's '{ROUTING_KEY}' cannot be read ({exc}); restore the config.json moetrim wrote") from None
    if spec.normalise is None:
        raise LayoutError(f"config.json's '{ROUTING_KEY}' does not say whether the family renormalises (normalise); "
                          "restore the config.json moetrim wrote")
    return spec


def slots_per_token(spec: RoutingSpec, top_k: int) -> int:
    """k': the slots the fused MoE runs per token (routed experts plus condensers)."""
    return top_k + spec.condensers if spec.condensers and spec.budget == "additive" else top_k


class ServedRouting(nn.Module):
    """One layer's routing in vLLM, called by its fused MoE's router as `custom_routing_function`.

    Holds the router's moetrim state as buffers (filled from the checkpoint by `load_routing_weights`):
    bias [E] (fp32), condensers [r] (expert ids), and for a learned gate its weight [r, H] and bias [r]."""

    def __init__(self, spec: RoutingSpec, num_experts: int, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.spec, self.num_experts = spec, int(num_experts)
        self.r = int(spec.condensers)
        self.learned = bool(self.r and spec.gate == "learned")
        if spec.bias:
            self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        if self.r:
            self.register_buffer("condensers", torch.full((self.r,), -1, dtype=torch.long))
        if self.learned:
            self.register_buffer("gate_weight", torch.zeros(self.r, hidden_size, dtype=dtype))
            self.register_buffer("gate_bias", torch.zeros(self.r, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights fp32 [T, k'], topk_ids int32 [T, k']); `topk` is k' and `renormalize` is ignored:
        the checkpoint's own record says whether its family renormalises."""
        cond = self.condensers if self.r else None
        bias = self.bias if self.spec.bias else None
        _, p, top_i = select_routed(gating_output, bias, self.spec.bias_apply, cond, topk - self.r)
        gate = (self.gate_weight, self.gate_bias) if self.learned else None
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        top_w, top_i = weigh_routed(p, top_i, cond, bool(self.spec.normalise), hidden, gate)
        return top_w.float(), top_i.to(torch.int32)

    def check_loaded(self, index: int) -> None:
        """At load (a host read is fine there): condenser ids chosen, distinct and in range."""
        if not self.r:
            return
        ids = self.condensers.tolist()
        if min(ids) < 0:
            raise LayoutError(f"layer {index}: this checkpoint's condensers were never chosen (it was saved during the "
                              "sparsifying phase); serve the final fine-tuned model, or this one with transformers")
        if len(set(ids)) != len(ids) or max(ids) >= self.num_experts:
            raise LayoutError(f"layer {index}: condenser ids {ids} must be distinct expert ids")


def routing_kwargs(kwargs: dict, routing: ServedRouting) -> dict:
    """A FusedMoEFactory call's arguments with the layer's moetrim routing: k' slots, our routing function."""
    kwargs = dict(kwargs)
    kwargs["top_k"] = slots_per_token(routing.spec, int(kwargs["top_k"]))
    kwargs["custom_routing_function"] = routing
    return kwargs


def load_routing_weights(weights: Iterable[tuple[str, torch.Tensor]], routings: Mapping[int, ServedRouting],
                         prefix: str, loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass every tensor on except the routers' moetrim state, which is copied into the layer's
    ServedRouting (its qualified name, `{prefix}.{index}.{what}`, added to `loaded`)."""
    for name, t in weights:
        m = _TENSOR.search(name)
        if m is None:
            yield name, t
            continue
        index, what = int(m["index"]), m["what"]
        module = routings.get(index)
        target = getattr(module, what, None) if module is not None else None
        if target is None:
            raise LayoutError(f"{name}: the checkpoint holds routing state its config.json's '{ROUTING_KEY}' does not "
                              "describe; restore the config.json moetrim wrote")
        if tuple(target.shape) != tuple(t.shape):
            raise LayoutError(f"{name}: shape {tuple(t.shape)}, but the routing record needs {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(t.to(device=target.device, dtype=target.dtype))
        loaded.add(f"{prefix}.{index}.{what}")


def check_routing_loaded(routings: Mapping[int, ServedRouting], prefix: str, loaded: set[str]) -> None:
    """Every rerouted layer got all of its state from the checkpoint, and its condensers are usable."""
    missing = sorted(f"{prefix}.{i}.{n}" for i, m in routings.items() for n, _ in m.named_buffers() if f"{prefix}.{i}.{n}" not in loaded)
    if missing:
        raise LayoutError(f"the checkpoint lacks the routing state {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                          f"that its config.json's '{ROUTING_KEY}' describes")
    for i, m in routings.items():
        m.check_loaded(i)
