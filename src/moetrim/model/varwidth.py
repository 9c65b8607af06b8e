"""Experts of different widths in one module: packed storage, no padding, only hit experts computed.

Drop-in for a family's fused experts module: same call `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`. Storage per layer is two contiguous matrices, each expert a
contiguous block, so a forward pass slices views and never copies or pads weights:

    gate_up     [sum(2 * I_e), H]   block b = rows [2*o_b, 2*o_b + 2*I_b): its gate rows, then its up rows
    down_blocks [H * sum(I_e)]      block b = elements [H*o_b, H*(o_b + I_b)) viewed as its [H, I_b]
                                    down projection (the layout `F.linear` wants: on CPU a [n, I] @ [I, H]
                                    product with the transposed layout runs up to 4x slower for small n)

Blocks hold the experts sorted by width, widest first (layout "by_width"; ties keep expert order), so
experts of equal width sit next to each other wherever the router put them: each run of equal widths
is one [G, rows*I, H] tensor that a grouped GEMM takes as a view. Expert ids from the router are mapped
to blocks once per call. Layout "by_expert" (block = expert id) is what checkpoints written before the
sorted layout hold.

Token dispatch is sorted once per call; each expert hit runs two dense matmuls on its own width, or
one grouped GEMM per projection for a run of equal widths (training; decode on CUDA).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.model.grouped import grouped_mm_supports
from moetrim.model.varwidth_grad import VariableWidthFunction
from moetrim.model.view import ExpertWeights

VARWIDTH_KEY = "moetrim_varwidth"  # config.json (and the weight files' metadata): the per-layer widths a checkpoint rebuilds

# Dispatches whose routed copies [T*k, H] have at most this many elements (4 MiB at fp32) take the
# few-token path; larger ones avoid such buffers (see `forward`).
_SMALL_DISPATCH = 1 << 20
# Devices where such a dispatch runs each run of equal widths as grouped GEMMs. On CPU the per-expert
# weight-major products (`_weight_major_runner`) were faster: 1.09x (Qwen3-30B-A3B shapes) and 1.22x
# (OLMoE) the grouped GEMMs' speed on a full-width layer at 8 tokens, whose fallback multiplies
# token-major.
_GROUPED_DECODE_DEVICES = ("cuda",)
# Where products multiply weight-major (W @ x^T, `_weight_major_runner`), in decode and prefill alike:
# (device, dtype) pairs measured faster that way. CPU fp32 (MKL, 2 threads): one expert ran 1.25-1.9x
# as fast at prefill's 16-128 tokens per expert (a 512-token prompt at Qwen3, OLMoE, Qwen1.5 and
# Mixtral shapes), level at 512-1024, and 1.2-3x at decode's 2-16. CPU bf16 and fp16 ran weight-major
# at a quarter to a third of the speed, so they keep F.linear's x @ W^T, as CUDA does (not measured).
_WEIGHT_MAJOR = (("cpu", torch.float32),)
# There, one token's down product [H, w] @ h for w below this reads the block as [H/2, 2w] against two
# columns ([[h, 0], [0, h]]^T): short rows made MKL's matrix-vector product read the weights at 5-7 GB/s
# at widths 128-512 (H 2048) against 9-12 GB/s paired, level from 768 on.
_PAIRED_DOWN_BELOW = 768
# ... but an expert with 2 to this many rows less one multiplies token-major (x @ W^T): with torch 2.13's MKL,
# 2-3 rows read the weights weight-major at half the token-major speed (64 experts at OLMoE, Qwen3 and
# Mixtral shapes: 107-123 ms against 52-64 ms), 4-5 rows were level or token-major slightly ahead, and from
# 6-8 rows weight-major leads again (111 ms against 127-161 ms at 8). Batch-8 decode gives most experts 1-3
# rows, which is where the stock grouped GEMMs (token-major) had pulled ahead by 25-35%.
_WEIGHT_MAJOR_MIN_ROWS = 6

Activation = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
LAYOUTS = ("by_width", "by_expert")


def block_order(widths: Sequence[int], layout: str) -> list[int]:
    """Which expert each stored block holds: widest first for "by_width" (sorted() is stable, so equal
    widths keep expert order), expert order for "by_expert". Readers of the packed storage (the vLLM
    plugin) use the same rule."""
    experts = range(len(widths))
    return sorted(experts, key=lambda e: -widths[e]) if layout == "by_width" else list(experts)


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
        layout: str = "by_width",
    ):
        super().__init__()
        self.widths = [int(w) for w in widths]  # by expert id (router order)
        if any(w <= 0 for w in self.widths):
            raise ValueError("every stored expert needs a positive width; drop zero-width experts instead")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout = layout
        self.num_experts = len(self.widths)
        experts = range(self.num_experts)
        self.expert_of_block = block_order(self.widths, layout)  # block -> expert, and below expert -> block
        self.block_of_expert = [0] * self.num_experts
        for b, e in enumerate(self.expert_of_block):
            self.block_of_expert[e] = b
        self.block_widths = [self.widths[e] for e in self.expert_of_block]
        self._blocks_are_experts = self.expert_of_block == list(experts)
        self.hidden_dim = int(hidden_size)
        self.gated = gated
        self.has_gate = gated
        self.has_bias = has_bias
        self.activation = activation
        self._rows = 2 if gated else 1
        self.offsets = [0]  # per block
        for w in self.block_widths:
            self.offsets.append(self.offsets[-1] + w)
        total = self.offsets[-1]
        # maximal runs of consecutive blocks with one width: (first block, count, width). A run is one
        # [count, rows*width, H] block of storage, so a grouped GEMM can take it as a view.
        self.runs: list[tuple[int, int, int]] = []
        for e, w in enumerate(self.block_widths):
            if self.runs and self.runs[-1][2] == w:
                first, count, _ = self.runs[-1]
                self.runs[-1] = (first, count + 1, w)
            else:
                self.runs.append((e, 1, w))
        self.run_of_block = [i for i, (_, count, _) in enumerate(self.runs) for _ in range(count)]
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
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, widths={min(self.widths)}..{max(self.widths)}, "
                f"total={self.offsets[-1]}, layout={self.layout}, grouped_runs={sum(c > 1 for _, c, _ in self.runs)}")

    # -- canonical access -------------------------------------------------------------------
    def _blocks(self, b: int) -> tuple[int, int, int]:
        """(first dimension, width, first gate_up row) of block b."""
        o, w = self.offsets[b], self.block_widths[b]
        return o, w, self._rows * o

    def expert_weights(self, e: int) -> ExpertWeights:
        """Expert e's tensors (by expert id, as the router numbers it): views into the packed storage."""
        blk = self.block_of_expert[e]
        o, w, r = self._blocks(blk)
        block = self.gate_up[r : r + self._rows * w]
        gate, up = (block[:w], block[w:]) if self.gated else (None, block)
        gate_bias = up_bias = down_bias = None
        if self.has_bias:
            b = self.gate_up_bias[r : r + self._rows * w]
            gate_bias, up_bias = (b[:w], b[w:]) if self.gated else (None, b)
            down_bias = self.down_bias[blk]
        return ExpertWeights(gate, up, self._down(o, w), gate_bias, up_bias, down_bias)

    def _down(self, o: int, w: int) -> torch.Tensor:
        """Expert's down projection [H, w]: a contiguous view into ``down_blocks``."""
        return self.down_blocks.narrow(0, o * self.hidden_dim, w * self.hidden_dim).view(self.hidden_dim, w)

    @classmethod
    def from_weights(
        cls,
        experts: Sequence[ExpertWeights],
        keep_dims: Sequence[torch.Tensor],
        activation: Activation,
        *,
        gated: bool,
        has_bias: bool,
        layout: str = "by_width",
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
            layout=layout,
        )
        def put(dst: torch.Tensor, src: torch.Tensor, dim: int, keep: torch.Tensor | int) -> None:
            """Gather straight into the packed block: one copy, no expert-sized temporary. keep an int:
            the kept dimensions are the one range starting there (all of them at 0%), a plain copy
            (2.2x faster than a gather along the down block's columns at Mixtral's expert size)."""
            if isinstance(keep, int):
                dst.copy_(src.narrow(dim, keep, dst.shape[dim]))
            elif src.device == dst.device and src.dtype == dst.dtype and dst.is_contiguous():
                torch.index_select(src, dim, keep, out=dst)
            else:
                dst.copy_(src.index_select(dim, keep))

        with torch.no_grad():
            for e, (src, keep) in enumerate(zip(experts, keep_dims)):
                dst = mod.expert_weights(e)
                keep = keep.to(src.up.device)
                if int(keep[-1]) - int(keep[0]) + 1 == keep.numel():  # sorted and distinct: one range
                    keep = int(keep[0])
                if gated:
                    put(dst.gate, src.gate, 0, keep)
                put(dst.up, src.up, 0, keep)
                put(dst.down, src.down, 1, keep)
                if has_bias:
                    if gated:
                        put(dst.gate_bias, src.gate_bias, 0, keep)
                    put(dst.up_bias, src.up_bias, 0, keep)
                    dst.down_bias.copy_(src.down_bias)
        return mod

    # -- compute ----------------------------------------------------------------------------
    def __getstate__(self):  # copies and pickles never carry the view cache (it would copy weights)
        state = self.__dict__.copy()
        state.pop("_view_cache", None)
        state.pop("_block_table", None)
        return state

    def _to_blocks(self, top_k_index: torch.Tensor) -> torch.Tensor:
        """Router expert ids [T, k] -> block indices [T, k] (one small gather; none when blocks are in expert order)."""
        if self._blocks_are_experts:
            return top_k_index
        table = self.__dict__.get("_block_table")
        if table is None or table.device != top_k_index.device:
            table = torch.tensor(self.block_of_expert, dtype=torch.long, device=top_k_index.device)
            self.__dict__["_block_table"] = table
        return table[top_k_index]

    def _expert_views(self) -> tuple[list[tuple], list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Views built once: per block (gate_up^T [H, rows*I_b], its bias, down^T [I_b, H], its bias),
        and per run of two or more equal-width blocks (gate_up^T [G, H, rows*I], down^T [G, I, H]).

        Made without autograd (the training path differentiates in one node, see varwidth_grad): at
        decode sizes, making these views on every call cost ~5% of the experts' time on CPU (measured
        on Qwen3-30B-A3B shapes). The cache is keyed on the storage it views, so replacing a
        parameter (``.to()``, loading with ``assign``) rebuilds it.
        """
        key = (self.gate_up.data_ptr(), self.down_blocks.data_ptr(), self.gate_up.device, self.gate_up.dtype,
               None if self.gate_up_bias is None else self.gate_up_bias.data_ptr(),
               None if self.down_bias is None else self.down_bias.data_ptr())
        cache = self.__dict__.get("_view_cache")
        if cache is None or cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # plain views, usable outside inference mode
                views = [self._views_of(e) for e in range(self.num_experts)]
                run_views = [self._run_views(*run) if run[1] > 1 else None for run in self.runs]
            cache = (key, (views, run_views))
            self.__dict__["_view_cache"] = cache
        return cache[1]

    def _views_of(self, b: int):
        o, w, r = self._blocks(b)
        gate_up_t = self.gate_up.narrow(0, r, self._rows * w).t()
        down_t = self._down(o, w).t()
        if self.has_bias:
            return gate_up_t, self.gate_up_bias.narrow(0, r, self._rows * w), down_t, self.down_bias[b]
        return gate_up_t, None, down_t, None

    def _run_views(self, first: int, count: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        o, r, rows, h = self.offsets[first], self._rows * self.offsets[first], self._rows, self.hidden_dim
        gate_up = self.gate_up.narrow(0, r, count * rows * w).view(count, rows * w, h).transpose(1, 2)
        down = self.down_blocks.narrow(0, o * h, count * w * h).view(count, h, w).transpose(1, 2)
        return gate_up, down

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        """Whether `torch.nn.functional.grouped_mm` takes this call: no biases (its bias is one per call,
        not per group), CPU in fp32/bf16/fp16, or CUDA in bf16 on SM80 and later; 16-byte aligned (each
        run's width is checked where it is used)."""
        if self.has_bias or len(self.runs) == self.num_experts or not grouped_mm_supports(x):
            return False
        return self.gate_up.data_ptr() % 16 == 0 and self.down_blocks.data_ptr() % 16 == 0 and (self.hidden_dim * x.element_size()) % 16 == 0

    def _run_is_grouped(self, run: int, element_size: int) -> bool:
        """Whether `runs[run]` goes through grouped GEMMs where `_grouped_ok` holds: two or more blocks, and
        a width that keeps their kernels' 16-byte strides."""
        _, count, w = self.runs[run]
        return count > 1 and (w * element_size) % 16 == 0

    @staticmethod
    def _run_ends(counts: list[int], device: torch.device) -> torch.Tensor:
        """Grouped GEMM offsets of a run: the end of every block's tokens, zero-token blocks included."""
        return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)

    def _runner(self, views: list[tuple]) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """run(b, x [n, H]) -> block b's output [n, H] before routing weight, with names bound locally:
        at decode sizes this runs once per expert hit, and every lookup shows next to the matmuls."""
        act, gated, widths, mm, addmm = self.activation, self.gated, self.block_widths, torch.mm, torch.addmm

        def run(e: int, x: torch.Tensor) -> torch.Tensor:
            gate_up_t, gate_up_bias, down_t, down_bias = views[e]
            gu = mm(x, gate_up_t) if gate_up_bias is None else addmm(gate_up_bias, x, gate_up_t)
            if gated:
                w = widths[e]
                h = act(gu[:, :w], gu[:, w:])
            else:
                h = act(None, gu)
            return mm(h, down_t) if down_bias is None else addmm(down_bias, h, down_t)

        return run

    def _weight_major_runner(self, views: list[tuple]) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """run(b, x [n, H]) like `_runner`, multiplying weight-major: with `_WEIGHT_MAJOR_MIN_ROWS` or more
        tokens (and no biases) W [rows*I_b, H] @ x^T, then the down block [H, I_b] @ h, giving the output
        as a transposed view. At prefill's 16-128 rows the whole expert ran 1.25-1.9x as fast weight-major
        (CPU fp32, MKL, 2 threads). Which orientation wins at 2-5 rows moved with the stack: under an
        earlier torch weight-major read the weights 2-3x as fast there; under torch 2.13 token-major does
        (see `_WEIGHT_MAJOR_MIN_ROWS`), so those keep `_runner`'s products. One row keeps them too
        (matrix-vector products either way), but for the down product of a block narrower than
        `_PAIRED_DOWN_BELOW`."""
        token_major = self._runner(views)
        if self.has_bias:
            return token_major
        act, gated, widths, mm, hidden = self.activation, self.gated, self.block_widths, torch.mm, self.hidden_dim
        paired = hidden % 2 == 0

        def run(e: int, x: torch.Tensor) -> torch.Tensor:
            w, rows = widths[e], x.shape[0]
            one = rows == 1
            if (one and (not paired or w >= _PAIRED_DOWN_BELOW)) or 1 < rows < _WEIGHT_MAJOR_MIN_ROWS:
                return token_major(e, x)
            gate_up_t, _, down_t, _ = views[e]
            if one:
                gu = mm(x, gate_up_t)
                h = act(gu[:, :w], gu[:, w:]) if gated else act(None, gu)
                # Short rows: the down block [H, w] read as [H/2, 2w] (rows 2i and 2i+1 side by side)
                # against [[h, 0], [0, h]]^T gives [H/2, 2], which is y in order.
                return mm(down_t.t().view(hidden // 2, 2 * w), torch.block_diag(h, h).t()).view(1, hidden)
            gu = mm(gate_up_t.t(), x.t())  # [rows*I_b, n]
            h = act(gu[:w], gu[w:]) if gated else act(None, gu)
            return mm(down_t.t(), h).t()

        return run

    def _runner_for(self, views: list[tuple], x: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The faster product orientation for x's device and dtype (see `_WEIGHT_MAJOR`)."""
        if (x.device.type, x.dtype) in _WEIGHT_MAJOR:
            return self._weight_major_runner(views)
        return self._runner(views)

    def _activate(self, w: int, gu: torch.Tensor) -> torch.Tensor:
        """Intermediate activation h [n, w] of an expert of width w from its pre-activations [n, rows*w]."""
        return self.activation(gu[:, :w], gu[:, w:]) if self.gated else self.activation(None, gu)

    def _sort(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype):
        """Slots (token, k) sorted by block, once per call: (order, counts per block, token of each slot,
        routing weight of each slot). ``top_k_index`` holds block indices (see `_to_blocks`)."""
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()[: self.num_experts]
        weight_of_slot = top_k_weights.reshape(-1).index_select(0, order).to(dtype)
        return order, counts, order // top_k_index.shape[-1], weight_of_slot

    def _scatter(self, hidden_states, counts, token_of_slot, weight_of_slot) -> torch.Tensor:
        """Per expert, gather its tokens, compute (weight-major where that is faster, `_runner_for`),
        scatter-add. No [T*k, H] temporaries: buffers that large go to mmap in glibc and page-fault on
        every call, which cost ~30% of prefill time on CPU. A token meets each expert at most once, so
        no index repeats within one index_add_ (deterministic, also on CUDA); contributions are added
        in expert order."""
        run = self._runner_for(self._expert_views()[0], hidden_states)
        out = torch.zeros_like(hidden_states)
        start = 0
        for e, n in enumerate(counts):
            if n:
                tokens = token_of_slot[start : start + n]
                y = run(e, hidden_states.index_select(0, tokens))
                out.index_add_(0, tokens, y * weight_of_slot[start : start + n, None])
                start += n
        return out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (
            hidden_states.requires_grad or top_k_weights.requires_grad or any(p.requires_grad for p in self.parameters())
        ):  # training: one autograd node for the layer (see varwidth_grad)
            return VariableWidthFunction.apply(
                hidden_states, top_k_weights, self.gate_up, self.gate_up_bias, self.down_blocks, self.down_bias,
                self, self._to_blocks(top_k_index),
            )
        views, run_views = self._expert_views()
        top_k = top_k_index.shape[-1]
        dtype = hidden_states.dtype
        if hidden_states.shape[0] == 1:  # one-token decode: no dispatch to sort, just the k experts
            run = self._runner_for(views, hidden_states)
            out = None
            block_of = self.block_of_expert
            for j, e in enumerate(top_k_index[0].tolist()):
                y = run(block_of[e], hidden_states) * top_k_weights[0, j].to(dtype)
                out = y if out is None else out + y
            return out
        order, counts, token_of_slot, weight_of_slot = self._sort(self._to_blocks(top_k_index), top_k_weights, dtype)
        if order.numel() * self.hidden_dim > _SMALL_DISPATCH:
            return self._scatter(hidden_states, counts, token_of_slot, weight_of_slot)
        # Few tokens (decode): one gather, per-expert slices, one unsort and a sum over k (in slot order,
        # so deterministic on every device). A per-expert index_add_ costs ~40 us on CPU at these sizes.
        x = hidden_states.index_select(0, token_of_slot)
        grouped = self._grouped_ok(x)
        always = x.device.type in _GROUPED_DECODE_DEVICES
        run = self._runner_for(views, x)
        ys = []
        start = 0
        for i, ((first, count, w), rv) in enumerate(zip(self.runs, run_views)):
            # equal widths: one grouped GEMM per projection (token-major; on CPU where its experts average
            # fewer rows than the weight-major products want)
            if grouped and self._run_is_grouped(i, x.element_size()):
                n = sum(counts[first : first + count])
                if always or n < _WEIGHT_MAJOR_MIN_ROWS * count:
                    if n:
                        ys.append(self._grouped(x[start : start + n], counts[first : first + count], w, rv))
                        start += n
                    continue
            for e in range(first, first + count):
                n = counts[e]
                if n:
                    ys.append(run(e, x[start : start + n]))
                    start += n
        y = torch.cat(ys) * weight_of_slot[:, None]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y.index_select(0, inverse).view(-1, top_k, self.hidden_dim).sum(1)

    def _grouped(self, x: torch.Tensor, counts: list[int], w: int, views: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A run of equal-width experts on its tokens x (sorted by expert): two grouped GEMMs."""
        ends = self._run_ends(counts, x.device)
        return F.grouped_mm(self._activate(w, F.grouped_mm(x, views[0], offs=ends)), views[1], offs=ends)
