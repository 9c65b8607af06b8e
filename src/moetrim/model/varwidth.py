"""Experts of different widths in one module: packed storage, no padding, only hit experts computed.

Drop-in for a family's fused experts module: same call `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`. Storage per layer is two contiguous matrices, each expert a
contiguous block, so a forward pass slices views and never copies or pads weights:

    gate_up     [sum(2 * I_e), H]   expert e = rows [2*o_e, 2*o_e + 2*I_e): its gate rows, then its up rows
    down_blocks [H * sum(I_e)]      expert e = elements [H*o_e, H*(o_e + I_e)) viewed as its [H, I_e]
                                    down projection (the layout `F.linear` wants: on CPU a [n, I] @ [I, H]
                                    product with the transposed layout runs up to 4x slower for small n)

Token dispatch is sorted once per call; each expert hit runs two dense matmuls on its own width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.model.view import ExpertWeights

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


class VariableWidthExperts(nn.Module):
    """Routed experts whose intermediate widths differ (zero-width experts are not stored)."""

    is_moetrim_varwidth = True

    def __init__(
        self,
        widths: Sequence[int],
        hidden_size: int,
        activation: Activation,
        *,
        gated: bool = True,
        has_bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.widths = [int(w) for w in widths]
        if any(w <= 0 for w in self.widths):
            raise ValueError("every stored expert needs a positive width; drop zero-width experts instead")
        self.num_experts = len(self.widths)
        self.hidden_dim = int(hidden_size)
        self.gated = gated
        self.has_gate = gated
        self.has_bias = has_bias
        self.activation = activation
        self._rows = 2 if gated else 1
        self.offsets = [0]
        for w in self.widths:
            self.offsets.append(self.offsets[-1] + w)
        total = self.offsets[-1]
        kw = {"dtype": dtype, "device": device}
        self.gate_up = nn.Parameter(torch.empty(self._rows * total, self.hidden_dim, **kw))
        self.down_blocks = nn.Parameter(torch.empty(total * self.hidden_dim, **kw))
        if has_bias:
            self.gate_up_bias = nn.Parameter(torch.empty(self._rows * total, **kw))
            self.down_bias = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, **kw))
        else:
            self.gate_up_bias = None
            self.down_bias = None

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, widths={min(self.widths)}..{max(self.widths)}, total={self.offsets[-1]}"

    # -- canonical access -------------------------------------------------------------------
    def _blocks(self, e: int) -> tuple[int, int, int]:
        o, w = self.offsets[e], self.widths[e]
        return o, w, self._rows * o

    def expert_weights(self, e: int) -> ExpertWeights:
        o, w, r = self._blocks(e)
        block = self.gate_up[r : r + self._rows * w]
        gate, up = (block[:w], block[w:]) if self.gated else (None, block)
        gate_bias = up_bias = down_bias = None
        if self.has_bias:
            b = self.gate_up_bias[r : r + self._rows * w]
            gate_bias, up_bias = (b[:w], b[w:]) if self.gated else (None, b)
            down_bias = self.down_bias[e]
        return ExpertWeights(gate, up, self._down(o, w), gate_bias, up_bias, down_bias)

    def _down(self, o: int, w: int) -> torch.Tensor:
        """Expert's down projection [H, w]: a contiguous view into ``down_blocks``."""
        return self.down_blocks[o * self.hidden_dim : (o + w) * self.hidden_dim].view(self.hidden_dim, w)

    @classmethod
    def from_weights(
        cls,
        experts: Sequence[ExpertWeights],
        keep_dims: Sequence[torch.Tensor],
        activation: Activation,
        *,
        gated: bool,
        has_bias: bool,
    ) -> "VariableWidthExperts":
        """Pack the kept dimensions (sorted index tensors) of each given expert into one module."""
        ref = experts[0]
        mod = cls(
            [len(k) for k in keep_dims],
            ref.up.shape[1],
            activation,
            gated=gated,
            has_bias=has_bias,
            dtype=ref.up.dtype,
            device=ref.up.device,
        )
        with torch.no_grad():
            for e, (src, keep) in enumerate(zip(experts, keep_dims)):
                dst = mod.expert_weights(e)
                keep = keep.to(src.up.device)
                if gated:
                    dst.gate.copy_(src.gate.index_select(0, keep))
                dst.up.copy_(src.up.index_select(0, keep))
                dst.down.copy_(src.down.index_select(1, keep))
                if has_bias:
                    if gated:
                        dst.gate_bias.copy_(src.gate_bias.index_select(0, keep))
                    dst.up_bias.copy_(src.up_bias.index_select(0, keep))
                    dst.down_bias.copy_(src.down_bias)
        return mod

    # -- compute ----------------------------------------------------------------------------
    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Output of expert e (before routing weight) for tokens x [n, H]."""
        o, w, r = self._blocks(e)
        bias = self.gate_up_bias[r : r + self._rows * w] if self.has_bias else None
        gu = F.linear(x, self.gate_up[r : r + self._rows * w], bias)
        h = self.activation(gu[:, :w], gu[:, w:]) if self.gated else self.activation(None, gu)
        y = F.linear(h, self._down(o, w))
        if self.has_bias:
            y = y + self.down_bias[e]
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k = top_k_index.shape[-1]
        if hidden_states.shape[0] == 1:  # one-token decode: no dispatch to sort, just the k experts
            out = None
            for j, e in enumerate(top_k_index[0].tolist()):
                y = self.expert_forward(e, hidden_states) * top_k_weights[0, j].to(hidden_states.dtype)
                out = y if out is None else out + y
            return out
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of_slot = order // top_k
        weight_of_slot = top_k_weights.reshape(-1).index_select(0, order).to(hidden_states.dtype)
        # Per expert: gather its tokens, compute, scatter-add. No [T*k, H] temporaries: buffers that large
        # go to mmap in glibc and page-fault on every call, which cost ~30% of prefill time on CPU. A token
        # meets each expert at most once, so no index repeats within one index_add_ (deterministic, also
        # on CUDA); contributions are added in expert order.
        out = torch.zeros_like(hidden_states)
        start = 0
        for e, n in enumerate(counts[: self.num_experts]):
            if n:
                tokens = token_of_slot[start : start + n]
                y = self.expert_forward(e, hidden_states.index_select(0, tokens))
                out.index_add_(0, tokens, y * weight_of_slot[start : start + n, None])
                start += n
        return out
