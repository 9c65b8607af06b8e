"""A stock fused experts module computed from its own tensors, with optional per-expert low-rank factors.

Training methods that change what the experts compute (expert LoRA) or run them in another pattern
(DenseMixer's every-expert pass) read the fused tensors `gate_up_proj` and `down_proj` in place: no
expert is copied. Two shapes of work:

* `routed`: the module's own call, `experts(x, top_k_index, top_k_weights)`; the routed slots are
  sorted by expert and every product is one grouped GEMM over all experts (as transformers'
  `grouped_mm` implementation does), with a LoRA correction B_e(A_e x) on gate, up and down;
* `dense`: every expert on every token, [E, T, H], as batched matmuls over the expert dimension.

Neither reads a value back to the host, except the per-expert loop that stands in for a grouped GEMM
the kernel refuses (float64, widths or ranks whose rows are not a multiple of 16 bytes, or no
`grouped_mm` in this torch): it needs the slot counts per expert, read once per call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FACTORS = ("gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


class Factors(NamedTuple):
    """Per-expert LoRA factors: gate_a/up_a [E, r, H], gate_b/up_b [E, I, r], down_a [E, r, I], down_b [E, H, r]."""

    gate_a: torch.Tensor
    gate_b: torch.Tensor
    up_a: torch.Tensor
    up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor


def factors_of(experts: nn.Module) -> Factors | None:
    """The LoRA factors `ExpertLoRA` registered on a stock experts module, or None."""
    if not getattr(experts, "moetrim_lora", False):
        return None
    return Factors(*(getattr(experts, name) for name in FACTORS))


def projections(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up or up as [E, H, out], down as [E, I, H]): views of the stored tensors, x @ w orientation."""
    up = experts.gate_up_proj if getattr(experts, "has_gate", True) else experts.up_proj
    down = experts.down_proj
    if getattr(experts, "is_transposed", False):
        return up, down
    return up.transpose(1, 2), down.transpose(1, 2)


def activate(experts: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """The module's own elementwise step on pre-activations in its stored layout (concatenated or
    interleaved gate/up, GPT-OSS's clamped gate...)."""
    return experts._apply_gate(pre) if getattr(experts, "has_gate", True) else experts.act_fn(pre)


def _gate_up_delta(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gate and up corrections laid out like the module's gate_up rows (concatenated or interleaved)."""
    if getattr(experts, "is_concatenated", True):
        return torch.cat([gate, up], dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


class Groups:
    """Slots sorted by expert: offsets for grouped GEMMs, counts read to the host only if a fallback asks."""

    def __init__(self, counts: torch.Tensor):
        self.offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        self._ends: list[int] | None = None

    def ends(self) -> list[int]:
        if self._ends is None:
            self._ends = self.offs.tolist()  # the fallback's one host sync per call (see the module docstring)
        return self._ends


_GROUPED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes x [S, in] @ w [E, in, out]: its dtypes per device (CUDA: SM80 and
    later), rows of a multiple of 16 bytes, 16-byte aligned data."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.dtype not in _GROUPED_DTYPES.get(x.device.type, ()):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    size = x.element_size()
    return all(n * size % 16 == 0 for n in w.shape[1:]) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def _contiguous_grad(y: torch.Tensor) -> torch.Tensor:
    """grouped_mm's backward refuses expanded or strided gradients (e.g. the gradient of a plain sum)."""
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


def gmm(x: torch.Tensor, w: torch.Tensor, groups: Groups) -> torch.Tensor:
    """x [S, in] (slots sorted by expert) @ w[e] [in, out] for each expert's run of slots -> [S, out]."""
    x = x.to(w.dtype)
    if _grouped_ok(x, w):
        return _contiguous_grad(F.grouped_mm(x, w, offs=groups.offs))
    parts, start = [], 0
    for e, end in enumerate(groups.ends()):
        if end > start:
            parts.append(x[start:end] @ w[e])
        start = end
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[2])


def _low_rank(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    """B_e (A_e x) per slot: a [E, r, in], b [E, out, r]."""
    return gmm(gmm(x, a.transpose(1, 2), groups), b.transpose(1, 2), groups)


def routed(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
           factors: Factors | None = None) -> torch.Tensor:
    """The experts module's output [T, H] for the routed slots, with W_e + B_e A_e where factors are given.
    Gated experts without biases or post-expert norms (what `ExpertLoRA` accepts)."""
    T, k = top_k_index.shape
    E = experts.num_experts
    flat = top_k_index.reshape(-1)
    expert_of_slot, order = torch.sort(flat, stable=True)
    # histc: fixed bins, so no data-dependent output size (bincount reads the maximum back to the host)
    counts = torch.histc(expert_of_slot.float() if flat.device.type == "cpu" else expert_of_slot.int(), bins=E, min=0, max=E - 1)
    groups = Groups(counts)
    gate_up_w, down_w = projections(experts)
    x = hidden.index_select(0, order // k).to(gate_up_w.dtype)
    pre = gmm(x, gate_up_w, groups)
    if factors is not None:
        pre = pre + _gate_up_delta(experts, _low_rank(x, factors.gate_a, factors.gate_b, groups),
                                   _low_rank(x, factors.up_a, factors.up_b, groups))
    h = activate(experts, pre)
    out = gmm(h, down_w, groups)
    if factors is not None:
        out = out + _low_rank(h, factors.down_a, factors.down_b, groups)
    out = out * top_k_weights.reshape(-1)[order].to(out.dtype).unsqueeze(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out[inverse].view(T, k, -1).sum(dim=1).to(hidden.dtype)


def dense(experts: nn.Module, hidden: torch.Tensor, factors: Factors | None = None) -> torch.Tensor:
    """Every expert on every token, [E, T, H] (routing weight 1): batched matmuls over the expert
    dimension, the module's biases, elementwise step and post-expert norm as its own forward has them."""
    gate_up_w, down_w = projections(experts)
    x = hidden.to(gate_up_w.dtype)
    pre = torch.matmul(x, gate_up_w)  # [T, H] @ [E, H, out] -> [E, T, out]
    if getattr(experts, "has_bias", False):
        pre = pre + (experts.gate_up_proj_bias if getattr(experts, "has_gate", True) else experts.up_proj_bias).unsqueeze(1)
    if factors is not None:
        gate = torch.matmul(torch.matmul(x, factors.gate_a.transpose(1, 2)), factors.gate_b.transpose(1, 2))
        up = torch.matmul(torch.matmul(x, factors.up_a.transpose(1, 2)), factors.up_b.transpose(1, 2))
        pre = pre + _gate_up_delta(experts, gate, up)
    h = activate(experts, pre)
    out = torch.matmul(h, down_w)
    if factors is not None:
        out = out + torch.matmul(torch.matmul(h, factors.down_a.transpose(1, 2)), factors.down_b.transpose(1, 2))
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias.unsqueeze(1)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out
