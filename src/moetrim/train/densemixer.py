"""DenseMixer's straight-through router gradient (Yao et al.): sparse forward, dense router gradient.

While training, each MoE block's output becomes

    y = y_sparse(weights detached) + y_dense - stopgrad(y_dense),   y_dense = sum_e w_e * stopgrad(E_e(x))

over *all* experts e. Its value is exactly the sparse output; the experts get gradients only from
the tokens that selected them (through y_sparse), and the router gets the gradient it would get if
every expert ran (through y_dense). Every expert runs on every token, which is what DenseMixer costs: on
stock fused experts as one batched computation over the fused tensors (`all_experts`).
In eval mode nothing changes.

The dense weights w are the ones the sparse pass would give every expert (yaof20/DenseMixer,
`densemixer/models/qwen3_moe_custom.py` and `olmoe_custom.py`, "partscale_fix_expert"): w = p, the
router softmax, for a family that does not renormalise; for one that renormalises the top-k weights
(Qwen3-MoE, Mixtral, OLMoE with norm_topk_prob) every expert is divided by the same normaliser
n = sum of p over the token's top-k,

    w_e = p_e / n            for the top-k experts (the gradient flows through n too),
    w_e = p_e / stopgrad(n)  for the others,

so the top-k entries equal the sparse pass's renormalised weights. Only softmax -> top-k routers are
supported (sigmoid, group-limited or scaled routers are refused in one line).
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.errors import UsageError
from moetrim.model.routing import softmax_topk_renormalises
from moetrim.model.view import MoELayer, _is_fused_stock
from moetrim.train.fused import dense, factors_of

CHUNK_ELEMENTS = 1 << 26  # the dense pass's widest intermediate [E, tokens, max(2I, H)] per chunk of tokens


def all_experts(experts: nn.Module, hidden: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Every expert's output on every token [E, T, H] at routing weight 1 (no gradient is taken through it).

    A stock fused module (with its LoRA factors while `ExpertLoRA` trains it) is one batched computation
    over its fused tensors per chunk of tokens; moetrim's own modules (variable-width, replaced) are
    called once per expert with every token routed to it."""
    t = hidden.shape[0]
    if _is_fused_stock(experts):
        up = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
        widest = max(up.shape[1], up.shape[2], experts.down_proj.shape[1], experts.down_proj.shape[2])
        step = max(1, CHUNK_ELEMENTS // (num_experts * widest))
        factors = factors_of(experts)
        return torch.cat([dense(experts, hidden[i : i + step], factors) for i in range(0, t, step)], dim=1)
    one = torch.ones(t, 1, dtype=hidden.dtype, device=hidden.device)
    return torch.stack([experts.forward(hidden, torch.full((t, 1), e, dtype=torch.long, device=hidden.device), one)
                        for e in range(num_experts)])  # .forward skips the hooks (DenseMixer's included)


def dense_weights(logits: torch.Tensor, top_i: torch.Tensor, normalise: bool) -> torch.Tensor:
    """The dense pass's weight of every expert for every token [T, E] (with the router's graph)."""
    p = logits.float().softmax(dim=-1)
    if not normalise:
        return p
    mask = torch.zeros_like(p).scatter_(-1, top_i, 1.0)
    n = (p * mask).sum(dim=-1, keepdim=True)
    return p * mask / n + p * (1 - mask) / n.detach()


class DenseMixer:
    """Hooks on each layer's router (keep the dense weights, detach the sparse ones) and experts (add the dense term)."""

    def __init__(self, layers: list[MoELayer]):
        self.handles = []
        self.weights: dict[int, torch.Tensor] = {}
        self.normalise: dict[int, bool] = {}
        for layer in layers:
            normalise = softmax_topk_renormalises(layer)
            if normalise is None:
                raise UsageError(f"--method densemixer: layer {layer.index}'s {type(layer.router).__name__} does not route by "
                                 "softmax then top-k, so it has no dense mixture to take a gradient from; use --method full or esft")
            self.normalise[layer.index] = normalise
        for layer in layers:
            self.handles.append(layer.router.register_forward_hook(self._router_hook(layer.index)))
            self.handles.append(layer.experts.register_forward_hook(self._experts_hook(layer.index, layer.num_experts)))

    def _router_hook(self, index: int):
        def hook(router: nn.Module, args, output):
            if not router.training or not torch.is_grad_enabled():
                return None
            logits, weights, top_i = output[0], output[1], output[2]
            self.weights[index] = dense_weights(logits, top_i, self.normalise[index])  # keeps the graph to the router
            return (logits, weights.detach(), top_i, *output[3:])
        return hook

    def _experts_hook(self, index: int, num_experts: int):
        def hook(experts: nn.Module, args, output):
            w = self.weights.pop(index, None)
            if w is None:
                return None
            with torch.no_grad():
                outs = all_experts(experts, args[0].detach(), num_experts)  # [E, T, H]
            dense = torch.einsum("te,eth->th", w.to(outs.dtype), outs)
            return output + (dense - dense.detach())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
