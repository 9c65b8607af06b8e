"""Instrumentation: what runs inside each MoE layer while calibration data flows through the model.

Per-expert and per-dimension activations never pass through a submodule a forward hook could see,
so during calibration each layer's experts module is swapped for `ProfilingExperts`, which computes
the same function from the original weights (no copy) and records statistics on the way. The
router gets a plain forward hook for router probabilities. Everything is undone on exit.

Fisher: a multiplicative mask m of ones, shape [B, E, I], one copy per sequence in the batch, is
applied to the intermediate activation h. Only the masks require gradients, so one backward of
Σ_s L_s gives every per-sequence gradient ∂L_s/∂m at once (sequences do not interact).

Models placed over devices by accelerate: each recorder's sums and masks live on its layer's
device, and ProfilingExperts runs the original experts module's accelerate hook around its own
forward, so weights kept offloaded (on meta until the hook brings them in) are there when it reads
them. Under gradient checkpointing a layer's forward runs again in backward; a recorder then
records only the first run of each batch (`once_per_batch`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moetrim.model.view import MoELayer


class LayerRecorder:
    """Running sums of one MoE layer (float64 accumulators on the layer's device)."""

    def __init__(
        self, layer: MoELayer, device: torch.device, gradients: bool, fisher_mode: str = "sequence", grad_magnitude: bool = False,
        whiten: bool = False, dense_outputs: bool = False,
    ):
        widths = set(layer.widths)
        if len(widths) != 1:
            raise ValueError("calibrate the original model: its experts must all have one width")
        self.layer = layer
        self.E = layer.num_experts
        self.I = widths.pop()
        self.gradients = gradients
        self.fisher_mode = fisher_mode
        self.want_grad_magnitude = gradients and grad_magnitude
        f64 = {"dtype": torch.float64, "device": device}
        E, I = self.E, self.I
        self.tokens = torch.zeros((), **f64)
        self.prob_sum = torch.zeros(E, **f64)
        self.moments = torch.zeros(E, 3, 3, **f64)
        self.act_abs_sum = torch.zeros(E, I, **f64)
        self.act_sq_sum = torch.zeros(E, I, **f64)
        self.act_abs_max = torch.zeros(E, I, dtype=torch.float32, device=device)
        self.gated_act_abs_sum = torch.zeros(E, I, **f64)
        self.gated_act_sq_sum = torch.zeros(E, I, **f64)
        self.gated_act_abs_max = torch.zeros(E, I, dtype=torch.float32, device=device)
        H = layer.hidden_size
        self.out_sum = torch.zeros(E, H, **f64)
        self.gated_out_sum = torch.zeros(E, H, **f64)  # REAM's output signature
        self.logit_gram = torch.zeros(E, E, **f64)  # REAM's router signature: Σ l lᵀ of the raw router logits, every token
        self.in_gram = torch.zeros(E, H, H, **f64) if whiten else None  # E·H²·8 bytes: 2 GiB per OLMoE layer
        self.mid_gram = torch.zeros(E, I, I, **f64) if whiten else None  # down_proj's inputs: E·I²·8 bytes
        self.dense_out_sum = torch.zeros(E, H, **f64) if dense_outputs else None  # every expert on every token
        if gradients:
            self.taylor = torch.zeros(E, I, **f64)
            self.fisher = torch.zeros(E, I, **f64)
        if self.want_grad_magnitude:
            self.grad_magnitude = torch.zeros(E, I, **f64)
        self.mask: torch.Tensor | None = None
        self.seq_len = 1
        self.device = torch.device(device)
        self.once_per_batch = False  # set under gradient checkpointing: the recompute in backward must not record again
        self.seen_router = self.seen_experts = False

    # -- per batch ------------------------------------------------------------------------
    def start_batch(self, batch_size: int, seq_len: int, device: torch.device | None = None) -> None:
        self.seq_len = seq_len
        self.seen_router = self.seen_experts = False
        if self.gradients:
            copies = batch_size if self.fisher_mode == "sequence" else 1
            self.mask = torch.ones(copies, self.E, self.I, dtype=torch.float32, device=device or self.device, requires_grad=True)

    def finish_batch(self) -> None:
        if self.mask is not None and self.mask.grad is not None:
            g = self.mask.grad.double()
            self.taylor += g.sum(0)
            self.fisher += (g * g).sum(0)
        self.mask = None

    # -- statistics -----------------------------------------------------------------------
    @torch.no_grad()
    def record_router(self, logits: torch.Tensor) -> None:
        if self.once_per_batch and self.seen_router:
            return
        self.seen_router = True
        flat = logits.detach().reshape(-1, self.E)
        probs = self.layer.router_probs(flat)
        self.prob_sum += probs.sum(0).double().to(self.prob_sum.device)
        wide = flat.double().to(self.logit_gram.device)
        self.logit_gram += wide.T @ wide
        self.tokens += probs.shape[0]

    @torch.no_grad()
    def record_experts(
        self, h: torch.Tensor, y: torch.Tensor, g: torch.Tensor, expert_of_slot: torch.Tensor, x: torch.Tensor | None = None
    ) -> None:
        """Per slot (sorted by expert): h [n, I], output y [n, H] before gating, weight g [n], input x [n, H]."""
        a = h.detach().float().abs()
        E, I = self.E, self.I
        idx = expert_of_slot
        zeros = a.new_zeros(E, I)
        self.act_abs_sum += zeros.index_add(0, idx, a).double()
        self.act_sq_sum += zeros.index_add(0, idx, a * a).double()
        gf = g.detach().float()
        ga = a * gf.unsqueeze(-1)
        self.gated_act_abs_sum += zeros.index_add(0, idx, ga).double()
        self.gated_act_sq_sum += zeros.index_add(0, idx, ga * ga).double()
        spread = idx.unsqueeze(-1).expand(-1, I)
        torch.maximum(self.act_abs_max, zeros.scatter_reduce(0, spread, a, reduce="amax", include_self=True), out=self.act_abs_max)
        torch.maximum(self.gated_act_abs_max, zeros.scatter_reduce(0, spread, ga, reduce="amax", include_self=True),
                      out=self.gated_act_abs_max)
        norms = y.detach().float().norm(dim=-1).double()
        gd = gf.double()
        feats = torch.stack([gd.pow(b) * norms.pow(p) for b in range(3) for p in range(3)], dim=-1)
        self.moments += norms.new_zeros(E, 9).index_add(0, idx, feats).view(E, 3, 3)
        yw = _wide(y.detach())
        self.out_sum += yw.new_zeros(E, yw.shape[1]).index_add(0, idx, yw).double()
        self.gated_out_sum += yw.new_zeros(E, yw.shape[1]).index_add(0, idx, yw * gf.to(yw.dtype).unsqueeze(-1)).double()
        if self.in_gram is not None and x is not None:
            xw, hw = _wide(x.detach()), _wide(h.detach())
            ends = torch.bincount(idx, minlength=E).cumsum(0).tolist()
            for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
                if end > start:
                    self.in_gram[e] += (xw[start:end].T @ xw[start:end]).double()
                    self.mid_gram[e] += (hw[start:end].T @ hw[start:end]).double()

    @torch.no_grad()
    def record_dense(self, e: int, y: torch.Tensor) -> None:
        """Expert e's outputs y [T, H] (before gating) on every token of the batch, routed to it or not."""
        self.dense_out_sum[e] += _wide(y.detach()).sum(dim=0).double()

    def grad_magnitude_hooks(
        self, e: int, x: torch.Tensor, gu: torch.Tensor, h: torch.Tensor, y: torch.Tensor, seq: torch.Tensor, interleaved: bool
    ) -> None:
        """Per-sequence Σ|∂L_s/∂W| over each dimension's gate row, up row and down column of expert e."""
        runs = torch.unique_consecutive(seq, return_counts=True)[1].tolist()
        x = x.detach().float()
        h_det = h.detach().float()
        width = self.I
        acc = self.grad_magnitude

        def on_gu(grad: torch.Tensor) -> None:
            grad = grad.float()
            if interleaved:
                parts = (grad[:, 0::2], grad[:, 1::2]) if grad.shape[1] == 2 * width else (grad,)
            else:
                parts = (grad[:, :width], grad[:, width:]) if grad.shape[1] == 2 * width else (grad,)
            total = torch.zeros(width, dtype=torch.float64, device=grad.device)
            for part in parts:
                for dp, xp in zip(part.split(runs), x.split(runs)):
                    total += (dp.t() @ xp).abs().sum(1).double()
            acc[e] += total

        def on_y(grad: torch.Tensor) -> None:
            grad = grad.float()
            total = torch.zeros(width, dtype=torch.float64, device=grad.device)
            for dy, hp in zip(grad.split(runs), h_det.split(runs)):
                total += (dy.t() @ hp).abs().sum(0).double()
            acc[e] += total

        gu.register_hook(on_gu)
        y.register_hook(on_y)

    def tensors(self) -> dict[str, torch.Tensor]:
        l = self.layer.index
        out = {
            f"layers.{l}.tokens": self.tokens.reshape(1),
            f"layers.{l}.prob_sum": self.prob_sum,
            f"layers.{l}.moments": self.moments,
            f"layers.{l}.act_abs_sum": self.act_abs_sum,
            f"layers.{l}.act_sq_sum": self.act_sq_sum,
            f"layers.{l}.act_abs_max": self.act_abs_max,
            f"layers.{l}.gated_act_abs_sum": self.gated_act_abs_sum,
            f"layers.{l}.gated_act_sq_sum": self.gated_act_sq_sum,
            f"layers.{l}.gated_act_abs_max": self.gated_act_abs_max,
            f"layers.{l}.out_sum": self.out_sum,
            f"layers.{l}.gated_out_sum": self.gated_out_sum,
            f"layers.{l}.logit_gram": self.logit_gram,
        }
        if self.in_gram is not None:
            out[f"layers.{l}.in_gram"] = self.in_gram
            out[f"layers.{l}.mid_gram"] = self.mid_gram
        if self.dense_out_sum is not None:
            out[f"layers.{l}.dense_out_sum"] = self.dense_out_sum
        if self.gradients:
            out[f"layers.{l}.taylor"] = self.taylor
            out[f"layers.{l}.fisher"] = self.fisher
        if self.want_grad_magnitude:
            out[f"layers.{l}.grad_magnitude"] = self.grad_magnitude
        return out


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least float32 (float64 stays float64): products and sums of half-precision activations
    would round away what the float64 accumulators keep."""
    return t if t.dtype == torch.float64 else t.float()


class ProfilingExperts(nn.Module):
    """Computes what the wrapped stock experts module computes, recording statistics on the way."""

    def __init__(self, experts: nn.Module, recorder: LayerRecorder):
        super().__init__()
        object.__setattr__(self, "inner", experts)  # not registered: parameter names stay untouched
        self.rec = recorder
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.gated = bool(getattr(experts, "has_gate", True))
        self.has_bias = bool(getattr(experts, "has_bias", False))
        self.interleaved = not bool(getattr(experts, "is_concatenated", True))

    def _in_proj(self, e: int, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        w = m.gate_up_proj[e] if self.gated else m.up_proj[e]
        b = (m.gate_up_proj_bias[e] if self.gated else m.up_proj_bias[e]) if self.has_bias else None
        out = x @ w if self.transposed else F.linear(x, w)
        return out + b if b is not None else out

    def _out_proj(self, e: int, h: torch.Tensor) -> torch.Tensor:
        m = self.inner
        w = m.down_proj[e]
        out = h @ w if self.transposed else F.linear(h, w)
        return out + m.down_proj_bias[e] if self.has_bias else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        from moetrim.checkpoint.placement import run_with_hook

        return run_with_hook(self.inner, self._forward, hidden_states, top_k_index, top_k_weights)

    def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        rec, m = self.rec, self.inner
        record = not (rec.once_per_batch and rec.seen_experts)  # False in a gradient-checkpointing recompute
        rec.seen_experts = True
        num_tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=rec.E).tolist()[: rec.E]
        slot_token = order // top_k
        expert_of_slot = flat.index_select(0, order)
        xs = hidden_states.index_select(0, slot_token)
        gs = top_k_weights.reshape(-1).index_select(0, order)
        seq = slot_token // rec.seq_len
        track_grad = rec.gradients and torch.is_grad_enabled() and rec.mask is not None

        pieces: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x = xs[start : start + n]
            gu = self._in_proj(e, x)
            if track_grad and rec.want_grad_magnitude and not gu.requires_grad:
                gu.requires_grad_(True)  # first MoE layer: nothing upstream needs a gradient
            h = m._apply_gate(gu) if self.gated else m.act_fn(gu)
            pieces.append((e, start, x, gu, h))
            start += n
        h_all = torch.cat([p[4] for p in pieces])
        if track_grad:
            seq_idx = seq if rec.fisher_mode == "sequence" else torch.zeros_like(seq)
            mask_rows = rec.mask.reshape(-1, rec.I).index_select(0, seq_idx * rec.E + expert_of_slot)
            h_used = h_all * mask_rows.to(h_all.dtype)
        else:
            h_used = h_all
        ys = []
        for e, s, x, gu, _ in pieces:
            n = x.shape[0]
            h_e = h_used[s : s + n]
            y = self._out_proj(e, h_e)
            if track_grad and rec.want_grad_magnitude and record:
                rec.grad_magnitude_hooks(e, x, gu, h_e, y, seq[s : s + n], self.interleaved)
            ys.append(y)
        y_all = torch.cat(ys)
        if record:
            rec.record_experts(h_all, y_all, gs, expert_of_slot, xs)
            if rec.dense_out_sum is not None:  # HC-SMoE's features: every expert's output on the same tokens
                with torch.no_grad():
                    x_all = hidden_states.detach()
                    for e in range(rec.E):
                        gu = self._in_proj(e, x_all)
                        rec.record_dense(e, self._out_proj(e, m._apply_gate(gu) if self.gated else m.act_fn(gu)))

        out_sorted = y_all * gs.to(y_all.dtype).unsqueeze(-1)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


@contextlib.contextmanager
def instrumented(layers: list[MoELayer], recorders: list[LayerRecorder]) -> Iterator[None]:
    """Swap in profiling experts and router hooks; always restore the model, even on error."""
    handles = []
    swapped = []
    try:
        for layer, rec in zip(layers, recorders):
            name = next(n for n, c in layer.block.named_children() if c is layer.experts)
            setattr(layer.block, name, ProfilingExperts(layer.experts, rec))
            swapped.append((layer.block, name, layer.experts))

            def hook(module, inputs, output, rec=rec):
                logits = output[0] if isinstance(output, (tuple, list)) else output
                rec.record_router(logits)

            handles.append(layer.router.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for block, name, experts in swapped:
            setattr(block, name, experts)


@contextlib.contextmanager
def layer_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer in backward (transformers' checkpointing, non-reentrant), so
    Fisher's backward holds one layer's activations, not all of them. transformers checkpoints a
    layer only while that layer is in training mode: the flag is set on the decoder layers alone,
    so dropout, router jitter and every other submodule stay in eval mode. Restored on exit."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        from moetrim.errors import UsageError

        raise UsageError(f"--grad-checkpoint: {type(model).__name__} does not support gradient checkpointing in transformers")
    from moetrim.model import checkpointing

    was_on = checkpointing.is_on(model)
    had_input_hook = hasattr(model, "_require_grads_hook")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    modes = [m.training for m in layers]
    checkpointing.enable(model)
    if not had_input_hook and hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()  # the masks need gradients, the embeddings' output does not
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, mode in zip(layers, modes):
            m.training = mode
        if not was_on:
            checkpointing.disable(model)
