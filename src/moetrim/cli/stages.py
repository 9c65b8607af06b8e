"""The stage commands: `inspect` (what a model is made of), `calibrate` (a profile), `plan` (a reviewable
JSON plan, any granularity), `apply` (a plan made real and saved) and `merge` (profiles added).
Each parses, checks its outputs before any work, calls the library and prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.checkpoint.outputs import bytes_of_weights, check_output
from moetrim.cli.common import (
    BatchOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, ExponentsOpt, FisherModeOpt, GradCheckpointOpt, GranularityOpt, MaxGroupOpt, MaxMemoryOpt,
    MaxTokensOpt, MergeMethodOpt, MinWidthOpt, NoviceOpt, OffloadFolderOpt, OverwriteOpt, ProtectOpt, RankOpt, RatioOpt, RoundToOpt,
    SeedOpt, SeqLenOpt, SequentialOpt,
    StreamingOpt, TrustOpt, WeightingOpt, allocation_option, calibration_tokenizer, check_sequential, criterion_option, data_files, err,
    handled, load, model_dir, method_granularity, out, parse_exponents, placement, quiet_transformers, read_json, resolve_method,
)
from moetrim.cli.results import (
    apply_streaming, calibrate_sequential, model_for_plan, report_plan, report_replace_plan, save_replaced, save_sliced,
)
from moetrim.errors import UsageError


# -- commands -------------------------------------------------------------------------------
@handled
def inspect(
    path: str = typer.Argument(..., help="model directory (or 'reference')"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    trust_remote_code: bool = TrustOpt,
):
    """Show a model's MoE layers, experts, widths, and parameters and memory by part (reads no weights)."""
    from moetrim.checkpoint import load_model
    from moetrim.evaluate.summary import PARTS, summarize

    quiet_transformers()
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
    from moetrim.calibrate import calibrate
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
        profile = calibrate_sequential(model_path, data, dtype, trust_remote_code, max_tokens=max_tokens, seq_len=seq_len,
                                       batch_size=batch_size, seed=seed, whiten=whiten, dense_outputs=dense_outputs)
        profile.save(out_path)
        out.print(f"profile of {len(profile.layers)} MoE layers, {profile.tokens:,} tokens (layer by layer, forward only) -> [bold]{out_path}[/]")
        return
    model = load(model_path, dtype, device, trust_remote_code, **place)
    tokenizer = calibration_tokenizer(model, model_path, seq_len, trust_remote_code)
    profile = calibrate(model, data, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                        fisher=not no_fisher, fisher_mode=fisher_mode, grad_magnitude=grad_magnitude, whiten=whiten,
                        dense_outputs=dense_outputs, grad_checkpoint=grad_checkpoint, progress=True)
    if not is_main_process():
        return
    profile.save(out_path)
    ranks = f" from {profile.processes} processes" if profile.processes > 1 else ""
    out.print(f"profile of {len(profile.layers)} MoE layers, {profile.tokens:,} tokens{ranks} -> [bold]{out_path}[/]")


@handled
def plan_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="the model the profile was made from (directory, or 'reference')"),
    profile_path: Optional[Path] = typer.Option(None, "--profile", help="profile from `moetrim calibrate`"),
    granularity: str = GranularityOpt,
    novice: bool = NoviceOpt,
    merge_method: str = MergeMethodOpt,
    criterion: Optional[str] = criterion_option(),
    ratio: float = RatioOpt,
    allocation: Optional[str] = allocation_option(),
    min_width: Optional[int] = MinWidthOpt,
    round_to: Optional[int] = RoundToOpt,
    protect: int = ProtectOpt,
    exponents: Optional[str] = ExponentsOpt,
    rank: int = RankOpt,
    max_group: int = MaxGroupOpt,
    base_weighting: Optional[str] = WeightingOpt,
    seed: int = SeedOpt,
    out_path: Path = typer.Option(Path("plan.json"), "--out", help="plan file to write (JSON)"),
    overwrite: bool = OverwriteOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Decide which experts and dimensions stay (or become shared bases + corrections); writes a JSON plan."""
    from moetrim.calibrate import load_profile
    from moetrim.plan import make_plan
    from moetrim.plan.replace import is_replace_granularity

    granularity = method_granularity(granularity, novice, merge_method)
    if is_replace_granularity(granularity):
        if profile_path is None:
            raise UsageError(f"--granularity {granularity} needs --profile (mean expert outputs decide the groups)")
        check_output(out_path, kind="plan", inputs=[model_dir(model_path), profile_path], overwrite=overwrite)
        profile = load_profile(profile_path)
        model = load(model_path, "auto", "cpu", trust_remote_code)
        plan = make_plan(model, profile, granularity=granularity, ratio=ratio, rank=rank, criterion=criterion,
                         max_group=max_group, base_weighting=base_weighting, seed=seed)
        plan.save(out_path)
        report_replace_plan(plan)
        out.print(f"plan -> [bold]{out_path}[/]")
        return
    criterion = resolve_method(granularity, criterion, ratio, allocation)
    exps = parse_exponents(exponents)
    check_output(out_path, kind="plan", inputs=[model_dir(model_path), profile_path], overwrite=overwrite)
    profile = load_profile(profile_path) if profile_path else None
    model, layer_weights = model_for_plan(model_path, trust_remote_code)
    plan = make_plan(model, profile, granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation,
                     min_width=min_width, round_to=round_to, protect=protect, seed=seed, exponents=exps, layer_weights=layer_weights)
    plan.save(out_path)
    report_plan(plan)
    out.print(f"plan -> [bold]{out_path}[/]")


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
    from moetrim.apply import apply_plan
    from moetrim.calibrate import load_profile
    from moetrim.checkpoint import load_tokenizer
    from moetrim.plan import ReplacePlan, load_plan
    from moetrim.plan.replace import is_replace_granularity

    check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), plan_path, profile_path], overwrite=overwrite,
                 need_bytes=bytes_of_weights(model_path))
    raw = read_json(plan_path)
    if isinstance(raw, dict) and is_replace_granularity(raw.get("granularity")):
        if streaming:
            raise UsageError(f"--streaming applies dims and experts plans; a {raw.get('granularity')} plan builds bases from "
                             "whole layers in memory: drop --streaming")

        profile = load_profile(profile_path) if profile_path else None
        model = load(model_path, dtype, device, trust_remote_code)
        tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
        plan = ReplacePlan.from_dict(raw)
        with err.status("building replaced experts"):
            apply_plan(model, plan, profile)
        return save_replaced(model, plan, profile, model_path, out_dir, tokenizer, overwrite)
    plan = load_plan(plan_path)
    profile = load_profile(profile_path) if profile_path else None
    tokenizer = load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code)
    if streaming:
        return apply_streaming(model_path, plan, tokenizer, profile, out_dir, overwrite, dtype, device, trust_remote_code)
    model = load(model_path, dtype, device, trust_remote_code)
    save_sliced(model, plan, apply_plan(model, plan), tokenizer, profile, model_path, out_dir, overwrite)


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
