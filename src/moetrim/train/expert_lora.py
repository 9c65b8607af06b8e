"""LoRA on fused experts inside moetrim's own experts module, as an alternative to peft's.

peft's `target_parameters` wraps a fused [E, out, in] tensor and builds the whole E×out×in delta
(and W + ΔW) on every forward, whatever the routing. Here each expert of a stock layer becomes a
group of one in a `ReplacedExperts` module (its own weights as the frozen base) with a zero-started
rank-r correction, computed as B(Ax) for the tokens routed to it only. After training the
corrections are folded back into the stock tensors (W_e += B_e A_e) and the stock module returns,
so the output is a standard checkpoint either way. `benchmarks/lora_experts.py` times both.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.model.view import MoELayer, stock_expert_weights

FACTORS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


class ExpertLoRA:
    """Swaps stock experts for LoRA-carrying ones; `merge()` folds the corrections back and restores them."""

    def __init__(self, layers: list[MoELayer], rank: int, seed: int = 0):
        from moetrim.apply.replace import build_replaced

        self.swapped: list[tuple[MoELayer, nn.Module, nn.Module, str]] = []  # layer, stock, lora, attribute
        for layer in layers:
            if getattr(layer.experts, "is_moetrim_varwidth", False) or getattr(layer.experts, "is_moetrim_replaced", False):
                continue
            groups = [[e] for e in range(layer.num_experts)]
            new = build_replaced(layer, [], groups, rank, init="zero", seed=seed)
            for name, p in new.named_parameters():
                p.requires_grad_(name in FACTORS)
            name = next(c for c, m in layer.block.named_children() if m is layer.experts)
            self.swapped.append((layer, layer.experts, new, name))
            setattr(layer.block, name, new)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, _, new, _ in self.swapped for n, p in new.named_parameters() if n in FACTORS]

    @torch.no_grad()
    def merge(self) -> None:
        """W_e += B_e A_e for gate, up and down of every expert, in the stock tensors; stock modules back."""
        for layer, stock, new, name in self.swapped:
            for e in range(new.num_experts):
                m = new.member_of_expert[e]
                w = stock_expert_weights(stock, e)  # views into the stock storage
                w.gate.add_((new.gate_b[m] @ new.gate_a[m]).to(w.gate.dtype))
                w.up.add_((new.up_b[m] @ new.up_a[m]).to(w.up.dtype))
                w.down.add_((new.down_b[m] @ new.down_a[m]).to(w.down.dtype))
            setattr(layer.block, name, stock)
        self.swapped = []
