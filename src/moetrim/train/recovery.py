"""Recovery after compression: train only what compression created, annealed from the original model.

`moetrim recover` is `finetune` with method "recover". What trains: the group bases and low-rank
corrections of replaced (or merged) experts, plus LoRA adapters when `--lora R` asks for them (the
only thing a pruned or dimension-trimmed model can train here: compression created no tensor in it).
Everything else is frozen.

Annealing (`--anneal`, any of blend, kd, or none):

* blend: each replaced layer's output is (1 − λ)·original + λ·replacement, the original computed by
  the teacher's experts on the student's own hidden states; λ rises from 0 to 1 on a cosine over the
  first `blend_fraction` of the steps, then the originals are out of the computation. Kept experts
  are the same in both, so only replaced ones blend.
* kd: loss = CE + β·KL(teacher ‖ student) over the trained tokens, β falling linearly from
  `kd_weight` to 0 over the run: the uncompressed model's logits guide early and fade out.

With `none` the corrections simply train on CE from their initialisation (naive recovery).

Router KD (`--router-only`): after any compression, only the routers train, on the distillation loss
alone, KL(teacher ‖ student) at a constant weight: the experts that remain are kept as they are and the
router learns to use them as the uncompressed model's outputs ask. Ours trains each MoE layer's router
parameters with AdamW under the same schedule as recovery; where the method's authors differ (loss mix,
which router tensors) is not known to us from their code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from moetrim.errors import UsageError
from moetrim.model.view import MoELayer, find_moe_layers

ANNEALS = ("blend", "kd")
_CREATED = ("base_gate_up", "base_down", "gate_a", "gate_b", "up_a", "up_b", "down_a", "down_b")


def parse_anneal(spec: str) -> set[str]:
    parts = {p.strip() for p in spec.split(",") if p.strip()}
    if parts == {"none"}:
        return set()
    bad = parts - set(ANNEALS)
    if bad or not parts:
        raise UsageError(f"--anneal takes blend, kd, both (blend,kd) or none; got {spec!r}")
    return parts


def router_parameters(layers: list[MoELayer]) -> list[nn.Parameter]:
    """Every MoE layer's router parameters (weights, and biases where the family has them)."""
    return [p for layer in layers for p in layer.router.parameters()]


def created_parameters(layers: list[MoELayer]) -> list[nn.Parameter]:
    """The tensors compression created: group bases and corrections of replaced-experts layers."""
    out = []
    for layer in layers:
        if getattr(layer.experts, "is_moetrim_replaced", False):
            out += [p for n, p in layer.experts.named_parameters() if n in _CREATED and p is not None]
    return out


class Recovery:
    """Freezing, the blend hooks and the schedules of one recovery run."""

    def __init__(self, model: nn.Module, layers: list[MoELayer], teacher: nn.Module | None, *, anneal: set[str], steps: int,
                 blend_fraction: float, kd_weight: float, lora: bool, router_only: bool = False):
        self.router_only = router_only
        if router_only:
            anneal = {"kd"}  # Router KD: distillation alone, at a constant weight
            if teacher is None:
                raise UsageError("--router-only distils from the uncompressed model: give --teacher MODEL")
        self.created = router_parameters(layers) if router_only else created_parameters(layers)
        self.ce_weight = 0.0 if router_only else 1.0
        if not self.created and not lora:
            raise UsageError("nothing to recover: this model has no replaced or merged experts (compression created no "
                             "tensor to train); pass --lora R to train LoRA adapters instead")
        if anneal and teacher is None:
            raise UsageError("--anneal blend/kd needs the uncompressed teacher model (--teacher MODEL), or --anneal none")
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.created:
            p.requires_grad_(True)
        self.teacher = teacher
        self.anneal = anneal
        self.steps = max(1, steps)
        self.blend_steps = max(1, round(blend_fraction * steps))
        self.kd_weight = kd_weight
        self.lam = 1.0
        self.beta = 0.0
        self.handles = []
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        if "blend" in anneal:
            originals = {l.index: l.experts for l in find_moe_layers(teacher)}
            for layer in layers:
                if getattr(layer.experts, "is_moetrim_replaced", False) and layer.experts.replaced:
                    self.handles.append(layer.experts.register_forward_hook(self._blend(originals[layer.index])))
        self.schedule(0)

    def schedule(self, step: int) -> None:
        if "blend" in self.anneal:
            t = min(1.0, step / self.blend_steps)
            self.lam = 0.5 - 0.5 * math.cos(math.pi * t)
        if "kd" in self.anneal:
            self.beta = self.kd_weight * (1.0 if self.router_only else max(0.0, 1.0 - step / self.steps))

    def _teacher_on(self, device: torch.device) -> None:
        """The Trainer places the student; the teacher follows it on first use."""
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)

    def _blend(self, original: nn.Module):
        def hook(experts, args, output):
            if self.lam >= 1.0:
                return None
            self._teacher_on(args[0].device)
            with torch.no_grad():
                ref = original(*args)
            return self.lam * output + (1.0 - self.lam) * ref
        return hook

    def kd_loss(self, inputs: dict, student_logits: torch.Tensor) -> torch.Tensor | None:
        """β·KL(teacher ‖ student) over the tokens whose next token is trained (labels != -100)."""
        if "kd" not in self.anneal or self.beta <= 0:
            return None
        self._teacher_on(inputs["input_ids"].device)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        mask = inputs["labels"][:, 1:] != -100
        s = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
        t = F.log_softmax(t_logits[:, :-1][mask].float(), dim=-1)
        return self.beta * F.kl_div(s, t, log_target=True, reduction="batchmean")

    def callback(self) -> TrainerCallback:
        rec = self

        class Schedule(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                rec.schedule(state.global_step)

        return Schedule()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.lam, self.beta = 1.0, 0.0
