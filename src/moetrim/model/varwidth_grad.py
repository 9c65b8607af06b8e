"""Training through variable-width experts: one autograd node per layer, gradients written per block.

Letting autograd differentiate each expert's slice of the packed weights separately makes every
slice's backward allocate a zero tensor the size of the whole parameter and add into it: with 64
experts hit, 64 full-size temporaries per parameter per step (measured 45 s for one OLMoE-shaped
layer on 64 tokens, against 0.7 s for the stock grouped GEMM). Here the backward allocates each
weight gradient once and writes every expert's block in place with ``mm(out=...)``.

Layout: the routed copies of the tokens (slots) are gathered once, sorted by expert, and every
per-slot quantity lives in one buffer in that order (inputs, pre-activations, outputs and their
gradients). Each expert works on a contiguous slice; what does not depend on an expert (routing
weights, gathers, sums over a token's k slots) is one operation over all slots, and the elementwise
function and its derivative run once per group of consecutive equal-width experts (the whole layer at
0% or under uniform trimming), so that work is spread over every core instead of running on one per
small expert. A step at these sizes is bound by streaming the weights, so the backward does one kind
of product for every expert before the next (read every down projection, write every down gradient,
write every gate/up gradient, read every gate/up projection). With per-expert temporaries and per-
expert elementwise calls, the same products ran 3-6% slower than the stock grouped GEMM on 2 cores
at shapes with many small experts (Qwen1.5, Qwen3); see benchmarks/experts_module.py for the
comparison. Sums over a token's k slots are one gather and a reshape, never an index_add with
repeated indices (non-deterministic on CUDA).

The expert's elementwise function is differentiated in closed form for gated SiLU (most families),
and by autograd locally on the saved pre-activations for any other (GPT-OSS's clamped one...), so no
other activation needs a hand-written derivative.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable


class VariableWidthFunction(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]) over packed variable-width experts.

    ``top_k_index`` holds block indices (`VariableWidthExperts._to_blocks`), so every ``e`` below is an
    expert's block in storage order, and consecutive blocks of equal width form one group."""

    @staticmethod
    def forward(ctx, hidden, top_k_weights, gate_up, gate_up_bias, down_blocks, down_bias, module, top_k_index):
        order, counts, token_of_slot, weight_of_slot = module._sort(top_k_index, top_k_weights, hidden.dtype)
        groups = _groups(module, counts)
        views = module._expert_views()[0]
        x = hidden.index_select(0, token_of_slot)  # [S, H] routed copies, sorted by expert
        pre = x.new_empty(groups[-1].pre_end if groups else 0)  # every expert's pre-activations [n, rows*w], in turn
        y = torch.empty_like(x)  # every slot's expert output, before its routing weight
        acts = []  # per group: activations [slots, w]
        for grp in groups:
            for e, s, n, p, q in grp.members:
                gate_up_t, gate_up_b, _, _ = views[e]
                if gate_up_b is None:
                    torch.mm(x[s : s + n], gate_up_t, out=pre[p:q].view(n, -1))
                else:
                    torch.addmm(gate_up_b, x[s : s + n], gate_up_t, out=pre[p:q].view(n, -1))
            h = module._activate(grp.width, grp.of(pre))
            acts.append(h)
            for e, s, n, p, q in grp.members:
                _, _, down_t, down_b = views[e]
                hs = h[s - grp.start : s - grp.start + n]
                if down_b is None:
                    torch.mm(hs, down_t, out=y[s : s + n])
                else:
                    torch.addmm(down_b, hs, down_t, out=y[s : s + n])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = _sum_over_k(y.mul_(weight_of_slot[:, None]), inverse, top_k_index.shape[-1])
        ctx.save_for_backward(x, pre, token_of_slot, inverse, weight_of_slot)
        ctx.acts, ctx.groups, ctx.module = acts, groups, module
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, pre, token_of_slot, inverse, weight_of_slot = ctx.saved_tensors
        module, groups, acts = ctx.module, ctx.groups, ctx.acts
        need_x, need_w, need_gu, need_gub, need_down, need_db = ctx.needs_input_grad[:6]
        views = module._expert_views()[0]
        hdim, rows = module.hidden_dim, module._rows
        top_k = ctx.weights_shape[-1]
        g = grad_out.index_select(0, token_of_slot)  # d out / d y per slot, before the routing weight
        # Weight gradients start empty: every expert hit writes its whole block, the others are zeroed
        # (zero-filling the whole weight first was ~10% of a training step at Qwen1.5 shapes).
        g_gate_up = torch.empty_like(module.gate_up) if need_gu else None
        g_gate_up_bias = torch.empty_like(module.gate_up_bias) if need_gub else None
        g_down = torch.empty_like(module.down_blocks) if need_down else None
        g_down_bias = torch.empty_like(module.down_bias) if need_db else None
        hit = {m[0] for grp in groups for m in grp.members}
        for e in range(module.num_experts):
            if e in hit:
                continue
            o, w, r = module._blocks(e)
            for grad, block in ((g_gate_up, (r, rows * w)), (g_gate_up_bias, (r, rows * w)), (g_down, (o * hdim, w * hdim))):
                if grad is not None:
                    grad.narrow(0, *block).zero_()
            if g_down_bias is not None:
                g_down_bias[e].zero_()
        silu = module.gated and getattr(module.activation, "silu", False)
        g_pre = torch.empty_like(pre)  # d loss / d pre-activations, same layout as pre
        g_slot = torch.empty_like(weight_of_slot) if need_w else None
        for grp, h in zip(groups, acts):  # reads every down projection
            g_h = x.new_empty(grp.end - grp.start, grp.width)  # d out / d h, before the routing weight
            for e, s, n, p, q in grp.members:
                torch.mm(g[s : s + n], views[e][2].t(), out=g_h[s - grp.start : s - grp.start + n])
            if need_w:  # d out / d w = <g, y> = <g, h @ down^T + b> = <g @ down, h> + <g, b>
                torch.sum(g_h * h, 1, out=g_slot[grp.start : grp.end])
                for e, s, n, p, q in grp.members:
                    if views[e][3] is not None:
                        g_slot[s : s + n] += g[s : s + n] @ views[e][3]
            g_h.mul_(weight_of_slot[grp.start : grp.end, None])  # d loss / d h
            if silu:
                _silu_gated_backward(g_h, grp.of(pre), grp.width, out=grp.of(g_pre))
            else:
                grp.of(g_pre).copy_(_local_backward(module, grp.width, grp.of(pre), g_h))
        g.mul_(weight_of_slot[:, None])  # from here on g is d loss / d y, routing weight included
        if need_down or need_db:  # writes every down gradient: outer product of d y and h
            for grp, h in zip(groups, acts):
                for e, s, n, p, q in grp.members:
                    o, w, _ = module._blocks(e)
                    if need_down:
                        hs = h[s - grp.start : s - grp.start + n]
                        torch.mm(g[s : s + n].t(), hs, out=g_down.narrow(0, o * hdim, w * hdim).view(hdim, w))
                    if need_db:
                        torch.sum(g[s : s + n], 0, out=g_down_bias[e])
        members = [m for grp in groups for m in grp.members]
        if need_gu or need_gub:  # writes every gate/up gradient
            for e, s, n, p, q in members:
                _, w, r = module._blocks(e)
                g_gu = g_pre[p:q].view(n, -1)
                if need_gu:
                    torch.mm(g_gu.t(), x[s : s + n], out=g_gate_up.narrow(0, r, rows * w))
                if need_gub:
                    torch.sum(g_gu, 0, out=g_gate_up_bias.narrow(0, r, rows * w))
        g_hidden = None
        if need_x:  # reads every gate/up projection
            g_x = g  # d y is no longer needed: its buffer takes d x per slot
            for e, s, n, p, q in members:
                torch.mm(g_pre[p:q].view(n, -1), views[e][0].t(), out=g_x[s : s + n])
            g_hidden = _sum_over_k(g_x, inverse, top_k)
        g_weights = None
        if need_w:
            g_weights = g_slot.index_select(0, inverse).view(ctx.weights_shape).to(ctx.weights_dtype)
        return g_hidden, g_weights, g_gate_up, g_gate_up_bias, g_down, g_down_bias, None, None


class _Group(NamedTuple):
    """Consecutive experts hit that share a width: their slots [start, end) and pre-activations
    [pre_start, pre_end) are contiguous, so the elementwise function runs once over all of them."""

    width: int
    start: int
    end: int
    pre_start: int
    pre_end: int
    members: list[tuple[int, int, int, int, int]]  # (block, first slot, slots, pre-activation start, end)

    def of(self, buffer: torch.Tensor) -> torch.Tensor:
        """This group's rows [slots, rows*width] of a buffer laid out like the pre-activations."""
        return buffer[self.pre_start : self.pre_end].view(self.end - self.start, -1)


def _groups(module, counts: list[int]) -> list[_Group]:
    """The blocks hit, in storage order, in groups of consecutive equal widths (at 0% or uniform pruning one
    group; under global widths one per distinct width hit, since blocks are sorted by width)."""
    groups: list[_Group] = []
    s = p = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        w = module.block_widths[e]
        q = p + n * module._rows * w
        member = (e, s, n, p, q)
        if groups and groups[-1].width == w:
            groups[-1].members.append(member)
            groups[-1] = groups[-1]._replace(end=s + n, pre_end=q)
        else:
            groups.append(_Group(w, s, s + n, p, q, [member]))
        s, p = s + n, q
    return groups


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
