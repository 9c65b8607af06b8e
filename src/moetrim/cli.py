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
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ExponentsOpt,
    FisherModeOpt,
    GradCheckpointOpt,
    GranularityOpt,
    MaxMemoryOpt,
    MaxTokensOpt,
    MinWidthOpt,
    OffloadFolderOpt,
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
    placement,
    resolve_method,
)
from moetrim.cli_common import SequentialOpt, StreamingOpt, check_sequential
from moetrim.cli_stages import (  # noqa: F401  (_load, _calibrate, _quiet_transformers: used by the other cli modules)
    _apply_and_save,
    _apply_streaming,
    _calibrate,
    _calibrate_sequential,
    _load,
    _model_for_plan,
    _plan_and_stream,
    _quiet_transformers,
    _read_json,
    _report_plan,
)
from moetrim.checkpoint.atomic import raise_on_termination
from moetrim.checkpoint.outputs import bytes_of_weights, check_output
from moetrim.cli_replace import MaxGroupOpt, RankOpt, WeightingOpt, WhitenOpt
from moetrim.errors import UsageError

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make Mixture-of-Experts models smaller and faster: calibrate once, plan, apply, save.",
)


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
    from moetrim.evaluate.summary import PARTS, summarize

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
    whiten: bool = typer.Option(False, "--whiten", help="also record the Grams of each expert's inputs (replace/d2 --whiten; E·(H²+I²) floats per layer)"),
    dense_outputs: bool = typer.Option(False, "--dense-outputs", help="also run every expert on every token (merge, HC-SMoE; E/k times the experts' work)"),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[Path] = OffloadFolderOpt,
    grad_checkpoint: bool = GradCheckpointOpt,
    sequential: bool = SequentialOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Record every statistic any criterion needs, in one pass, into a profile file.
    Under torchrun / accelerate launch each process calibrates its share and rank 0 writes the profile."""
    from moetrim.calibrate.distributed import is_main_process

    files = data_files(data)
    check_output(out_path, kind="profile", inputs=[model_dir(model_path), *files], overwrite=overwrite)
    place = placement(device_map, max_memory, offload_folder, device, [model_dir(model_path), *files], {"--out": out_path})
    if grad_checkpoint and no_fisher:
        raise UsageError("--grad-checkpoint saves memory in the Fisher backward: it does nothing with --no-fisher")
    if sequential:
        check_sequential(place, grad_checkpoint, grad_magnitude, device)
        if not no_fisher:
            err.print("note: --sequential records forward statistics only (no Fisher: the loss needs the whole model)")
        profile = _calibrate_sequential(model_path, data, dtype, trust_remote_code, max_tokens=max_tokens, seq_len=seq_len,
                                        batch_size=batch_size, seed=seed, whiten=whiten, dense_outputs=dense_outputs)
        profile.save(out_path)
        out.print(f"profile of {len(profile.layers)} MoE layers, {profile.tokens:,} tokens (layer by layer, forward only) -> [bold]{out_path}[/]")
        return
    model = _load(model_path, dtype, device, trust_remote_code, **place)
    profile, _ = _calibrate(model, model_path, data, trust_remote_code, fisher=not no_fisher, max_tokens=max_tokens,
                            seq_len=seq_len, batch_size=batch_size, seed=seed, fisher_mode=fisher_mode, grad_magnitude=grad_magnitude,
                            whiten=whiten, dense_outputs=dense_outputs, grad_checkpoint=grad_checkpoint)
    if not is_main_process():
        return
    profile.save(out_path)
    ranks = f" from {profile.processes} processes" if profile.processes > 1 else ""
    out.print(f"profile of {len(profile.layers)} MoE layers, {profile.tokens:,} tokens{ranks} -> [bold]{out_path}[/]")


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
    model, layer_weights = _model_for_plan(model_path, trust_remote_code)
    plan = make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation,
                     min_width=min_width, round_to=round_to, protect=protect, seed=seed, exponents=exps, layer_weights=layer_weights)
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
    streaming: bool = StreamingOpt,
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

        if streaming:
            raise UsageError(f"--streaming applies dims and experts plans; a {raw.get('granularity')} plan builds bases from "
                             "whole layers in memory: drop --streaming")

        profile = load_profile(profile_path) if profile_path else None
        model = _load(model_path, dtype, device, trust_remote_code)
        tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
        return apply_replace(model, raw, profile, model_path, out_dir, tokenizer, overwrite)
    plan = load_plan(plan_path)
    profile = load_profile(profile_path) if profile_path else None
    tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
    if streaming:
        return _apply_streaming(model_path, plan, tokenizer, profile, out_dir, overwrite, dtype, device, trust_remote_code)
    model = _load(model_path, dtype, device, trust_remote_code)
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
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[Path] = OffloadFolderOpt,
    grad_checkpoint: bool = GradCheckpointOpt,
    sequential: bool = SequentialOpt,
    streaming: bool = StreamingOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Calibrate, plan, apply and save in one go (granularity dims, experts, replace, naive, merge or d2)."""
    from moetrim import criteria
    from moetrim.calibrate.distributed import env_world_size, is_main_process
    from moetrim.plan import make_plan
    from moetrim.plan.replace import is_replace_granularity

    place = placement(device_map, max_memory, offload_folder, device, [model_dir(model_path), *data_files(data)], {"--out": out_dir})
    if is_replace_granularity(granularity) and (sequential or streaming):
        raise UsageError(f"--granularity {granularity} builds bases from whole layers in memory: drop --sequential/--streaming")
    if is_replace_granularity(granularity) and (place or grad_checkpoint or env_world_size() > 1):
        raise UsageError(f"--granularity {granularity} builds on one device in one process: drop --device-map/--grad-checkpoint, "
                         "or calibrate with them and then `moetrim plan` + `moetrim apply`")
    if is_replace_granularity(granularity):
        from moetrim.cli_replace import compress_replace

        if criterion is not None:
            criteria.get_criterion(criterion, "expert")
        files = data_files(data)
        extra = [Path(recover_data)] if recover_data else []
        for f in extra:
            if not f.is_file():
                raise UsageError(f"recovery data file not found: {f}")
        check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), *files, *extra], overwrite=overwrite,
                     need_bytes=bytes_of_weights(model_path))
        if recover_steps:  # read now, not after calibrating and building
            from moetrim.data.text import read_documents

            read_documents(extra[0] if extra else files[0])
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
    crit = criteria.get_criterion(criterion, "dim" if granularity == "dims" else "expert")
    if sequential:
        check_sequential(place, grad_checkpoint, criterion == "grad_magnitude", device)
        if crit.needs_gradients:
            raise UsageError(f"--sequential records forward statistics only and criterion '{criterion}' needs gradients: pick a "
                             "forward criterion (activation, output_aware, router_weighted; reap, frequency ... for experts) or "
                             "calibrate with --device-map and --grad-checkpoint instead")
        profile = _calibrate_sequential(model_path, data, dtype, trust_remote_code, max_tokens=max_tokens, seq_len=seq_len,
                                        batch_size=batch_size, seed=seed)
        from moetrim.checkpoint import load_tokenizer

        _plan_and_stream(model_path, profile, load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code), out_dir,
                         overwrite, dtype, trust_remote_code, granularity=granularity, criterion=criterion, ratio=ratio,
                         allocation=allocation, min_width=min_width, round_to=round_to, protect=protect, seed=seed, exponents=exps)
        return
    model = _load(model_path, dtype, device, trust_remote_code, **place)
    profile, tokenizer = _calibrate(model, model_path, data, trust_remote_code, fisher=crit.needs_gradients,
                                    max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, fisher_mode=fisher_mode,
                                    grad_magnitude=criterion == "grad_magnitude", grad_checkpoint=grad_checkpoint and crit.needs_gradients)
    if not is_main_process():
        return  # data-parallel calibration: rank 0 plans, applies and writes
    if place or streaming:  # the model did not fit one device: plan and apply from the files, one layer at a time
        del model
        _plan_and_stream(model_path, profile, tokenizer, out_dir, overwrite, dtype, trust_remote_code, granularity=granularity,
                         criterion=criterion, ratio=ratio, allocation=allocation, min_width=min_width, round_to=round_to,
                         protect=protect, seed=seed, exponents=exps)
        return
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
