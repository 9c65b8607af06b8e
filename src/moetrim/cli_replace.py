"""Expert replacing, merging and D²-MoE from the command line, and `moetrim recover` for any compressed model.

`moetrim compress --granularity replace|naive|merge|d2` lands here from the `compress` command;
`recover` trains what compression created (and LoRA adapters if asked), annealed from the original."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.checkpoint.outputs import bytes_of_weights, check_output
from moetrim.cli_common import OverwriteOpt, SeedOpt, TrustOpt, data_files, err, handled, model_dir, out
from moetrim.errors import UsageError

RankOpt = typer.Option(16, "--rank", help="replace/naive: rank of each replaced expert's corrections (d2 picks its own)")
MaxGroupOpt = typer.Option(8, "--max-group", help="replace: most replaced experts sharing one base")
WeightingOpt = typer.Option("usage", "--base-weighting", help="how members weigh in their base: usage, uniform, fisher or fisher_usage")
WhitenOpt = typer.Option(False, "--whiten", help="replace/d2: whiten the corrections' SVD by each matrix's inputs (SVD-LLM, D²-MoE)")


def report_replace_plan(plan) -> None:
    t = Table(title="plan", show_header=False)
    t.add_row("method", f"{plan.granularity} / {plan.criterion} / rank {plan.rank}")
    t.add_row("routed-expert params", f"{plan.params_before:,} -> {plan.params_after:,} stored (bases and corrections counted)")
    t.add_row("removed", f"{plan.removed_fraction:.1%} (asked {plan.ratio:.1%})")
    t.add_row("per layer", "; ".join(f"{l.layer}: {len(l.kept)} kept, {sum(len(g) for g in l.groups)} in {len(l.groups)} groups"
                                     for l in plan.layers))
    out.print(t)


def compress_replace(model, model_path: str, data: str, out_dir: Path, *, granularity: str, criterion: Optional[str], ratio: float,
                     rank: int, max_group: int, base_weighting: str, whiten: bool, max_tokens, seq_len, batch_size: int,
                     fisher_mode: str, seed: int, overwrite: bool, recover_steps: int, recover_data: Optional[str],
                     recover_lr: float, dtype: str, trust_remote_code: bool) -> None:
    """Calibrate (with mean outputs, and input Grams for --whiten), plan, build, optionally recover, save."""
    from moetrim.build.replace import apply_replace_plan
    from moetrim.checkpoint import load_model, make_recipe, save_checkpoint
    from moetrim.cli import _calibrate
    from moetrim.model.view import find_moe_layers
    from moetrim.plan.replace import check_replace_options, make_replace_plan

    check_replace_options(granularity, ratio, rank, max_group, base_weighting, find_moe_layers(model))
    fisher = base_weighting in ("fisher", "fisher_usage") or granularity == "d2"
    profile, tokenizer = _calibrate(model, model_path, data, trust_remote_code, fisher=fisher, max_tokens=max_tokens,
                                    seq_len=seq_len, batch_size=batch_size, seed=seed, fisher_mode=fisher_mode, whiten=whiten,
                                    dense_outputs=granularity == "merge")
    plan = make_replace_plan(model, profile, method=granularity, ratio=ratio, rank=rank, criterion=criterion or "reap",
                             max_group=max_group, base_weighting=base_weighting, whiten=whiten, seed=seed)
    with err.status("building replaced experts"):
        apply_replace_plan(model, plan, profile)
    recipe = make_recipe(plan, profile, model_path, "replaced")
    extra = {}
    if recover_steps:
        from moetrim.train import FinetuneConfig, finetune

        teacher = load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
        from moetrim.calibrate.run import model_context

        cfg = FinetuneConfig(method="recover", lr=recover_lr, max_steps=recover_steps, seed=seed,
                             seq_len=seq_len or model_context(model) or 512)
        result = finetune(model, tokenizer, recover_data or data.split(",")[0], cfg, teacher=teacher)
        model = result.model
        recipe["recover"] = {"steps": recover_steps, "data": recover_data or data, "anneal": cfg.anneal, "lr": recover_lr}
        extra["recover.json"] = json.dumps(result.report, indent=2) + "\n"
    with err.status(f"saving {out_dir}"):
        save_checkpoint(model, out_dir, tokenizer=tokenizer, plan=plan, recipe=recipe, overwrite=overwrite, extra_files=extra)
    report_replace_plan(plan)
    out.print(f"saved [bold]{out_dir}[/] (load with moetrim.load)")


def plan_replace(model_path: str, profile_path: Path | None, out_path: Path, *, granularity: str, criterion: Optional[str],
                 ratio: float, rank: int, max_group: int, base_weighting: str, seed: int, overwrite: bool, trust_remote_code: bool) -> None:
    """`moetrim plan --granularity replace|naive|merge|d2`: the reviewable JSON plan, nothing built."""
    from moetrim.calibrate import load_profile
    from moetrim.cli import _load
    from moetrim.plan.replace import make_replace_plan

    if profile_path is None:
        raise UsageError(f"--granularity {granularity} needs --profile (mean expert outputs decide the groups)")
    check_output(out_path, kind="plan", inputs=[model_dir(model_path), profile_path], overwrite=overwrite)
    profile = load_profile(profile_path)
    model = _load(model_path, "auto", "cpu", trust_remote_code)
    plan = make_replace_plan(model, profile, method=granularity, ratio=ratio, rank=rank, criterion=criterion or "reap",
                             max_group=max_group, base_weighting=base_weighting, seed=seed)
    plan.save(out_path)
    report_replace_plan(plan)
    out.print(f"plan -> [bold]{out_path}[/]")


def apply_replace(model, plan_dict: dict, profile, model_path: str, out_dir: Path, tokenizer, overwrite: bool) -> None:
    """`moetrim apply` with a replace/naive/merge/d2 plan."""
    from moetrim.build.replace import apply_replace_plan
    from moetrim.checkpoint import make_recipe, save_checkpoint
    from moetrim.plan.replace import ReplacePlan

    plan = ReplacePlan.from_dict(plan_dict)
    with err.status("building replaced experts"):
        apply_replace_plan(model, plan, profile)
    with err.status(f"saving {out_dir}"):
        save_checkpoint(model, out_dir, tokenizer=tokenizer, plan=plan, recipe=make_recipe(plan, profile, model_path, "replaced"),
                        overwrite=overwrite)
    report_replace_plan(plan)
    out.print(f"saved [bold]{out_dir}[/] (load with moetrim.load)")


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
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Recover a compressed model: train only what compression created, annealed from the original model."""
    from moetrim.checkpoint import load_model, load_tokenizer, save_checkpoint
    from moetrim.cli import _quiet_transformers
    from moetrim.train import FinetuneConfig, finetune
    from moetrim.train.recover import parse_anneal

    cfg = FinetuneConfig(method="recover", lr=lr, max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                         lora=lora, seed=seed, anneal=anneal, blend_fraction=blend_fraction, kd_weight=kd_weight, progress=not quiet)
    cfg.check()
    wants_teacher = bool(parse_anneal(anneal))
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
            raise UsageError(f"{model_path} does not record the model it was compressed from; give --teacher MODEL or --anneal none")
    inputs = [src, *files] + ([model_dir(teacher_path)] if teacher_path else [])
    check_output(out_dir, kind="checkpoint", inputs=inputs, overwrite=overwrite, need_bytes=bytes_of_weights(model_path))
    _quiet_transformers()
    with err.status(f"loading {model_path}"):
        model = load_model(model_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        teacher = load_model(teacher_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code) if wants_teacher else None
    result = finetune(model, tokenizer, str(files[0]), cfg, teacher=teacher)
    new_recipe = dict(recipe)
    new_recipe["recover"] = {"steps": steps, "data": str(files[0]), "anneal": anneal, "lr": lr, "lora": lora,
                             "teacher": None if teacher_path is None else str(teacher_path)}
    save_checkpoint(result.model, out_dir, tokenizer=tokenizer, recipe=new_recipe, overwrite=overwrite,
                    extra_files={"recover.json": json.dumps(result.report, indent=2) + "\n"})
    rep = result.report
    out.print(f"recovered in {rep['steps']} steps ({rep['seconds']:.1f} s), final loss {rep['final_loss']:.4f}; "
              f"trained {rep['trainable_parameters']:,} parameters; saved [bold]{out_dir}[/]")


def register(app: typer.Typer) -> None:
    app.command("recover")(handled(recover_cmd))
