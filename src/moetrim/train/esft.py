"""ESFT (Wang et al., DeepSeek): train only the experts most relevant to the task, freeze the rest.

Per layer, each expert's relevance on the training data is its *token ratio* (share of the routed
slots it gets, mean of 1[e in top-k]/k) or its *gate score* (mean gate weight). Scores are normalised
within each layer (the reference script normalises across layers, a bug) and each layer keeps the
smallest set of experts, most relevant first, whose scores add up to at least `threshold`.

Only those experts' slices of the fused expert tensors train: every other parameter is frozen and
the gradients of the unselected experts' slices are zeroed. AdamW would still decay those slices
(decoupled weight decay acts on the weights, not the gradient), so expert tensors get no decay from
the optimizer and the selected slices are decayed by hand after each step: frozen experts stay bit
for bit what they were.
"""

from __future__ import annotations

import torch
from torch import nn

from moetrim.errors import UsageError
from moetrim.model.view import MoELayer

SCORES = ("token", "gate")


@torch.no_grad()
def expert_relevance(model: nn.Module, layers: list[MoELayer], batches, *, score: str = "token") -> dict[int, torch.Tensor]:
    """Per MoE layer, each expert's relevance (summing to 1 over the layer) on these batches."""
    if score not in SCORES:
        raise UsageError(f"unknown ESFT score {score!r}; choose {', '.join(SCORES)}")
    # sums stay on the model's device until the end: reading them back per layer and batch would sync each time
    sums: dict[int, torch.Tensor] = {}
    state = {"mask": None}
    handles = []
    for layer in layers:
        def hook(router, args, output, index=layer.index, k=layer.top_k, n=layer.num_experts):
            weights, top_i = output[1][:, :k], output[2][:, :k]
            acc = sums.get(index)
            if acc is None:
                acc = sums[index] = torch.zeros(n, dtype=_sum_dtype(top_i.device), device=top_i.device)
            m = state["mask"]
            m = torch.ones(top_i.shape[0], device=top_i.device) if m is None or m.numel() != top_i.shape[0] else m.to(top_i.device).float()
            vals = (torch.full(top_i.shape, 1.0 / k, device=top_i.device) if score == "token" else weights.float()) * m[:, None]
            acc.index_add_(0, top_i.reshape(-1), vals.reshape(-1).to(acc.dtype))
        handles.append(layer.router.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"].reshape(-1)
            model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for layer in layers:
        s = sums.get(layer.index, torch.zeros(layer.num_experts)).double().cpu()  # once per layer, after every batch
        out[layer.index] = (s / s.sum()).float() if s.sum() > 0 else s.float()
    return out


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def select_experts(relevance: dict[int, torch.Tensor], threshold: float) -> dict[int, list[int]]:
    """Per layer, the fewest experts (most relevant first) whose relevance adds up to >= threshold."""
    if not 0 < threshold <= 1:
        raise UsageError(f"--esft-threshold must be in (0, 1], got {threshold}")
    chosen = {}
    for index, rel in relevance.items():
        order = torch.sort(rel, descending=True, stable=True).indices
        total, keep = 0.0, []
        for e in order.tolist():
            if total >= threshold - 1e-9:
                break
            keep.append(e)
            total += float(rel[e])
        chosen[index] = sorted(keep)
    return chosen


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids as [start, end) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


class ExpertMask:
    """Freezes everything but the selected experts' slices; keeps frozen slices bit-identical."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], chosen: dict[int, list[int]]):
        for layer in layers:
            if getattr(layer.experts, "is_moetrim_varwidth", False) or getattr(layer.experts, "is_moetrim_replaced", False):
                raise UsageError("--method esft trains stock fused experts; this model's experts are compressed "
                                 "(fine-tune it with --method full or auxfree, or recover it with moetrim recover)")
        for p in model.parameters():
            p.requires_grad_(False)
        self.tensors: list[tuple[nn.Parameter, torch.Tensor]] = []  # (expert tensor, [E] bool mask of trained experts)
        self.runs: list[tuple[nn.Parameter, list[tuple[int, int]]]] = []  # (expert tensor, [start, end) runs of trained experts)
        self.handles = []
        for layer in layers:
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[chosen.get(layer.index, [])] = True
            if not keep.any():
                continue
            for p in layer.experts.parameters():
                if p.ndim == 0 or p.shape[0] != layer.num_experts:
                    continue
                p.requires_grad_(True)
                m = keep.to(p.device)
                self.tensors.append((p, m))
                self.runs.append((p, _runs(sorted(set(chosen.get(layer.index, []))))))
                shape = (-1,) + (1,) * (p.ndim - 1)
                self.handles.append(p.register_hook(lambda g, m=m, shape=shape: g * m.view(shape).to(g.dtype)))

    def decay(self, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay on the trained slices only (what AdamW does, masked)."""
        if weight_decay == 0 or lr == 0:
            return
        with torch.no_grad():
            for p, runs in self.runs:  # slices from host-side ids: a boolean mask would read its nonzero entries back each step
                for start, end in runs:
                    p[start:end] *= 1 - lr * weight_decay

    def params(self) -> list[nn.Parameter]:
        return [p for p, _ in self.tensors]

    def trained_parameters(self) -> int:
        """Parameters that train: the selected experts' slices, not the whole expert tensors they sit in."""
        return sum(p[0].numel() * int(m.sum()) for p, m in self.tensors)

    def trained_fraction(self) -> float:
        total = sum(p.numel() for p, _ in self.tensors)
        return self.trained_parameters() / total if total else 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

