"""Training through variable-width experts: one autograd node per layer, gradients written per block.

Letting autograd differentiate each expert's slice of the packed weights separately makes every
slice's backward allocate a zero tensor the size of the whole parameter and add into it: with 64
experts hit, 64 full-size temporaries per parameter per step (measured 45 s for one OLMoE-shaped
layer on 64 tokens, against 0.7 s for the stock grouped GEMM). Here the backward allocates each
weight gradient once and writes every expert's block in place (grouped GEMMs or ``mm(out=...)``).

Layout: the routed copies of the tokens (slots) are gathered once, sorted by block, and every
per-slot quantity is one buffer per group of consecutive equal-width blocks (inputs, pre-activations,
outputs and their gradients). What does not depend on an expert (routing weights, gathers, sums over a
token's k slots) is one operation over all slots, and the elementwise function and its derivative run
once per group (the whole layer at 0% or under uniform trimming), so that work is spread over every
core instead of running on one per small expert.

A group that is one run of storage (`VariableWidthExperts.runs`: blocks are sorted by width, so every
width is one run) takes one `torch.nn.functional.grouped_mm` per product: forward, the input's
gradient, and the weight gradients in its 2D x 2D form (the slot dimension split by the same offsets),
whose result is the run's gradient blocks in storage layout: the gradient itself when the run is the
whole layer, else one copy into it. Per-expert `mm(out=...)` products remain for what grouped GEMMs do
not take (biases, float64, widths that break 16-byte strides, runs of one): at shapes with many small
experts (Qwen3-30B-A3B: 128 experts of ~16 slots each in a 256-token step) the per-expert loop was
the slower one on 2 CPU cores. A step at these sizes is bound by streaming the weights, so the
backward does one kind of product for every expert before the next (read every down projection,
write every down gradient, write every gate/up gradient, read every gate/up projection); see
benchmarks/experts_module.py for the comparison with the stock module. Sums over a token's k slots
are one gather and a reshape, never an index_add with repeated indices (non-deterministic on CUDA).

The expert's elementwise function is differentiated in closed form for gated SiLU (most families),
and by autograd locally on the saved pre-activations for any other (GPT-OSS's clamped one...), so no
other activation needs a hand-written derivative.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class VariableWidthFunction(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]) over packed variable-width experts.

    ``top_k_index`` holds block indices (`VariableWidthExperts._to_blocks`), so every ``e`` below is an
    expert's block in storage order, and consecutive blocks of equal width form one group."""

    @staticmethod
    def forward(ctx, hidden, top_k_weights, gate_up, gate_up_bias, down_blocks, down_bias, module, top_k_index):
        order, counts, token_of_slot, weight_of_slot = module._sort(top_k_index, top_k_weights, hidden.dtype)
        groups = _groups(module, counts, grouped=module._grouped_ok(hidden))
        views, run_views = module._expert_views()
        x = hidden.index_select(0, token_of_slot)  # [S, H] routed copies, sorted by expert
        pres, acts, ys = [], [], []  # per group: pre-activations [slots, rows*w], activations [slots, w], outputs [slots, H]
        for grp in groups:
            xg = x[grp.start : grp.end]
            if grp.offs is not None:
                gate_up_t, down_t = run_views[grp.run]
                pre = F.grouped_mm(xg, gate_up_t, offs=grp.offs)
                h = module._activate(grp.width, pre)
                y = F.grouped_mm(h, down_t, offs=grp.offs)
            else:
                pre = x.new_empty(grp.end - grp.start, module._rows * grp.width)
                _per_block(grp, xg, pre, lambda e: views[e][0], lambda e: views[e][1])
                h = module._activate(grp.width, pre)
                y = _per_block(grp, h, torch.empty_like(xg), lambda e: views[e][2], lambda e: views[e][3])
            pres.append(pre)
            acts.append(h)
            ys.append(y)
        y = _joined(ys, x)  # every slot's expert output, before its routing weight
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = _sum_over_k(y.mul_(weight_of_slot[:, None]), inverse, top_k_index.shape[-1])
        ctx.save_for_backward(x, token_of_slot, inverse, weight_of_slot)
        ctx.pres, ctx.acts, ctx.groups, ctx.module = pres, acts, groups, module
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, token_of_slot, inverse, weight_of_slot = ctx.saved_tensors
        module, groups, pres, acts = ctx.module, ctx.groups, ctx.pres, ctx.acts
        need_x, need_w, need_gu, need_gub, need_down, need_db = ctx.needs_input_grad[:6]
        views, run_views = module._expert_views()
        top_k = ctx.weights_shape[-1]
        g = grad_out.index_select(0, token_of_slot)  # d out / d y per slot, before the routing weight
        # Weight gradients start empty: every expert hit gets its whole block written, the others are
        # zeroed at the end (zero-filling the whole weight first was ~10% of a training step at Qwen1.5
        # shapes). Where one grouped run is the whole layer, its products are the gradients themselves.
        whole = len(module.runs) == 1 and bool(groups) and groups[0].offs is not None
        g_gate_up = torch.empty_like(module.gate_up) if need_gu and not whole else None
        g_gate_up_bias = torch.empty_like(module.gate_up_bias) if need_gub else None
        g_down = torch.empty_like(module.down_blocks) if need_down and not whole else None
        g_down_bias = torch.empty_like(module.down_bias) if need_db else None
        silu = module.gated and getattr(module.activation, "silu", False)
        g_pres = []  # per group: d loss / d pre-activations
        g_slot = torch.empty_like(weight_of_slot) if need_w else None
        for grp, pre, h in zip(groups, pres, acts):  # reads every down projection
            gg = g[grp.start : grp.end]
            if grp.offs is not None:
                g_h = F.grouped_mm(gg, run_views[grp.run][1].transpose(1, 2), offs=grp.offs)
            else:
                g_h = _per_block(grp, gg, x.new_empty(grp.end - grp.start, grp.width), lambda e: views[e][2].t())
            if need_w:  # d out / d w = <g, y> = <g, h @ down^T + b> = <g @ down, h> + <g, b>
                torch.sum(g_h * h, 1, out=g_slot[grp.start : grp.end])
                for e, s, n in grp.local():
                    if views[e][3] is not None:
                        g_slot[grp.start + s : grp.start + s + n] += gg[s : s + n] @ views[e][3]
            g_h.mul_(weight_of_slot[grp.start : grp.end, None])  # d loss / d h
            if silu:
                g_pres.append(_silu_gated_backward(g_h, pre, grp.width))
            else:
                g_pres.append(_local_backward(module, grp.width, pre, g_h))
        g.mul_(weight_of_slot[:, None])  # from here on g is d loss / d y, routing weight included
        xs = [x[grp.start : grp.end] for grp in groups]
        gs = [g[grp.start : grp.end] for grp in groups]
        # d W per block = left^T @ right over its slots, d bias = the column sums of left
        if need_down or need_db:  # writes every down gradient: outer product of d y and h
            g_down = _weight_grads(module, groups, gs, acts, g_down, g_down_bias, "down", need_down)
        if need_gu or need_gub:  # writes every gate/up gradient: outer product of d pre-activations and x
            g_gate_up = _weight_grads(module, groups, g_pres, xs, g_gate_up, g_gate_up_bias, "gate_up", need_gu)
        g_hidden = None
        if need_x:  # reads every gate/up projection
            g_xs = []
            for grp, g_pre in zip(groups, g_pres):
                if grp.offs is not None:
                    g_xs.append(F.grouped_mm(g_pre, run_views[grp.run][0].transpose(1, 2), offs=grp.offs))
                    continue
                # d y is no longer needed: its buffer takes d x per slot
                g_xs.append(_per_block(grp, g_pre, g[grp.start : grp.end], lambda e: views[e][0].t()))
            g_hidden = _sum_over_k(_joined(g_xs, g, in_place=True), inverse, top_k)
        hit = {m[0] for grp in groups for m in grp.members}
        for e in range(module.num_experts):  # blocks no token reached have zero gradient
            if e in hit:
                continue
            for grad, bias, kind in ((g_gate_up, g_gate_up_bias, "gate_up"), (g_down, g_down_bias, "down")):
                if grad is not None:
                    _block(module, grad, e, kind).zero_()
                if bias is not None:
                    _block(module, bias, e, kind, bias=True).zero_()
        g_weights = None
        if need_w:
            g_weights = g_slot.index_select(0, inverse).view(ctx.weights_shape).to(ctx.weights_dtype)
        return g_hidden, g_weights, g_gate_up, g_gate_up_bias, g_down, g_down_bias, None, None


class _Group(NamedTuple):
    """Consecutive experts hit that share a width: their slots [start, end) are contiguous, so the
    elementwise function runs once over all of them. ``offs`` is set where the group is one run of
    storage (`VariableWidthExperts.runs`) that takes grouped GEMMs: the end of every block's slots in
    that run, zero-token blocks included."""

    width: int
    start: int
    end: int
    members: list[tuple[int, int, int]]  # (block, first slot, slots)
    run: int | None = None
    offs: torch.Tensor | None = None

    def local(self):
        """(block, first slot within the group, slots) of every member."""
        return [(e, s - self.start, n) for e, s, n in self.members]

    def run_span(self, module, param: str) -> tuple[int, int, tuple[int, ...]]:
        """(start, length along dim 0, block shape) of this group's run in packed ``param``: "down"
        (flat, each block [H, w]) or "gate_up" (rows, each block [rows*w, H])."""
        first, count, w = module.runs[self.run]
        o, h = module.offsets[first], module.hidden_dim
        if param == "down":
            return o * h, count * w * h, (count, h, w)
        return module._rows * o, count * module._rows * w, (count, module._rows * w, h)


def _groups(module, counts: list[int], grouped: bool = False) -> list[_Group]:
    """The blocks hit, in storage order, in groups of consecutive equal widths (at 0% or uniform pruning one
    group; under global widths one per distinct width hit, since blocks are sorted by width). With
    ``grouped``, each group that is one run of two or more blocks with 16-byte strides gets its offsets."""
    groups: list[_Group] = []
    s = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        w = module.block_widths[e]
        member = (e, s, n)
        if groups and groups[-1].width == w:
            groups[-1].members.append(member)
            groups[-1] = groups[-1]._replace(end=s + n)
        else:
            groups.append(_Group(w, s, s + n, [member]))
        s += n
    if not grouped:
        return groups
    size = module.gate_up.element_size()
    for i, grp in enumerate(groups):
        run = module.run_of_block[grp.members[0][0]]
        if module.run_of_block[grp.members[-1][0]] == run and module._run_is_grouped(run, size):
            first, count, _ = module.runs[run]
            groups[i] = grp._replace(run=run, offs=module._run_ends(counts[first : first + count], module.gate_up.device))
    return groups


def _per_block(grp: _Group, left: torch.Tensor, out: torch.Tensor, weight_of, bias_of=None) -> torch.Tensor:
    """out[s:s+n] = left[s:s+n] @ weight_of(e) (+ bias_of(e)) for every block e of a group that runs
    expert by expert (its slots [s, s+n) counted from the group's first)."""
    for e, s, n in grp.local():
        bias = None if bias_of is None else bias_of(e)
        if bias is None:
            torch.mm(left[s : s + n], weight_of(e), out=out[s : s + n])
        else:
            torch.addmm(bias, left[s : s + n], weight_of(e), out=out[s : s + n])
    return out


def _block(module, grad: torch.Tensor, e: int, kind: str, bias: bool = False) -> torch.Tensor:
    """Block e's region of a packed gradient: "down" [H, w] (its bias [H]) or "gate_up" [rows*w, H] (its bias [rows*w])."""
    o, w, r = module._blocks(e)
    if kind == "down":
        return grad[e] if bias else grad.narrow(0, o * module.hidden_dim, w * module.hidden_dim).view(module.hidden_dim, w)
    return grad.narrow(0, r, module._rows * w)


def _weight_grads(module, groups, lefts, rights, grad, bias_grad, kind: str, need: bool):
    """Every hit block's weight gradient left^T @ right over its slots (if ``need``; one grouped GEMM per
    grouped run, which never has biases) and its bias gradient, the column sums of left (if ``bias_grad``
    is given); returns the weight gradient (the grouped result itself where the run is the whole
    parameter: ``grad`` is None then)."""
    param = module.down_blocks if kind == "down" else module.gate_up
    for grp, left, right in zip(groups, lefts, rights):
        if grp.offs is not None:
            if need:
                grad = _put(grad, F.grouped_mm(left.t(), right, offs=grp.offs), grp.run_span(module, kind), param)
            continue
        for e, s, n in grp.local():
            if need:
                torch.mm(left[s : s + n].t(), right[s : s + n], out=_block(module, grad, e, kind))
            if bias_grad is not None:
                torch.sum(left[s : s + n], 0, out=_block(module, bias_grad, e, kind, bias=True))
    return grad


def _put(grad: torch.Tensor | None, result: torch.Tensor, span: tuple[int, int, tuple[int, ...]], param: torch.Tensor) -> torch.Tensor:
    """Place a grouped product's result (a run's gradient blocks) into ``param``'s packed gradient:
    the result itself where the run is the whole parameter (``grad`` is None then), else one copy
    into the run's region."""
    if grad is None:
        return result.reshape(param.shape)
    start, length, shape = span
    grad.narrow(0, start, length).view(shape).copy_(result)
    return grad


def _joined(parts: list[torch.Tensor], like: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Per-group [slots, H] results as one [S, H] tensor in slot order: the part itself when there is one
    group covering every slot, else the parts copied into one buffer (``like`` itself with ``in_place``,
    skipping parts that are already views of it)."""
    if len(parts) == 1 and parts[0].shape == like.shape:
        return parts[0]
    out = like if in_place else torch.empty_like(like)
    start = 0
    for part in parts:
        n = part.shape[0]
        if not (in_place and part.data_ptr() == out[start:].data_ptr()):
            out[start : start + n].copy_(part)
        start += n
    return out


def _sum_over_k(per_slot: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """[S, H] in sorted slot order -> [T, H]: each token's k slots summed, in slot order (deterministic)."""
    return per_slot.index_select(0, inverse).view(-1, top_k, per_slot.shape[-1]).sum(1)


def _silu_gated_backward(g_h: torch.Tensor, gu: torch.Tensor, w: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d [gate | up] for h = silu(gate) * up, written into one [n, 2w] tensor."""
    gate, up = gu[:, :w], gu[:, w:]
    g_gu = torch.empty_like(gu) if out is None else out
    torch.mul(g_h, torch.nn.functional.silu(gate), out=g_gu[:, w:])
    g_gu[:, :w] = torch.ops.aten.silu_backward(g_h.mul_(up), gate)
    return g_gu


def _local_backward(module, w: int, gu: torch.Tensor, g_h: torch.Tensor) -> torch.Tensor:
    """d loss / d pre-activations for any activation: autograd through it, on the saved inputs."""
    with torch.enable_grad():
        gu = gu.detach().requires_grad_(True)
        (g_gu,) = torch.autograd.grad(module._activate(w, gu), gu, g_h)
    return g_gu
