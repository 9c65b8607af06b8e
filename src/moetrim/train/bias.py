"""The router bias while training: usage summed over an optimizer step, one update after it.

Each router reports, on every training forward (never during a gradient-checkpoint recompute, which
replays a forward inside backward), its probabilities p and the experts each real token selected
(`moetrim.model.routing.RouterPatch`). Over the micro-batches of one optimizer step they are summed
into a usage u per expert; after the optimizer step (once, whatever the gradient accumulation) u is
summed across processes and

    b_e += gamma * sign(u_e - mean(u))     sign "sparsify": busy experts get busier (ExpertCondenser)
    b_e += gamma * sign(mean(u) - u_e)     sign "balance":  DeepSeek-V3's auxiliary-loss-free balancing

What u counts is what each method's authors count, and what the bias moves:

- "sparsify" with the bias on the logits (ExpertCondenser's patches, `utils/*-patch/patch.py`):
  u_e = sum_t p_e(t), p the softmax of the *biased* logits, so u responds to the bias directly;
- "balance" (DeepSeek-V3, arXiv 2412.19437 section 2.1.2): u_e = the number of tokens that selected
  e, in either application; with the bias in selection only, probabilities never see the bias and a
  usage counted from them would push the same experts the same way every step (starving some);
- "sparsify" with the bias in selection only has no author; like balance it counts selections,
  the only thing the bias changes there.

The condenser phase switch also lives here: at `switch_step` the r lowest-bias experts of every
layer become condensers and gamma drops to its phase-2 value. In phase 2 every expert's bias keeps
moving, the condensers' own included, as in the authors' code (their patches update the whole bias
vector from the full softmax, the forced experts' probabilities in it, with phase 2's
bias_update_speed 5e-5): a condenser's weight is its biased probability, so the tail it condenses
keeps being sparsified at the smaller step.
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


def counts_selections(sign: str, bias_apply: str) -> bool:
    """Whether usage counts the tokens that selected each expert (else the summed biased probability)."""
    return not (sign == "sparsify" and bias_apply == "logits")


class BiasController:
    """Sums routing usage per layer and moves the biases once per optimizer step."""

    def __init__(self, patches: list[RouterPatch], *, gamma: float, sign: str = "sparsify"):
        if sign not in SIGNS:
            raise ValueError(f"bias sign must be one of {SIGNS}")
        self.patches = patches
        self.gamma = gamma
        self.sign = sign
        self.mask: torch.Tensor | None = None  # [B*S] real-token mask of the current micro-batch
        self.usage = {p.layer.index: None for p in patches}  # what the bias balances or sparsifies, this step
        self.prob = {p.layer.index: None for p in patches}  # routing probability summed over this step
        self.tokens = {p.layer.index: 0.0 for p in patches}
        self.last_mean: dict[int, torch.Tensor] = {}  # mean probability per expert over the last step
        self.total: dict[int, torch.Tensor] = {}  # usage summed over every step so far (breaks ties between condensers)
        self.bias_at_switch: dict[int, list[float]] = {}
        self.updates = 0
        for patch in patches:
            patch.observer = self._observer(patch.layer.index, patch.router)

    @property
    def selections(self) -> bool:
        """Whether usage counts selections (see the module docstring); read from the installed spec."""
        apply = self.patches[0].spec.bias_apply if self.patches else "logits"
        return counts_selections(self.sign, apply)

    def _observer(self, index: int, router: nn.Module):
        def observe(p: torch.Tensor, selected: torch.Tensor, hidden: torch.Tensor) -> None:
            if not router.training or not torch.is_grad_enabled() or _in_backward():
                return
            p = p.detach()
            mask = self.mask
            if mask is not None and mask.numel() == p.shape[0]:
                w = mask.to(p.device, p.dtype)
                self.tokens[index] = self.tokens[index] + w.sum()  # a tensor: no device sync per router call
            else:
                w = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
                self.tokens[index] = self.tokens[index] + p.shape[0]
            prob = (p * w.unsqueeze(-1)).sum(dim=0)
            if self.selections:
                slots = w.unsqueeze(-1).expand(selected.shape).reshape(-1)
                u = torch.zeros_like(prob).index_add_(0, selected.reshape(-1).to(p.device), slots)
            else:
                u = prob
            self.prob[index] = prob if self.prob[index] is None else self.prob[index] + prob
            self.usage[index] = u if self.usage[index] is None else self.usage[index] + u
        return observe

    def step(self) -> None:
        """After an optimizer step: all-reduce the summed usage, move each bias by gamma, reset."""
        for patch in self.patches:
            index = patch.layer.index
            bias = patch.router.moetrim_bias
            E = bias.numel()
            zero = torch.zeros(E, dtype=torch.float32, device=bias.device)
            u = zero if self.usage[index] is None else self.usage[index].to(bias.device, torch.float32)
            prob = zero if self.prob[index] is None else self.prob[index].to(bias.device, torch.float32)
            tokens = self.tokens[index]  # a tensor on the device, or a Python count (made there: no copy from the host)
            n = tokens.to(bias.device, torch.float32).reshape(1) if torch.is_tensor(tokens) else \
                torch.full((1,), float(tokens), dtype=torch.float32, device=bias.device)
            both = torch.cat([u, prob, n])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(both)  # one collective per layer
            u, prob, n = both[:E], both[E : 2 * E], both[2 * E :]
            # both stay on the device: they are read only at the condenser switch and in checkpoints
            self.last_mean[index] = prob / n.clamp(min=1.0)
            prev = self.total.get(index)
            self.total[index] = u if prev is None else prev.to(u.device) + u  # prev is on the CPU after a resume
            self.tokens[index] = 0.0
            direction = torch.sign(u - u.mean())
            if self.sign == "balance":
                direction = -direction
            bias.add_(self.gamma * direction)
            self.usage[index] = self.prob[index] = None
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the bias buffers (saved with the weights): the summed usage
        that breaks ties when the condensers are chosen, the update count, the bias at the switch."""
        state = {f"total.{i}": t.float().cpu() for i, t in self.total.items()}
        state.update({f"bias_at_switch.{i}": torch.tensor(v, dtype=torch.float32) for i, v in self.bias_at_switch.items()})
        state["updates"] = torch.tensor([self.updates], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total = {int(k.split(".")[1]): t.float() for k, t in state.items() if k.startswith("total.")}
        self.bias_at_switch = {int(k.split(".")[1]): [round(float(b), 6) for b in t]
                               for k, t in state.items() if k.startswith("bias_at_switch.")}
        self.updates = int(state["updates"][0]) if "updates" in state else 0

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

    def _switched(self) -> bool:
        return bool(condenser_ids(self.model))

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run: condensers already chosen in the checkpoint's buffers
        if self.switch_step is not None and self._switched():
            after_load(self.model)
            if self.gamma_after is not None:
                self.controller.gamma = self.gamma_after

    def on_step_end(self, args, state, control, **kwargs):
        ctl = self.controller
        ctl.step()
        if self.switch_step is not None and state.global_step == self.switch_step and not self._switched():
            ctl.bias_at_switch = {p.layer.index: [round(float(b), 6) for b in p.router.moetrim_bias] for p in ctl.patches}
            choose_condensers(self.model, mean_gate=ctl.last_mean, usage=ctl.total)
            if self.gamma_after is not None:
                ctl.gamma = self.gamma_after
