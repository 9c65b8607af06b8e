"""`moetrim finetune` (one command for every fine-tuning method, on one CPU, one GPU or many
processes) and `moetrim recover` (train what compression created, annealed from the original).

Under `torchrun` / `accelerate launch` every process runs finetune; the Trainer shards the data,
and only the main process measures routing and writes the output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from moetrim.checkpoint.outputs import bytes_of_weights, check_output
from moetrim.cli.common import (
    DeviceMapOpt, MaxMemoryOpt, OffloadFolderOpt, OverwriteOpt, SeedOpt, TrustOpt, data_files, err, handled, model_dir, offload_scratch,
    out, placement, quiet_transformers,
)
from moetrim.errors import UsageError
from moetrim.train.checkpoints import check_resume, checkpoints_folder, latest, remove_checkpoints
from moetrim.train.config import FinetuneConfig

_D = FinetuneConfig()


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _health(model, tokenizer, data: str, base=None, max_tokens: int = 20000):
    from moetrim.evaluate.routing import routing_health

    return routing_health(model, tokenizer, data, base=base, max_tokens=max_tokens)


def _health_line(report: dict) -> str:
    s = report.get("summary", report)
    parts = []
    for key, label in (("entropy", "entropy"), ("gini", "Gini"), ("dead", "dead experts"), ("kl_to_base", "router KL vs base"),
                       ("topk_overlap", "top-k overlap with base")):
        hit = s.get(key)
        if isinstance(hit, (int, float)):
            parts.append(f"{label} {hit:.3g}")
    return ", ".join(parts)


def _trainable_placement(device_map: dict) -> None:
    """A model spread over GPUs trains as a naive pipeline (one process, the Trainer leaves its placement
    alone); weights offloaded to CPU or disk sit on meta between forwards and cannot be trained."""
    devices = {str(d) for d in device_map.values()}
    gpus = {d for d in devices if d not in ("cpu", "disk")}
    if "disk" in devices or ("cpu" in devices and gpus):
        raise UsageError(f"finetune cannot train weights offloaded to {'disk' if 'disk' in devices else 'cpu'}: give --max-memory "
                         "that holds the whole model on GPUs, or drop --device-map")


@handled
def finetune_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference'); moetrim-compressed models too"),
    data: str = typer.Option(..., "--data", help=".jsonl (prompt/response, messages or text records) or .txt"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    method: str = typer.Option(_D.method, "--method", help="full, auxfree, esft, densemixer or condenser"),
    lr: float = typer.Option(_D.lr, "--lr", help="peak learning rate (cosine to --min-lr-ratio of it)"),
    epochs: float = typer.Option(_D.epochs, "--epochs", help="passes over the data (ignored with --max-steps)"),
    max_steps: int = typer.Option(_D.max_steps, "--max-steps", help="optimizer steps (overrides --epochs)"),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", help="examples per process per micro-batch"),
    grad_accum: int = typer.Option(_D.grad_accum, "--grad-accum", help="micro-batches per optimizer step"),
    seq_len: int = typer.Option(_D.seq_len, "--seq-len", help="longest example in tokens (longer ones are cut)"),
    warmup: float = typer.Option(_D.warmup, "--warmup", help="warm-up: a fraction of the steps (< 1) or a step count"),
    min_lr_ratio: float = typer.Option(_D.min_lr_ratio, "--min-lr-ratio", help="final learning rate as a fraction of --lr"),
    weight_decay: float = typer.Option(_D.weight_decay, "--weight-decay", help="AdamW decoupled weight decay"),
    lora: int = typer.Option(_D.lora, "--lora", help="LoRA rank on attention and fused experts (0: full weights)"),
    lora_experts: str = typer.Option(_D.lora_experts, "--lora-experts", help="LoRA on experts in moetrim's experts module (routed tokens only) or through peft"),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 mixed precision"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="recompute activations in backward"),
    aux_coef: Optional[float] = typer.Option(None, "--aux-coef", help="full: load-balancing loss weight (default: the model's)"),
    bias: str = typer.Option(_D.bias, "--bias", help="auxfree: router bias none, sparsify or balance"),
    bias_apply: str = typer.Option(_D.bias_apply, "--bias-apply", help="logits (selection and weights) or selection only"),
    gamma: float = typer.Option(_D.gamma, "--gamma", help="router-bias step per optimizer step (condenser: phase 1)"),
    gamma_phase2: float = typer.Option(_D.gamma_phase2, "--gamma-phase2", help="condenser: bias step once condensers run"),
    condensers: int = typer.Option(_D.condensers, "--condensers", help="condenser: always-active experts per layer (r)"),
    budget: str = typer.Option(_D.budget, "--budget", help="condenser: additive (k + r experts) or fixed (k - r routed + r)"),
    gate: str = typer.Option(_D.gate, "--gate", help="condenser: prob (its routing probability) or learned"),
    phase1: float = typer.Option(_D.phase1, "--phase1", help="condenser: fraction of the steps before condensers start"),
    esft_score: str = typer.Option(_D.esft_score, "--esft-score", help="esft: token (routed-slot share) or gate (mean gate weight)"),
    esft_threshold: float = typer.Option(_D.esft_threshold, "--esft-threshold", help="esft: cumulative relevance each layer keeps"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="save a resumable checkpoint every N steps into OUT.checkpoints "
                                         "(a folder moetrim makes, and empties when the output is saved)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in OUT.checkpoints (--max-steps: the run's total)"),
    routing_tokens: int = typer.Option(20000, "--routing-tokens", help="tokens of --data that measure routing before and after (0: skip)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or loss lines"),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when there is one), cpu or cuda; under torchrun one GPU per process"),
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[Path] = OffloadFolderOpt,
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    dtype: str = typer.Option("float32", "--dtype", help="weights' dtype while training (float32; bfloat16 halves memory)"),
    trust_remote_code: bool = TrustOpt,
):
    """Fine-tune an MoE model on your data with one method, keeping what its rarely used experts know."""
    from moetrim.checkpoint import load_model, load_tokenizer, save_checkpoint
    from moetrim.train import finetune

    cfg = FinetuneConfig(
        method=method, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        seq_len=seq_len, warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, seed=seed, lora=lora, lora_experts=lora_experts,
        bf16=bf16, gradient_checkpointing=gradient_checkpointing, aux_coef=aux_coef, bias=bias, bias_apply=bias_apply,
        gamma=gamma, gamma_phase2=gamma_phase2, condensers=condensers, budget=budget, gate=gate, phase1=phase1,
        esft_score=esft_score, esft_threshold=esft_threshold, checkpoint_every=checkpoint_every, resume=resume,
        progress=not quiet, device=device,
    )
    cfg.check()
    files = data_files(data)
    if len(files) != 1:
        raise UsageError("--data takes one file for fine-tuning")
    src = model_dir(model_path)
    checkpoints = checkpoints_folder(out_dir)
    if checkpoint_every or resume:  # without them nothing is written to (or removed from) OUT.checkpoints
        check_output(checkpoints, kind="checkpoints", inputs=[src, *files], option="--out's checkpoints folder")
        held = latest(checkpoints) is not None
        if resume and not held:
            raise UsageError(f"--resume: {checkpoints} holds no checkpoint to continue; run without --resume")
        if held and not resume:
            raise UsageError(f"{checkpoints} holds checkpoints of an earlier run: pass --resume to continue it, or remove it")
        if resume and max_steps:
            check_resume(checkpoints, max_steps, what=f"--max-steps {max_steps}")  # the step count of --epochs needs the data
        cfg.checkpoint_dir = str(checkpoints)
    if _main_process():
        check_output(out_dir, kind="checkpoint", inputs=[src, *files], overwrite=overwrite, need_bytes=bytes_of_weights(model_path))
    place = placement(device_map, max_memory, offload_folder, None if device == "auto" else device, [src, *files],
                      {"--out": out_dir, "--out's checkpoints folder": checkpoints})
    if isinstance(place.get("device_map"), dict):
        _trainable_placement(place["device_map"])  # a map file: refused before anything loads
    if place and routing_tokens:
        err.print("note: with --device-map, routing is not measured before and after (--routing-tokens 0)")
        routing_tokens = 0
    quiet_transformers()
    with err.status(f"loading {model_path}"):
        model = load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, **offload_scratch(place))
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if place:
        _trainable_placement(getattr(model, "hf_device_map", None) or {})
    from moetrim.train.engine import moe_layers

    moe_layers(model)  # before measuring routing: a dense model stops here
    from moetrim.train.data import load_examples

    examples = load_examples(files[0], tokenizer, seq_len=seq_len)  # bad data fails here, before anything runs
    measure = routing_tokens > 0 and _main_process()
    before = _health(model, tokenizer, str(files[0]), max_tokens=routing_tokens) if measure else None
    previous = getattr(model.config, "moetrim", None)
    result = finetune(model, tokenizer, examples, cfg)
    report = result.report
    if not _main_process():
        return
    if measure:
        base = load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
        base = base.to(next(result.model.parameters()).device)
        after = _health(result.model, tokenizer, str(files[0]), base=base, max_tokens=routing_tokens)
        report["routing"] = {"before": before, "after": after}
    from moetrim import __version__
    from moetrim.checkpoint import format_name

    recipe = {
        "moetrim_version": __version__,
        "source": str(src),
        "format": format_name(result.model),
        "finetune": {"method": method, "data": str(files[0]), "steps": report["steps"], "seed": seed},
    }
    if previous:
        recipe["previous"] = previous
    save_checkpoint(result.model, out_dir, tokenizer=tokenizer, recipe=recipe, overwrite=overwrite,
                    extra_files={"finetune.json": json.dumps(report, indent=2) + "\n"})
    if cfg.checkpoint_dir:
        remove_checkpoints(checkpoints)  # the output is saved: the resumable state is spent
    done = f"in {report['steps']} steps"
    if "resumed_from_step" in report:
        ran = report["steps_this_run"]
        done = f"from step {report['resumed_from_step']} to {report['steps']} ({ran} step{'' if ran == 1 else 's'} in this run)"
    line = (f"fine-tuned with {method} {done} ({report['seconds']:.1f} s, {report['seconds_per_step']:.3f} s/step), "
            f"final loss {report['final_loss']:.4f}")
    out.print(line)
    if report.get("condensers"):
        out.print("condensers per layer: " + "; ".join(f"{k}: {v}" for k, v in report["condensers"].items()))
    if report.get("esft"):
        out.print(f"esft trained {report['esft']['trained_expert_fraction']:.0%} of the experts")
    if measure:
        out.print(f"routing before: {_health_line(before)}")
        out.print(f"routing after:  {_health_line(report['routing']['after'])}")
    out.print(f"saved to {out_dir} (report: {out_dir / 'finetune.json'})")


@handled
def recover_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="a compressed checkpoint (replaced, merged, pruned or trimmed)"),
    data: str = typer.Option(..., "--data", help=".jsonl (prompt/response, messages, text) or .txt training data; keep it apart from evaluation data"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    steps: int = typer.Option(2000, "--steps", help="optimizer steps"),
    teacher_path: Optional[str] = typer.Option(None, "--teacher", help="the uncompressed model (default: the source recorded in MODEL's config)"),
    anneal: str = typer.Option("blend,kd", "--anneal", help="blend (outputs blend in from the original), kd (distillation fading out), both, or none"),
    blend_fraction: float = typer.Option(0.4, "--blend-fraction", help="share of the steps over which replaced outputs blend in"),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="initial weight of KL(teacher || student), falling to 0"),
    lr: float = typer.Option(1e-4, "--lr", help="peak learning rate"),
    batch_size: int = typer.Option(8, "--batch-size", help="examples per micro-batch"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="micro-batches per optimizer step"),
    seq_len: int = typer.Option(1024, "--seq-len", help="longest example in tokens"),
    lora: int = typer.Option(0, "--lora", help="also train LoRA adapters of this rank (the only option for pruned or trimmed models)"),
    router_only: bool = typer.Option(False, "--router-only", help="Router KD: train only the routers, on KL(teacher || student) "
                                     "alone (any compressed model; needs the teacher)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Recover a compressed model: train only what compression created, annealed from the original model."""
    from moetrim.checkpoint import load_model, load_tokenizer, save_checkpoint
    from moetrim.train import recover
    from moetrim.train.recovery import parse_anneal

    settings = dict(lr=lr, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lora=lora, seed=seed,
                    anneal=anneal, blend_fraction=blend_fraction, kd_weight=kd_weight, router_only=router_only,
                    progress=not quiet)
    FinetuneConfig(method="recover", **settings).check()
    wants_teacher = bool(parse_anneal(anneal)) or router_only
    files = data_files(data)
    if len(files) != 1:
        raise UsageError("--data takes one file for recovery")
    src = model_dir(model_path)
    recipe = {}
    try:
        recipe = json.loads((src / "config.json").read_text()).get("moetrim") or {}
    except (OSError, ValueError):
        pass
    if teacher_path is None and wants_teacher:
        teacher_path = recipe.get("source")
        if not teacher_path or not model_dir(teacher_path).is_dir():
            raise UsageError(f"{model_path} does not record the model it was compressed from; give --teacher MODEL"
                             + ("" if router_only else " or --anneal none"))
    inputs = [src, *files] + ([model_dir(teacher_path)] if teacher_path else [])
    check_output(out_dir, kind="checkpoint", inputs=inputs, overwrite=overwrite, need_bytes=bytes_of_weights(model_path))
    quiet_transformers()
    with err.status(f"loading {model_path}"):
        model = load_model(model_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        teacher = load_model(teacher_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code) if wants_teacher else None
    result = recover(model, tokenizer, str(files[0]), teacher=teacher, **settings)
    new_recipe = dict(recipe)
    new_recipe["recover"] = {"steps": steps, "data": str(files[0]), "anneal": "kd" if router_only else anneal, "lr": lr, "lora": lora,
                             "router_only": router_only,
                             "teacher": None if teacher_path is None else str(teacher_path)}
    save_checkpoint(result.model, out_dir, tokenizer=tokenizer, recipe=new_recipe, overwrite=overwrite,
                    extra_files={"recover.json": json.dumps(result.report, indent=2) + "\n"})
    rep = result.report
    out.print(f"recovered in {rep['steps']} steps ({rep['seconds']:.1f} s), final loss {rep['final_loss']:.4f}; "
              f"trained {rep['trainable_parameters']:,} parameters; saved [bold]{out_dir}[/]")
