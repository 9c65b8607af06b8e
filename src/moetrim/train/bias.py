"""The router bias while training: usage summed over an optimizer step, one update after it.

Each router's biased probabilities p (from `moetrim.model.routing.RouterPatch`) are summed over the
real tokens of every micro-batch of an optimizer step: u_e = sum_t p_e(t). After the optimizer step
(once, whatever the gradient accumulation; never during a gradient-checkpoint recompute, which
replays a forward inside backward) u is summed across processes and

    b_e += gamma * sign(u_e - mean(u))     sign "sparsify": busy experts get busier (ExpertCondenser)
    b_e += gamma * sign(mean(u) - u_e)     sign "balance":  DeepSeek-V3's auxiliary-loss-free balancing

The condenser phase switch also lives here: at `switch_step` the r lowest-bias experts of every
layer become condensers and gamma drops to its phase-2 value.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from moetrim.model.routing import RouterPatch, after_load, choose_condensers, condenser_ids

SIGNS = ("sparsify", "balance")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed layers recompute their forward)."""
    return torch._C._current_graph_task_id() != -1


class BiasController:
    """Sums routing usage per layer and moves the biases once per optimizer step."""

    def __init__(self, patches: list[RouterPatch], *, gamma: float, sign: str = "sparsify"):
        if sign not in SIGNS:
            raise ValueError(f"bias sign must be one of {SIGNS}")
        self.patches = patches
        self.gamma = gamma
        self.sign = sign
        self.mask: torch.Tensor | None = None  # [B*S] real-token mask of the current micro-batch
        self.usage = {p.layer.index: None for p in patches}
        self.tokens = {p.layer.index: 0.0 for p in patches}
        self.last_mean: dict[int, torch.Tensor] = {}  # mean probability per expert over the last step
        self.total: dict[int, torch.Tensor] = {}  # probability summed over every step so far
        self.updates = 0
        for patch in patches:
            patch.observer = self._observer(patch.layer.index, patch.router)

    def _observer(self, index: int, router: nn.Module):
        def observe(p: torch.Tensor, hidden: torch.Tensor) -> None:
            if not router.training or not torch.is_grad_enabled() or _in_backward():
                return
            p = p.detach()
            mask = self.mask
            if mask is not None and mask.numel() == p.shape[0]:
                p = p * mask.to(p.device, p.dtype).unsqueeze(-1)
                self.tokens[index] = self.tokens[index] + mask.sum()  # a tensor: no device sync per router call
            else:
                self.tokens[index] = self.tokens[index] + p.shape[0]
            u = p.sum(dim=0)
            self.usage[index] = u if self.usage[index] is None else self.usage[index] + u
        return observe

    def step(self) -> None:
        """After an optimizer step: all-reduce the summed usage, move each bias by gamma, reset."""
        for patch in self.patches:
            u = self.usage[patch.layer.index]
            bias = patch.router.moetrim_bias
            if u is None:
                u = torch.zeros_like(bias)
            u = u.to(bias.device, torch.float32)
            n = torch.as_tensor(self.tokens[patch.layer.index], dtype=torch.float32).to(bias.device).reshape(1)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(u)
                torch.distributed.all_reduce(n)
            self.last_mean[patch.layer.index] = (u / n.clamp(min=1.0)).cpu()
            self.total[patch.layer.index] = self.total.get(patch.layer.index, 0) + u.cpu()
            self.tokens[patch.layer.index] = 0.0
            direction = torch.sign(u - u.mean())
            if self.sign == "balance":
                direction = -direction
            bias.add_(self.gamma * direction)
            self.usage[patch.layer.index] = None
        self.updates += 1

    def detach(self) -> None:
        for patch in self.patches:
            patch.observer = None


class BiasCallback(TrainerCallback):
    """Calls the controller after each optimizer step; switches to condensers at `switch_step`."""

    def __init__(self, controller: BiasController, model: nn.Module, *, switch_step: int | None = None,
                 gamma_after: float | None = None):
        self.controller = controller
        self.model = model
        self.switch_step = switch_step
        self.gamma_after = gamma_after
        self.bias_at_switch: dict[int, list[float]] = {}

    def _switched(self) -> bool:
        return bool(condenser_ids(self.model))

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run: condensers already chosen in the checkpoint's buffers
        if self.switch_step is not None and self._switched():
            after_load(self.model)
            if self.gamma_after is not None:
                self.controller.gamma = self.gamma_after

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()
        if self.switch_step is not None and state.global_step == self.switch_step and not self._switched():
            self.bias_at_switch = {p.layer.index: [round(float(b), 6) for b in p.router.moetrim_bias] for p in self.controller.patches}
            choose_condensers(self.model, mean_gate=self.controller.last_mean, usage=self.controller.total)
            if self.gamma_after is not None:
                self.controller.gamma = self.gamma_after
