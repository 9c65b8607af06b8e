"""The settings of a fine-tuning run (no torch import: the CLI reads its defaults at start-up)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from moetrim.errors import UsageError

METHODS = ("full", "auxfree", "esft", "densemixer", "condenser")
RECOVER = "recover"  # the engine's recovery mode (moetrim recover): not a fine-tuning method
BIAS_MODES = ("none", "sparsify", "balance")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (recorded in the output's report)."""

    method: str = "full"
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 4  # per process
    grad_accum: int = 1
    seq_len: int = 1024
    warmup: float = 0.1  # a fraction of the steps (< 1) or a number of steps
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    weight_decay: float = 0.0
    seed: int = 0
    lora: int = 0  # LoRA rank (0: train full weights)
    lora_alpha: float | None = None  # default 2 * rank
    lora_experts: str = "moetrim"  # LoRA on fused experts: moetrim (routed tokens only; 6-8x faster per step than peft
    # at OLMoE/Qwen1.5 shapes on CPU, benchmarks/lora_experts.py) or peft (target_parameters)
    bf16: bool = False
    gradient_checkpointing: bool = False
    aux_coef: float | None = None  # method full: load-balancing loss weight (default: the model's, else 0.001)
    bias: str = "none"  # method auxfree: none, sparsify or balance
    bias_apply: str = "logits"  # logits: the bias moves selection and weights; selection: selection only
    gamma: float = 1e-3  # bias step (phase 1 for condenser)
    gamma_phase2: float = 5e-5
    condensers: int = 2  # r per layer
    budget: str = "additive"  # additive: k routed + r condensers; fixed: k - r routed + r condensers
    gate: str = "prob"
    phase1: float = 0.5  # condenser: fraction of the steps spent sparsifying before condensers start
    esft_score: str = "token"
    esft_threshold: float = 0.2
    esft_batches: int = 32  # batches of the training data that score experts for ESFT
    logging_steps: int = 10
    checkpoint_every: int = 0  # save a resumable Trainer checkpoint every N steps (0: never)
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    device: str = "auto"  # auto: the GPU when there is one (the Trainer places the model), else cpu
    anneal: str = "blend,kd"  # recover: blend, kd, both or none
    blend_fraction: float = 0.4  # recover: the replaced experts' outputs blend in from the original over this share of steps
    kd_weight: float = 1.0  # recover: initial weight of KL(teacher || student), falling linearly to 0
    router_only: bool = False  # recover: Router KD, train only the routers on KL(teacher || student) alone

    def check(self) -> None:
        if self.method not in METHODS and self.method != RECOVER:
            raise UsageError(f"unknown --method '{self.method}'; choose {', '.join(METHODS)}")
        if self.router_only and (self.method != RECOVER or self.lora):
            raise UsageError("--router-only trains the routers alone, by distillation: it is a recovery option and takes no --lora")
        for f in fields(self):  # the CLI checks its options' ranges (moetrim.cli.ranges); Python callers get this
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        positive = {"lr": self.lr, "batch-size": self.batch_size, "grad-accum": self.grad_accum, "seq-len": self.seq_len}
        for name, v in positive.items():
            if not v > 0:
                raise UsageError(f"--{name} must be > 0, got {v}")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.epochs > 0):
            raise UsageError("give --epochs > 0 or --max-steps > 0")
        if self.warmup < 0 or self.lora < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError("--warmup, --lora and --weight-decay must be >= 0 and --min-lr-ratio in [0, 1]")
        if self.bias not in BIAS_MODES:
            raise UsageError(f"unknown --bias '{self.bias}'; choose {', '.join(BIAS_MODES)}")
        if self.bias != "none" and self.method != "auxfree":
            raise UsageError("--bias belongs to --method auxfree (condenser always sparsifies)")
        if self.method == "condenser" and not 0 < self.phase1 < 1:
            raise UsageError(f"--phase1 must be a fraction in (0, 1), got {self.phase1}")
        if self.method == "condenser" and self.condensers < 1:
            raise UsageError("--condensers must be at least 1 for --method condenser")
        if self.method == "esft" and self.lora:
            raise UsageError("--method esft trains whole experts; drop --lora")
        if not 0 < self.blend_fraction <= 1 or self.kd_weight < 0:
            raise UsageError("--blend-fraction must be in (0, 1] and --kd-weight >= 0")
        if self.lora_experts not in ("peft", "moetrim"):
            raise UsageError(f"unknown --lora-experts '{self.lora_experts}'; choose peft or moetrim")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown --device '{self.device}'; choose auto, cpu or cuda")
        if self.gamma < 0 or self.gamma_phase2 < 0:
            raise UsageError("--gamma must be >= 0")
