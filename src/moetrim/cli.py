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
from moetrim.cli_replace import MaxGroupOpt, RankOpt, WeightingOpt, WhitenOpt
from moetrim.errors import UsageError
from moetrim.outputs import bytes_of_weights, check_output, raise_on_termination

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


def _calibrate(model, model_path, data, trust_remote_code, *, fisher, max_tokens, seq_len, batch_size, seed, fisher_mode, grad_magnitude=False,
               whiten=False):
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
        whiten=whiten,
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
    rank: int = RankOpt,
    max_group: int = MaxGroupOpt,
    base_weighting: str = WeightingOpt,
    seed: int = SeedOpt,
    out_path: Path = typer.Option(Path("plan.json"), "--out", help="plan file to write (JSON)"),
    overwrite: bool = OverwriteOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Decide which experts and dimensions stay (or become shared bases + corrections); writes a JSON plan."""
    from moetrim.calibrate import load_profile
    from moetrim.plan import make_plan
    from moetrim.plan.replace import is_replace_granularity

    if is_replace_granularity(granularity):
        from moetrim.cli_replace import plan_replace

        return plan_replace(model_path, profile_path, out_path, granularity=granularity, criterion=criterion, ratio=ratio, rank=rank,
                            max_group=max_group, base_weighting=base_weighting, seed=seed, overwrite=overwrite,
                            trust_remote_code=trust_remote_code)
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
    from moetrim.plan.replace import is_replace_granularity

    raw = _read_json(plan_path)
    if isinstance(raw, dict) and is_replace_granularity(raw.get("granularity")):
        from moetrim.cli_replace import apply_replace

        profile = load_profile(profile_path) if profile_path else None
        model = _load(model_path, dtype, device, trust_remote_code)
        tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
        return apply_replace(model, raw, profile, model_path, out_dir, tokenizer, overwrite)
    plan = load_plan(plan_path)
    profile = load_profile(profile_path) if profile_path else None
    model = _load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
    _apply_and_save(model, plan, tokenizer, profile, model_path, out_dir, overwrite)


def _read_json(path: Path):
    """The plan file's JSON, or None when it is not JSON (load_plan then says what is wrong)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    rank: int = RankOpt,
    max_group: int = MaxGroupOpt,
    base_weighting: str = WeightingOpt,
    whiten: bool = WhitenOpt,
    recover_steps: int = typer.Option(0, "--recover-steps", help="replace/naive/merge/d2: recovery steps after building (0: none)"),
    recover_data: Optional[str] = typer.Option(None, "--recover-data", help="recovery data (default: the first --data file)"),
    recover_lr: float = typer.Option(1e-4, "--recover-lr", help="recovery learning rate"),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Calibrate, plan, apply and save in one go (granularity dims, experts, replace, naive, merge or d2)."""
    from moetrim import criteria
    from moetrim.plan import make_plan
    from moetrim.plan.replace import is_replace_granularity

    if is_replace_granularity(granularity):
        from moetrim.cli_replace import compress_replace

        if criterion is not None:
            criteria.get_criterion(criterion, "expert")
        if recover_steps < 0:
            raise UsageError("--recover-steps must be >= 0")
        files = data_files(data)
        extra = [Path(recover_data)] if recover_data else []
        for f in extra:
            if not f.is_file():
                raise UsageError(f"recovery data file not found: {f}")
        check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), *files, *extra], overwrite=overwrite,
                     need_bytes=bytes_of_weights(model_path))
        model = _load(model_path, dtype, device, trust_remote_code)
        return compress_replace(model, model_path, data, out_dir, granularity=granularity, criterion=criterion, ratio=ratio,
                                rank=rank, max_group=max_group, base_weighting=base_weighting, whiten=whiten, max_tokens=max_tokens,
                                seq_len=seq_len, batch_size=batch_size, fisher_mode=fisher_mode, seed=seed, overwrite=overwrite,
                                recover_steps=recover_steps, recover_data=recover_data, recover_lr=recover_lr, dtype=dtype,
                                trust_remote_code=trust_remote_code)
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


# Commands kept in modules of their own (each adds itself to `app`), in the order `--help` lists them.
from moetrim.cli_eval import register as _register_eval  # noqa: E402
from moetrim.cli_finetune import register as _register_finetune  # noqa: E402
from moetrim.cli_replace import register as _register_replace  # noqa: E402
from moetrim.cli_routing import register as _register_routing  # noqa: E402

for _register in (_register_eval, _register_finetune, _register_replace, _register_routing):
    _register(app)


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP unwind like Ctrl-C, so temporaries are removed."""
    raise_on_termination()
    app()


if __name__ == "__main__":
    main()
