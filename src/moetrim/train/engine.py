"""One training engine on `transformers.Trainer`; the fine-tuning methods are small pieces it composes.

The same call runs on one CPU, one GPU, or several processes under `accelerate launch` / `torchrun`
(DDP; FSDP through an accelerate config): the Trainer (accelerate underneath) owns devices, data
sharding, mixed precision, gradient accumulation, checkpoints and the progress bar. What a method
adds is one of: a loss switch (the load-balancing auxiliary loss), router hooks (bias, condensers,
DenseMixer), gradient masks (ESFT) or a callback (bias updates once per optimizer step).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moetrim.checkpoint.atomic import save_safetensors
from moetrim.errors import MoetrimError, UsageError
from moetrim.model import checkpointing
from moetrim.model.view import find_moe_layers
from moetrim.train.checkpoints import STATE_FILE
from moetrim.train.config import FinetuneConfig
from moetrim.train.data import ExampleDataset, PadCollator, load_examples, pad_id

@dataclass
class FinetuneResult:
    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)


BIAS_STATE_FILE = "moetrim_bias_state.safetensors"  # the bias controller's sums (train/bias.py)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fsdp() -> bool:
    """Whether accelerate will shard the model with FSDP (`accelerate launch` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def total_steps(n_examples: int, cfg: FinetuneConfig) -> int:
    """Optimizer steps of the run: --max-steps, or epochs over the data at the global batch size."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(math.ceil(n_examples / (cfg.batch_size * _world_size())) / cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def _lora(model: nn.Module, cfg: FinetuneConfig, layers) -> nn.Module:
    """LoRA on attention projections and on fused expert tensors: through peft's target_parameters,
    or (`lora_experts="moetrim"`, already installed by the caller: train/expert_lora.py) on the stock experts in place."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora needs peft: pip install peft") from None
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    attention = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense"})
    stock = [l for l in layers if not getattr(l.experts, "is_moetrim_varwidth", False) and not getattr(l.experts, "is_moetrim_replaced", False)]
    params = []
    if stock and cfg.lora_experts == "peft":
        experts_name = next(c for c, m in stock[0].block.named_children() if m is stock[0].experts)
        params = [f"{experts_name}.{t}" for t in ("gate_up_proj", "down_proj") if isinstance(getattr(stock[0].experts, t, None), nn.Parameter)]
    config = LoraConfig(r=cfg.lora, lora_alpha=cfg.lora_alpha or 2 * cfg.lora, lora_dropout=0.0,
                        target_modules=attention, target_parameters=params or None)
    return get_peft_model(model, config)


def _trainer_class():
    from transformers import Trainer

    class MoetrimTrainer(Trainer):
        """Trainer that tells the bias controller which tokens are real, and keeps weight decay off the
        tensors whose frozen slices must not move (ESFT) and off router gates."""

        moetrim_controller = None
        moetrim_mask = None
        moetrim_recovery = None
        moetrim_balance = None  # (coef, experts, top_k): method full's load-balancing loss, train/balance_loss.py

        def get_decay_parameter_names(self, model):
            names = super().get_decay_parameter_names(model)
            frozen = {id(p) for p in (self.moetrim_mask.params() if self.moetrim_mask else [])}
            named = dict(model.named_parameters())
            return [n for n in names if id(named.get(n)) not in frozen and "moetrim_gate" not in n]

        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            if self.moetrim_mask is not None and not getattr(opt, "_moetrim_decay_hook", False):
                mask, wd = self.moetrim_mask, self.args.weight_decay
                opt.register_step_post_hook(lambda o, a, k: mask.decay(o.param_groups[0]["lr"], wd))
                opt._moetrim_decay_hook = True
            return opt

        # Resumable checkpoints hold the module's own state dict. save_pretrained renames fused experts to
        # the on-disk names (experts.0.gate_proj...) and the Trainer's resume loads them back without the
        # conversion, silently leaving the experts as they were; buffers (the router bias) need keeping too.
        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:
                return
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            seen, tensors = set(), {}
            for name, t in model.state_dict().items():
                key = (t.data_ptr(), t.dtype, tuple(t.shape))
                if t.numel() and key in seen:
                    continue  # tied (embedding and output head): stored once
                seen.add(key)
                tensors[name] = t.detach().cpu().contiguous()
            save_safetensors(tensors, Path(output_dir) / STATE_FILE)
            if self.moetrim_controller is not None:
                save_safetensors(self.moetrim_controller.state_dict(), Path(output_dir) / BIAS_STATE_FILE)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            from safetensors.torch import load_file

            model = self.accelerator.unwrap_model(model or self.model)
            path = Path(resume_from_checkpoint) / STATE_FILE
            if not path.is_file():
                raise UsageError(f"--resume: {resume_from_checkpoint} is not a checkpoint moetrim wrote (no {STATE_FILE})")
            state = load_file(str(path))
            missing, unexpected = model.load_state_dict(state, strict=False)
            own = model.state_dict()
            untied = [k for k in missing if not any(own[k].data_ptr() == own[j].data_ptr() for j in state if j in own)]
            if untied or unexpected:
                raise MoetrimError(f"{path} does not match this model (missing {untied[:3]}, unexpected {list(unexpected)[:3]}); "
                                   "resume with the same model and method")
            if self.moetrim_controller is not None:
                bias_state = Path(resume_from_checkpoint) / BIAS_STATE_FILE
                if not bias_state.is_file():
                    raise UsageError(f"--resume: {resume_from_checkpoint} has no {BIAS_STATE_FILE} (the router bias's usage sums); "
                                     "it was written by an older moetrim or another method")
                self.moetrim_controller.load_state_dict(load_file(str(bias_state)))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.moetrim_controller is not None:
                self.moetrim_controller.mask = inputs["attention_mask"].reshape(-1)
            rec = self.moetrim_recovery
            distill = rec is not None and "kd" in rec.anneal
            if not distill and self.moetrim_balance is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if self.moetrim_balance is not None:
                from moetrim.train.balance_loss import balance_loss

                coef, experts, top_k = self.moetrim_balance
                loss = loss + coef * balance_loss(outputs.router_logits, experts, top_k, inputs.get("attention_mask"))
            kd = rec.kd_loss(inputs, outputs.logits) if distill else None
            if kd is not None:
                loss = rec.ce_weight * loss + kd
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():  # after its backward, before the optimizer step: the weights are the last good ones
                raise MoetrimError(_diverged(f"the loss is {loss.item()} at step {self.state.global_step + 1}", self.args.learning_rate))
            return loss

        # The Trainer's own resume files are torch zip archives it loads with weights_only; one that is
        # damaged past what checkpoints.resume_step can see (the zip directory is whole) is one line too.
        def _load_optimizer_and_scheduler(self, checkpoint):
            with _resume_file(checkpoint):
                return super()._load_optimizer_and_scheduler(checkpoint)

        def _load_rng_state(self, checkpoint):
            with _resume_file(checkpoint):
                return super()._load_rng_state(checkpoint)

        def _load_scaler(self, checkpoint):
            with _resume_file(checkpoint):
                return super()._load_scaler(checkpoint)

    return MoetrimTrainer


def _diverged(what: str, lr: float) -> str:
    return f"training diverged: {what}; nothing was saved to the output: lower the learning rate (it is {lr:g}) and run again"


@contextlib.contextmanager
def _resume_file(checkpoint):
    try:
        yield
    except (MoetrimError, MemoryError):
        raise
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, pickle errors... for a damaged file
        if checkpoint is None or type(exc).__name__ == "OutOfMemoryError":
            raise
        raise MoetrimError(f"--resume: a file of {checkpoint} cannot be read ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:200]}); remove {checkpoint} to resume from the checkpoint "
                           "before it, or run without --resume") from None


def moe_layers(model: nn.Module) -> list:
    """The model's MoE layers; a model without any is a usage error here (exit 2): it cannot be fine-tuned
    by an MoE method, whatever its weights."""
    try:
        return find_moe_layers(model)
    except MoetrimError as exc:
        raise UsageError(str(exc)) from None


def finetune(model: nn.Module, tokenizer, data, config: FinetuneConfig | None = None, *, teacher: nn.Module | None = None,
             **overrides) -> FinetuneResult:
    """Fine-tune `model` in place on `data` (a .jsonl/.txt path or a list of records) with one method.

    Returns the trained model (LoRA merged into the weights) and a JSON-ready report: the settings,
    what the method chose (ESFT experts, condensers, bias), the loss curve and seconds per step."""
    from transformers import TrainingArguments

    cfg = config or FinetuneConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown fine-tuning setting {k!r}")
        setattr(cfg, k, v)
    cfg.check()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    layers = moe_layers(model)
    if cfg.method == "esft" and _fsdp():
        raise UsageError("--method esft does not run under FSDP: its gradient masks sit on the expert tensors that FSDP "
                         "replaces with flattened shards; run it with torchrun (DDP) or in one process")
    examples = load_examples(data, tokenizer, seq_len=cfg.seq_len)
    steps = total_steps(len(examples), cfg)
    warmup = int(round(cfg.warmup * steps)) if cfg.warmup < 1 else int(cfg.warmup)
    report: dict[str, Any] = {"settings": asdict(cfg), "examples": len(examples), "steps": steps, "processes": _world_size()}
    collate = PadCollator(pad_id(tokenizer))
    dataset = ExampleDataset(examples)
    model.config.use_cache = False

    controller = callback = mask = mixer = None
    patches = []
    top_k = layers[0].top_k
    report["active_experts_per_token"] = top_k
    # the load-balancing loss: only `full` keeps it (the auxiliary-loss-free methods drop it). The trainer adds
    # transformers' formula itself, with its batch means summed over processes (train/balance_loss.py); the
    # model's own term, per process, is switched off.
    balance = None
    if cfg.method == "full":
        coef = cfg.aux_coef if cfg.aux_coef is not None else (getattr(model.config, "router_aux_loss_coef", None) or 1e-3)
        if hasattr(model, "router_aux_loss_coef"):
            model.config.output_router_logits = coef > 0
            model.router_aux_loss_coef = 0.0
            balance = (coef, layers[0].num_experts, top_k) if coef > 0 else None
            report["aux_coef"] = coef
        else:
            report["aux_coef"] = None  # this family has no load-balancing loss in transformers
    else:
        model.config.output_router_logits = False
    if cfg.method in ("auxfree", "condenser") and (cfg.bias != "none" or cfg.method == "condenser"):
        from moetrim.model.routing import RoutingSpec, install_routing
        from moetrim.train.bias import BiasCallback, BiasController

        spec = RoutingSpec(bias=True, bias_apply=cfg.bias_apply,
                           condensers=cfg.condensers if cfg.method == "condenser" else 0, budget=cfg.budget, gate=cfg.gate)
        patches = install_routing(model, spec)
        controller = BiasController(patches, gamma=cfg.gamma, sign="balance" if cfg.bias == "balance" else "sparsify")
        switch = None
        if cfg.method == "condenser":
            switch = max(1, int(round(cfg.phase1 * steps)))
            report["phase1_steps"] = switch
            report["active_experts_per_token"] = top_k + cfg.condensers if cfg.budget == "additive" else top_k
        callback = BiasCallback(controller, model, switch_step=switch, gamma_after=cfg.gamma_phase2 if switch else None)
    if cfg.method == "esft":
        from moetrim.train.esft import ExpertMask, expert_relevance, select_experts

        g = torch.Generator().manual_seed(cfg.seed)
        # every process scores the same items: esft_batches global batches, so N processes choose what one does
        order = torch.randperm(len(dataset), generator=g).tolist()[: cfg.esft_batches * cfg.batch_size * _world_size()]
        batches = [collate([dataset[i] for i in order[j : j + cfg.batch_size]]) for j in range(0, len(order), cfg.batch_size)]
        relevance = expert_relevance(model, layers, batches, score=cfg.esft_score)
        chosen = select_experts(relevance, cfg.esft_threshold)
        mask = ExpertMask(model, layers, chosen)
        report["esft"] = {"score": cfg.esft_score, "threshold": cfg.esft_threshold,
                          "experts": {str(k): v for k, v in chosen.items()}, "trained_expert_fraction": round(mask.trained_fraction(), 4)}
    if cfg.method == "densemixer":
        from moetrim.train.densemixer import DenseMixer

        mixer = DenseMixer(layers)
        report["experts_run_per_token_in_training"] = layers[0].num_experts
    recovery = None
    if cfg.method == "recover":
        from moetrim.train.recovery import Recovery, parse_anneal

        recovery = Recovery(model, layers, teacher, anneal=parse_anneal(cfg.anneal), steps=steps,
                            blend_fraction=cfg.blend_fraction, kd_weight=cfg.kd_weight, lora=bool(cfg.lora),
                            router_only=cfg.router_only)
        report["recover"] = {"anneal": sorted(recovery.anneal), "router_only": cfg.router_only,
                             "created_parameters": sum(p.numel() for p in recovery.created),
                             "blend_steps": recovery.blend_steps if "blend" in recovery.anneal else 0}
    expert_lora = None
    if cfg.lora and cfg.lora_experts == "moetrim" and cfg.method != "recover":
        from moetrim.train.expert_lora import ExpertLoRA

        expert_lora = ExpertLoRA(layers, cfg.lora, seed=cfg.seed)
    if cfg.lora:
        model = _lora(model, cfg, layers)
        for p in expert_lora.parameters() if expert_lora else []:
            p.requires_grad_(True)
        for n, p in model.named_parameters():  # peft froze everything that is not an adapter
            if "moetrim_gate" in n:
                p.requires_grad_(True)
        for p in recovery.created if recovery else []:
            p.requires_grad_(True)
    masked = {id(p) for p in mask.params()} if mask else set()  # ESFT: only the selected experts' slices of these train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in masked)
    trainable += mask.trained_parameters() if mask else 0
    report["trainable_parameters"] = trainable
    if trainable == 0:
        raise UsageError("nothing to train: every parameter is frozen")

    from moetrim.train import checkpoints

    own_dir = not (cfg.checkpoint_dir and (cfg.checkpoint_every or cfg.resume))
    resume, resumed_at = None, 0
    if cfg.resume:
        if own_dir:
            raise UsageError("resume=True needs checkpoint_dir: the folder of the checkpoints to continue")
        found, resumed_at = checkpoints.check_resume(Path(cfg.checkpoint_dir), steps)
        resume = str(found)
    if own_dir:
        out_dir = Path(tempfile.mkdtemp(prefix="moetrim-train-"))
    else:
        out_dir = Path(cfg.checkpoint_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            checkpoints.claim(out_dir)  # only into a folder moetrim made (the main process writes the checkpoints)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        max_steps=steps,
        warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        **checkpointing.training_arguments(cfg.gradient_checkpointing),
        logging_steps=max(1, cfg.logging_steps),
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 500,
        report_to="none",
        disable_tqdm=not cfg.progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=cfg.device == "cpu" or not torch.cuda.is_available(),
        max_grad_norm=1.0,
        log_level="warning",
    )
    callbacks = [c for c in (callback, recovery.callback() if recovery else None) if c is not None]
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=callbacks or None)
    trainer.moetrim_controller = controller
    trainer.moetrim_mask = mask
    trainer.moetrim_recovery = recovery
    trainer.moetrim_balance = balance
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=resume)
    finally:
        if controller is not None:
            controller.detach()
        if mixer is not None:
            mixer.remove()
        if mask is not None:
            mask.remove()
        if recovery is not None:
            recovery.remove()
        if own_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    trained = trainer.model
    broken = next((n for n, p in trained.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    if broken is not None:
        raise MoetrimError(_diverged(f"{broken} holds non-finite values after {trainer.state.global_step} steps", cfg.lr))
    if cfg.lora:
        trained = trained.merge_and_unload()
    trained = getattr(trained, "module", trained)
    if expert_lora is not None:
        expert_lora.merge()
    for p in trained.parameters():
        p.requires_grad_(False)
    trained.config.output_router_logits = False
    if balance is not None:  # the model's own term was off while the trainer added it
        trained.router_aux_loss_coef = getattr(trained.config, "router_aux_loss_coef", 0.0)
    trained.config.use_cache = True
    trained.eval()
    ran = trainer.state.global_step - resumed_at
    if resume:
        report["resumed_from_step"] = resumed_at
    report["steps_this_run"] = ran
    report["seconds"] = round(seconds, 2)
    report["seconds_per_step"] = round(seconds / max(1, ran), 4)
    report["final_loss"] = round(float(output.training_loss), 6)
    report["loss_curve"] = [{"step": h["step"], "loss": round(h["loss"], 6)} for h in trainer.state.log_history if "loss" in h]
    if callback is not None:
        from moetrim.model.routing import condenser_ids

        report["bias_updates"] = controller.updates
        report["bias"] = {str(p.layer.index): [round(float(b), 6) for b in p.router.moetrim_bias] for p in patches}
        if cfg.method == "condenser":
            report["condensers"] = {str(k): v for k, v in condenser_ids(trained).items()}
            report["bias_at_switch"] = {str(k): v for k, v in controller.bias_at_switch.items()}
    return FinetuneResult(trained, report)
