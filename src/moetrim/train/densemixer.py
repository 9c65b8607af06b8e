"""DenseMixer's straight-through router gradient (Yao et al.): sparse forward, dense router gradient.

While training, each MoE block's output becomes

    y = y_sparse(weights detached) + y_dense - stopgrad(y_dense),   y_dense = sum_e p_e * stopgrad(E_e(x))

over *all* experts e with the full router probabilities p. Its value is exactly the sparse output;
the experts get gradients only from the tokens that selected them (through y_sparse), and the router
gets the gradient it would get if every expert ran (through y_dense). Every expert runs on every
token, which is what DenseMixer costs. In eval mode nothing changes.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.model.view import MoELayer


class DenseMixer:
    """Hooks on each layer's router (keep p, detach the sparse weights) and experts (add the dense term)."""

    def __init__(self, layers: list[MoELayer]):
        self.handles = []
        self.probs: dict[int, torch.Tensor] = {}
        for layer in layers:
            self.handles.append(layer.router.register_forward_hook(self._router_hook(layer.index)))
            self.handles.append(layer.experts.register_forward_hook(self._experts_hook(layer.index, layer.num_experts)))

    def _router_hook(self, index: int):
        def hook(router: nn.Module, args, output):
            if not router.training or not torch.is_grad_enabled():
                return None
            logits, weights, top_i = output[0], output[1], output[2]
            self.probs[index] = logits.float().softmax(dim=-1)  # keeps the graph to the router
            return (logits, weights.detach(), top_i, *output[3:])
        return hook

    def _experts_hook(self, index: int, num_experts: int):
        def hook(experts: nn.Module, args, output):
            p = self.probs.pop(index, None)
            if p is None:
                return None
            hidden = args[0]
            t = hidden.shape[0]
            one = torch.ones(t, 1, dtype=hidden.dtype, device=hidden.device)
            with torch.no_grad():
                outs = torch.stack([
                    experts.forward(hidden.detach(), torch.full((t, 1), e, dtype=torch.long, device=hidden.device), one)
                    for e in range(num_experts)
                ], dim=1)  # [T, E, H]; .forward skips the hooks (this one included)
            dense = torch.einsum("te,teh->th", p.to(outs.dtype), outs)
            return output + (dense - dense.detach())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
