"""`moetrim` command line: one command per stage (calibrate, plan, apply), `compress` for all of
them, plus inspect, merge, eval and demo. User mistakes end in one line and exit code 2; other
failures in one line and exit code 1; never a traceback for either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.cli_common import (
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    ExponentsOpt,
    FisherModeOpt,
    GranularityOpt,
    MaxTokensOpt,
    MinWidthOpt,
    OneLineErrors,
    OverwriteOpt,
    ProtectOpt,
    RatioOpt,
    RoundToOpt,
    SeedOpt,
    SeqLenOpt,
    TrustOpt,
    allocation_option,
    criterion_option,
    data_files,
    err,
    handled,
    model_dir,
    out,
    parse_exponents,
    resolve_method,
)
from moetrim.errors import UsageError
from moetrim.outputs import bytes_of_weights, check_output, raise_on_termination, refuse_inputs, write_text

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Mixture-of-Experts models smaller and faster: calibrate once, plan, apply, save.",
)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(model_path: str, dtype: str, device: str, trust_remote_code: bool):
    from moetrim.checkpoint import load_model

    _quiet_transformers()
    with err.status(f"loading {model_path}"):
        return load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _calibrate(model, model_path, data, trust_remote_code, *, fisher, max_tokens, seq_len, batch_size, seed, fisher_mode, grad_magnitude=False):
    from moetrim.calibrate import calibrate
    from moetrim.calibrate.run import model_context
    from moetrim.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    context = model_context(model)
    if seq_len is not None and context and seq_len > context:
        err.print(f"warning: --seq-len {seq_len} is longer than the model's context ({context} tokens); its statistics "
                  "describe positions the model never saw in training")
    profile = calibrate(
        model,
        data,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        fisher=fisher,
        fisher_mode=fisher_mode,
        grad_magnitude=grad_magnitude,
        progress=True,
    )
    return profile, tokenizer


def _report_plan(plan, fmt: str | None = None, note: str = "") -> None:
    t = Table(title="plan", show_header=False)
    t.add_row("method", f"{plan.granularity} / {plan.criterion} / {plan.allocation}")
    t.add_row("routed-expert params", f"{plan.params_before:,} -> {plan.params_after:,}")
    tol = f", tolerance ±{plan.ratio_tolerance:.1%}" if plan.ratio_tolerance is not None else ""
    t.add_row("removed", f"{plan.removed_fraction:.1%} (asked {plan.ratio:.1%}{tol})")
    experts = [len(l.kept_experts) for l in plan.layers]
    widths = [w for l in plan.layers for w in l.widths]
    t.add_row("experts per layer", f"{min(experts)}..{max(experts)} of {plan.layers[0].experts_before}")
    t.add_row("expert widths", f"{min(widths)}..{max(widths)} of {plan.layers[0].width_before}")
    if fmt:
        t.add_row("checkpoint", "standard (loads in plain transformers)" if fmt == "standard" else "variable-width (load with moetrim.load)")
    out.print(t)
    if note:
        err.print(f"note: {note}")


def _apply_and_save(model, plan, tokenizer, profile, model_path, out_dir: Path, overwrite: bool):
    from moetrim.apply import apply_plan
    from moetrim.checkpoint import make_recipe, save_checkpoint

    result = apply_plan(model, plan)
    with err.status(f"saving {out_dir}"):
        save_checkpoint(
            model,
            out_dir,
            tokenizer=tokenizer,
            plan=plan,
            profile=profile,
            recipe=make_recipe(plan, profile, model_path, result.format),
            overwrite=overwrite,
        )
    _report_plan(plan, result.format, result.note)
    out.print(f"saved [bold]{out_dir}[/]")


# -- commands -------------------------------------------------------------------------------
@app.command()
@handled
def inspect(
    path: str = typer.Argument(..., help="model directory (or 'reference')"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    trust_remote_code: bool = TrustOpt,
):
    """Show a model's MoE layers, experts, widths, and parameters and memory by part (reads no weights)."""
    from moetrim.checkpoint import load_model
    from moetrim.summary import PARTS, summarize

    _quiet_transformers()
    s = summarize(load_model(path, meta=True, trust_remote_code=trust_remote_code))
    if as_json:
        out.print_json(json.dumps(s))
        return
    out.print(f"[bold]{path}[/]: {s['family']} ({s['class']}), {s['dtype']}, {s['decoder_layers']} decoder layers, "
              f"{len(s['moe_layers'])} MoE layers, {s['format']} format")
    lt = Table(title="MoE layers")
    for c in ("layer", "experts", "top-k", "width min/mean/max", "routing", "shared", "routed params"):
        lt.add_column(c, justify="right" if c not in ("routing", "shared") else "left")
    for l in s["moe_layers"]:
        lt.add_row(str(l["layer"]), str(l["experts"]), str(l["top_k"]), f"{l['width_min']}/{l['width_mean']:g}/{l['width_max']}",
                   l["routing"], ",".join(l["shared"]) or "-", f"{l['routed_params']:,}")
    out.print(lt)
    pt = Table(title="parameters and weight memory")
    pt.add_column("part")
    pt.add_column("params", justify="right")
    pt.add_column("MiB", justify="right")
    pt.add_column("share", justify="right")
    for part in PARTS:
        if s["params"][part]:
            pt.add_row(part.replace("_", " "), f"{s['params'][part]:,}", f"{s['bytes'][part] / 2**20:.2f}", f"{s['bytes'][part] / s['total_bytes']:.1%}")
    pt.add_row("[bold]total", f"{s['total_params']:,}", f"{s['total_bytes'] / 2**20:.2f}", "100%")
    out.print(pt)


@app.command("calibrate")
@handled
def calibrate_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference')"),
    data: str = typer.Option(..., "--data", help=".txt or .jsonl calibration data (comma-separated for several)"),
    out_path: Path = typer.Option(Path("profile.safetensors"), "--out", help="profile file to write"),
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    batch_size: int = BatchOpt,
    no_fisher: bool = typer.Option(False, "--no-fisher", help="forward pass only: no gradient statistics"),
    fisher_mode: str = FisherModeOpt,
    grad_magnitude: bool = typer.Option(False, "--grad-magnitude", help="also record per-sequence weight-gradient magnitudes (costs more)"),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Record every statistic any criterion needs, in one pass, into a profile file."""
    files = data_files(data)
    check_output(out_path, kind="profile", inputs=[model_dir(model_path), *files], overwrite=overwrite)
    model = _load(model_path, dtype, device, trust_remote_code)
    profile, _ = _calibrate(model, model_path, data, trust_remote_code, fisher=not no_fisher, max_tokens=max_tokens,
                            seq_len=seq_len, batch_size=batch_size, seed=seed, fisher_mode=fisher_mode, grad_magnitude=grad_magnitude)
    profile.save(out_path)
    out.print(f"profile of {len(profile.layers)} MoE layers, {profile.tokens:,} tokens -> [bold]{out_path}[/]")


@app.command("plan")
@handled
def plan_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="the model the profile was made from (directory, or 'reference')"),
    profile_path: Optional[Path] = typer.Option(None, "--profile", help="profile from `moetrim calibrate`"),
    granularity: str = GranularityOpt,
    criterion: Optional[str] = criterion_option(),
    ratio: float = RatioOpt,
    allocation: Optional[str] = allocation_option(),
    min_width: Optional[int] = MinWidthOpt,
    round_to: Optional[int] = RoundToOpt,
    protect: int = ProtectOpt,
    exponents: Optional[str] = ExponentsOpt,
    seed: int = SeedOpt,
    out_path: Path = typer.Option(Path("plan.json"), "--out", help="plan file to write (JSON)"),
    overwrite: bool = OverwriteOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Decide which experts and dimensions stay; writes a JSON plan."""
    from moetrim.calibrate import load_profile
    from moetrim.plan import make_plan

    criterion = resolve_method(granularity, criterion, ratio, allocation)
    exps = parse_exponents(exponents)
    check_output(out_path, kind="plan", inputs=[model_dir(model_path), profile_path], overwrite=overwrite)
    profile = load_profile(profile_path) if profile_path else None
    model = _load(model_path, "auto", "cpu", trust_remote_code)
    plan = make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation,
                     min_width=min_width, round_to=round_to, protect=protect, seed=seed, exponents=exps)
    plan.save(out_path)
    _report_plan(plan)
    out.print(f"plan -> [bold]{out_path}[/]")


@app.command("apply")
@handled
def apply_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="the model directory the plan was made for (or 'reference')"),
    plan_path: Path = typer.Option(..., "--plan", help="plan from `moetrim plan`"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    profile_path: Optional[Path] = typer.Option(None, "--profile", help="profile to store beside the checkpoint"),
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Apply a plan: real smaller tensors, saved atomically to --out."""
    from moetrim.calibrate import load_profile
    from moetrim.checkpoint import load_tokenizer
    from moetrim.plan import load_plan

    check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), plan_path, profile_path], overwrite=overwrite,
                 need_bytes=bytes_of_weights(model_path))
    plan = load_plan(plan_path)
    profile = load_profile(profile_path) if profile_path else None
    model = _load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
    _apply_and_save(model, plan, tokenizer, profile, model_path, out_dir, overwrite)


@app.command()
@handled
def compress(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference')"),
    data: str = typer.Option(..., "--data", help=".txt or .jsonl calibration data (comma-separated for several)"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    granularity: str = GranularityOpt,
    criterion: Optional[str] = criterion_option(),
    ratio: float = RatioOpt,
    allocation: Optional[str] = allocation_option(),
    min_width: Optional[int] = MinWidthOpt,
    round_to: Optional[int] = RoundToOpt,
    protect: int = ProtectOpt,
    exponents: Optional[str] = ExponentsOpt,
    max_tokens: Optional[int] = MaxTokensOpt,
    seq_len: Optional[int] = SeqLenOpt,
    batch_size: int = BatchOpt,
    fisher_mode: str = FisherModeOpt,
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Calibrate, plan, apply and save in one go."""
    from moetrim import criteria
    from moetrim.plan import make_plan

    criterion = resolve_method(granularity, criterion, ratio, allocation)
    exps = parse_exponents(exponents)
    files = data_files(data)
    check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), *files], overwrite=overwrite,
                 need_bytes=bytes_of_weights(model_path))
    model = _load(model_path, dtype, device, trust_remote_code)
    crit = criteria.get_criterion(criterion, "dim" if granularity == "dims" else "expert")
    profile, tokenizer = _calibrate(model, model_path, data, trust_remote_code, fisher=crit.needs_gradients,
                                    max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, fisher_mode=fisher_mode,
                                    grad_magnitude=criterion == "grad_magnitude")
    plan = make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation,
                     min_width=min_width, round_to=round_to, protect=protect, seed=seed, exponents=exps)
    _apply_and_save(model, plan, tokenizer, profile, model_path, out_dir, overwrite)


@app.command()
@handled
def merge(
    profiles: list[Path] = typer.Argument(..., help="profiles of the same model"),
    out_path: Path = typer.Option(..., "--out", help="merged profile file to write"),
    overwrite: bool = OverwriteOpt,
):
    """Add profiles of the same model (from shards, ranks or sessions) into one."""
    from moetrim.calibrate import load_profile

    if len(profiles) < 2:
        raise UsageError("merge needs at least two profiles")
    check_output(out_path, kind="profile", inputs=profiles, overwrite=overwrite)
    merged = load_profile(profiles[0])
    for p in profiles[1:]:
        merged = merged.merge(load_profile(p))
    merged.save(out_path)
    out.print(f"merged {len(profiles)} profiles, {merged.tokens:,} tokens -> [bold]{out_path}[/]")


@app.command("eval")
@handled
def eval_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference')"),
    tasks: str = typer.Option("all", "--tasks", help="comma-separated domains, or 'all'"),
    n: Optional[int] = typer.Option(None, "--n", help="evaluation items per domain (default: the full eval split)"),
    batch_size: int = typer.Option(64, "--batch-size", help="items generated at once"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the results here (replaces a JSON file already there)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Accuracy (greedy exact match) and perplexity per task domain."""
    from moetrim.checkpoint import load_tokenizer
    from moetrim.data.tasks import parse_domains
    from moetrim.evaluate.tasks_eval import evaluate_tasks

    try:
        domains = parse_domains(tasks)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if n is not None and n < 1:
        raise UsageError("--n must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if json_path is not None:
        check_output(json_path, kind="json", inputs=[model_dir(model_path)], overwrite=True, option="--json")
    model = _load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    try:
        res = evaluate_tasks(model, tokenizer, domains, n=n, batch_size=batch_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    t = Table(title=f"{model_path}")
    for c in ("domain", "accuracy", "perplexity", "items"):
        t.add_column(c, justify="left" if c == "domain" else "right")
    for d in domains:
        t.add_row(d, f"{res['accuracy'][d]:.3f}", f"{res['perplexity'][d]:.3f}", str(res["n"][d]))
    out.print(t)
    if json_path is not None:
        write_text(json_path, json.dumps(res, indent=2))


@app.command()
@handled
def demo(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="results folder (default: a fresh ./moetrim-demo*)"),
    model_path: str = typer.Option("reference", "--model", help="model directory with a tokenizer (default: the bundled reference)"),
    ratio: float = RatioOpt,
    criterion: str = typer.Option("fisher", "--criterion", help="dims criterion (see `moetrim plan --help`)"),
    eval_items: int = typer.Option(200, "--eval-items", help="evaluation items per domain"),
    seed: int = SeedOpt,
):
    """Compress the bundled reference model (Fisher, 50% of routed-expert weights, global) and
    compare dense vs compressed: accuracy, perplexity, memory, tokens/s."""
    from moetrim.demo import fresh_out_dir, run_demo

    resolve_method("dims", criterion, ratio, "global")
    if eval_items < 1:
        raise UsageError("--eval-items must be at least 1")
    target = out_dir or fresh_out_dir()
    refuse_inputs(target, [model_dir(model_path)])
    empty = target.is_dir() and not any(target.iterdir())
    if target.exists() and not empty:
        raise UsageError(f"{target} already exists and is not empty; choose another --out")
    check_output(target, kind="folder", inputs=[model_dir(model_path)], overwrite=empty, need_bytes=bytes_of_weights(model_path))
    _quiet_transformers()
    res = run_demo(target, model=model_path, ratio=ratio, criterion=criterion, eval_items=eval_items, seed=seed,
                   log=lambda s: err.print(s))
    d, c = res["dense"], res["compressed"]
    title = "tiny random model (no reference weights bundled)" if res["method"]["fallback_tiny_random_model"] else str(res["method"]["model"])
    t = Table(title=f"{title}: dense vs {res['method']['criterion']} dims {res['method']['removed_fraction']:.0%} removed ({res['method']['allocation']})")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    for dom in d["accuracy"]:
        t.add_row(f"accuracy: {dom}", f"{d['accuracy'][dom]:.3f}", f"{c['accuracy'][dom]:.3f}",
                  f"{c['accuracy'][dom] / d['accuracy'][dom]:.2f}" if d["accuracy"][dom] else "-")
    acc_ratio = res["ratios"]["mean_accuracy"]
    t.add_row("[bold]accuracy: mean", f"{d['mean_accuracy']:.3f}", f"{c['mean_accuracy']:.3f}", "-" if acc_ratio is None else f"{acc_ratio:.2f}")
    for dom in d["perplexity"]:
        t.add_row(f"perplexity: {dom}", f"{d['perplexity'][dom]:.3f}", f"{c['perplexity'][dom]:.3f}", f"{c['perplexity'][dom] / d['perplexity'][dom]:.2f}")
    t.add_row("weight memory (MiB)", f"{d['weight_bytes'] / 2**20:.2f}", f"{c['weight_bytes'] / 2**20:.2f}", f"{res['ratios']['weight_bytes']:.2f}")
    for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s (batch 1)"),
                       ("decode_tokens_per_s_b8", "decode tokens/s (batch 8)")):
        t.add_row(label, f"{d[key]:.0f}", f"{c[key]:.0f}", f"{c[key] / d[key]:.2f}")
    out.print(t)
    out.print(f"results -> [bold]{target / 'results.json'}[/]; compressed checkpoint -> [bold]{target / 'compressed'}[/] "
              f"({res['method']['checkpoint_format']} format; {res['seconds']:.0f} s)")


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP unwind like Ctrl-C, so temporaries are removed."""
    raise_on_termination()
    app()


if __name__ == "__main__":
    main()
