"""LoRA on fused experts inside the stock experts module, as an alternative to peft's.

peft's `target_parameters` wraps a fused [E, out, in] tensor and builds the whole E×out×in delta
(and W + ΔW) on every forward, whatever the routing. Here every expert of a stock layer gets a
zero-started rank-r correction on gate, up and down, registered as parameters on the stock module
(`gate_a`... [E, r, H], see `train/fused.py`), and the module's forward becomes one that computes
W_e x + B_e(A_e x) for the tokens routed to each expert, reading the frozen fused tensors in place:
no second copy of the experts (the earlier version built one, +60 GB for Qwen3-30B in bf16), and the
module stays the one the block calls, so hooks on it (DenseMixer's) keep firing. After training the
corrections are folded into the stock tensors (W_e += B_e A_e) and the stock forward returns, so the
output is a standard checkpoint either way. `benchmarks/lora_experts.py` times both and measures the
peak memory of a training step.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from moetrim.model.view import MoELayer, stock_expert_weights
from moetrim.train.fused import FACTORS, factors_of, routed


def _init_factors(experts: nn.Module, rank: int, hidden: int, width: int, seed: int, like: torch.Tensor) -> None:
    """Register B = 0 and A uniform in ±1/√in (peft's LoRA initialisation) on the module, drawn in
    float64 per expert in the order gate, up, down: the draws of the earlier module-swapping version,
    so a seed trains the same. Written expert by expert into the final tensors (no float64 stack)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    E = experts.num_experts
    for name, (out_dim, in_dim) in shapes.items():
        experts.register_parameter(f"{name}_a", nn.Parameter(torch.empty(E, rank, in_dim, dtype=like.dtype, device=like.device)))
        experts.register_parameter(f"{name}_b", nn.Parameter(torch.zeros(E, out_dim, rank, dtype=like.dtype, device=like.device)))
    with torch.no_grad():
        for e in range(E):
            for name, (_, in_dim) in shapes.items():
                bound = 1.0 / math.sqrt(in_dim)
                getattr(experts, f"{name}_a")[e].copy_((torch.rand(rank, in_dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound)


def _lora_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' call with their LoRA corrections (bound to the instance: a deep copy binds to the copy)."""
    return routed(self, hidden_states, top_k_index, top_k_weights, factors_of(self))


class ExpertLoRA:
    """Gives stock experts LoRA factors and a forward that uses them; `merge()` folds them back and removes them."""

    def __init__(self, layers: list[MoELayer], rank: int, seed: int = 0):
        from moetrim.model.replaced import check_replaceable

        self.modules: list[nn.Module] = []
        for layer in layers:
            experts = layer.experts
            if getattr(experts, "is_moetrim_varwidth", False) or getattr(experts, "is_moetrim_replaced", False):
                continue
            check_replaceable(layer)  # gated, no biases, no post-expert norm: what `routed` computes
            for p in experts.parameters():
                p.requires_grad_(False)
            _init_factors(experts, rank, layer.hidden_size, layer.widths[0], seed, like=layer.expert(0).up)
            experts.moetrim_lora = True
            experts.forward = types.MethodType(_lora_forward, experts)  # the instance's forward: module calls and hooks go through it
            self.modules.append(experts)

    def parameters(self) -> list[nn.Parameter]:
        return [getattr(m, name) for m in self.modules for name in FACTORS]

    @torch.no_grad()
    def merge(self) -> None:
        """W_e += B_e A_e for gate, up and down of every expert, in the stock tensors; stock forward back."""
        for experts in self.modules:
            for e in range(experts.num_experts):
                w = stock_expert_weights(experts, e)  # views into the stock storage
                w.gate.add_((experts.gate_b[e] @ experts.gate_a[e]).to(w.gate.dtype))
                w.up.add_((experts.up_b[e] @ experts.up_a[e]).to(w.up.dtype))
                w.down.add_((experts.down_b[e] @ experts.down_a[e]).to(w.down.dtype))
            for name in FACTORS:
                delattr(experts, name)
            del experts.forward, experts.moetrim_lora
        self.modules = []
