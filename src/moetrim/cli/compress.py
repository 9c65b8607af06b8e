"""`moetrim compress`: calibrate, plan, build and save in one go, every method (dims, experts,
replace, naive, merge, d2). The one-call flow is `moetrim.compress` (moetrim.pipeline.compress);
this command checks its options and outputs before anything loads, loads, calls it, saves and
prints. Models larger than memory take the paths that never hold them whole: --sequential
calibration, and planning and applying from the files (--streaming, or after --device-map)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moetrim.checkpoint.outputs import bytes_of_weights, check_output
from moetrim.cli.common import (
    BatchOpt, DeviceMapOpt, DeviceOpt, DtypeOpt, ExponentsOpt, FisherModeOpt, GradCheckpointOpt, GranularityOpt, MaxGroupOpt, MaxMemoryOpt,
    MaxTokensOpt, MergeMethodOpt, MinWidthOpt, NoviceOpt, OffloadFolderOpt, OverwriteOpt, ProtectOpt, RankOpt, RatioOpt, RoundToOpt,
    SeedOpt, SeqLenOpt, SequentialOpt,
    StreamingOpt, TrustOpt, WeightingOpt, WhitenOpt, allocation_option, calibration_tokenizer, check_sequential, criterion_option,
    data_files, handled, load, model_dir, method_granularity, parse_exponents, placement, resolve_method,
)
from moetrim.cli.results import calibrate_sequential, plan_and_stream, save_replaced, save_sliced
from moetrim.errors import UsageError


@handled
def compress(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference')"),
    data: Optional[str] = typer.Option(None, "--data", help=".txt or .jsonl calibration data (comma-separated for several); "
                                       "not needed by the weight-only criteria (aimer, magnitude, random)"),
    out_dir: Path = typer.Option(..., "--out", help="output checkpoint directory"),
    granularity: str = GranularityOpt,
    novice: bool = NoviceOpt,
    merge_method: str = MergeMethodOpt,
    auto: Optional[str] = typer.Option(None, "--method", help="auto: per layer, trim dims (Fisher or CAMERA-P), remove experts "
                                       "(REAP), make novices (MoNE), merge (HC-SMoE) or replace them, and how much, whichever "
                                       "costs least on --data (final-logit KL); see the plan's notes"),
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
    base_weighting: Optional[str] = WeightingOpt,
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
    from moetrim.calibrate.distributed import env_world_size
    from moetrim.plan.replace import is_replace_granularity

    granularity = method_granularity(granularity, novice, merge_method)
    if auto is not None:
        granularity = _check_auto(auto, granularity, criterion, allocation, data, sequential, streaming, device_map,
                                  dict(min_width=min_width, round_to=round_to, protect=protect or None, exponents=exponents,
                                       recover_steps=recover_steps or None))
    if data is None:
        _check_data_free(granularity, criterion)
    place = placement(device_map, max_memory, offload_folder, device, [model_dir(model_path), *data_files(data)], {"--out": out_dir})
    if is_replace_granularity(granularity) and (sequential or streaming):
        raise UsageError(f"--granularity {granularity} builds bases from whole layers in memory: drop --sequential/--streaming")
    if is_replace_granularity(granularity) and (place or grad_checkpoint or env_world_size() > 1):
        raise UsageError(f"--granularity {granularity} builds on one device in one process: drop --device-map/--grad-checkpoint, "
                         "or calibrate with them and then `moetrim plan` + `moetrim apply`")
    if is_replace_granularity(granularity):
        resolve_method(granularity, criterion, ratio, allocation)  # the criterion, if named
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
        return _compress_replacing(model_path, data, out_dir, granularity=granularity, criterion=criterion, ratio=ratio, rank=rank,
                                   max_group=max_group, base_weighting=base_weighting, whiten=whiten, max_tokens=max_tokens,
                                   seq_len=seq_len, batch_size=batch_size, fisher_mode=fisher_mode, seed=seed, overwrite=overwrite,
                                   recover_steps=recover_steps, recover_data=recover_data, recover_lr=recover_lr, device=device,
                                   dtype=dtype, trust_remote_code=trust_remote_code)
    criterion = resolve_method(granularity, criterion, ratio, allocation)
    exps = parse_exponents(exponents)
    files = data_files(data)
    check_output(out_dir, kind="checkpoint", inputs=[model_dir(model_path), *files], overwrite=overwrite,
                 need_bytes=bytes_of_weights(model_path))
    crit = criteria.get_criterion(criterion or "fisher", "dim" if granularity in ("dims", "auto") else "expert")
    method = dict(granularity=granularity, criterion=criterion, ratio=ratio, allocation=allocation, min_width=min_width,
                  round_to=round_to, protect=protect, seed=seed, exponents=exps)
    if sequential and data is None:
        raise UsageError("--sequential calibrates layer by layer: give --data, or drop --sequential (a weight-only criterion needs no pass)")
    if sequential:
        check_sequential(place, grad_checkpoint, criterion == "grad_magnitude", device)
        if crit.needs_gradients:
            raise UsageError(f"--sequential records forward statistics only and criterion '{criterion}' needs gradients: pick a "
                             "forward criterion (activation, output_aware, router_weighted; reap, frequency ... for experts) or "
                             "calibrate with --device-map and --grad-checkpoint instead")
        profile = calibrate_sequential(model_path, data, dtype, trust_remote_code, max_tokens=max_tokens, seq_len=seq_len,
                                       batch_size=batch_size, seed=seed)
        from moetrim.checkpoint import load_tokenizer

        plan_and_stream(model_path, profile, load_tokenizer(model_path, required=False, trust_remote_code=trust_remote_code), out_dir,
                        overwrite, dtype, trust_remote_code, **method)
        return
    model = load(model_path, dtype, device, trust_remote_code, **place)
    tokenizer = calibration_tokenizer(model, model_path, seq_len, trust_remote_code)
    _compress_slicing(model, model_path, data, tokenizer, out_dir, place=place, streaming=streaming, overwrite=overwrite, dtype=dtype,
                      trust_remote_code=trust_remote_code, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                      fisher_mode=fisher_mode, grad_checkpoint=grad_checkpoint, **method)


def _check_auto(auto: str, granularity: str, criterion, allocation, data, sequential: bool, streaming: bool, device_map,
                others: dict) -> str:
    """--method auto on its own: it picks granularity, criterion and allocation itself and measures on --data."""
    if auto != "auto":
        raise UsageError(f"unknown --method '{auto}': the one method is auto (or choose --granularity and --criterion)")
    if granularity != "dims" or criterion is not None or allocation is not None:
        raise UsageError("--method auto chooses the granularity, criterion and allocation per layer itself: drop "
                         "--granularity/--criterion/--allocation/--novice/--merge-method")
    named = [f"--{k.replace('_', '-')}" for k, v in others.items() if v is not None]
    if named:
        raise UsageError(f"--method auto plans with each candidate's defaults: drop {', '.join(named)}")
    if data is None:
        raise UsageError("--method auto measures every option on calibration data: give --data")
    if sequential or streaming or device_map:
        raise UsageError("--method auto runs the whole model many times in memory: drop --sequential/--streaming/--device-map")
    return "auto"


def _check_data_free(granularity: str, criterion: Optional[str]) -> None:
    """Without --data only a weight-only criterion can plan, and nothing may need calibration."""
    from moetrim import criteria
    from moetrim.plan.replace import is_replace_granularity

    if is_replace_granularity(granularity):
        raise UsageError(f"--granularity {granularity} needs --data: its groups come from calibration statistics")
    crit = resolve_method(granularity, criterion, 0.0, None)
    level = "dim" if granularity == "dims" else "expert"
    if criteria.get_criterion(crit, level).needs_profile:
        free = ", ".join(n for n in criteria.names(level) if not criteria.get_criterion(n, level).needs_profile)
        raise UsageError(f"--criterion {crit} reads calibration statistics: give --data, or pick a weight-only criterion ({free})")


def _compress_slicing(model, model_path, data, tokenizer, out_dir, *, place, streaming, overwrite, dtype, trust_remote_code,
                      max_tokens, seq_len, batch_size, fisher_mode, grad_checkpoint, **method) -> None:
    """dims and experts: in memory, or calibrated here and planned and applied from the files (a model
    spread over devices, or --streaming); under torchrun every process calibrates and rank 0 goes on."""
    from moetrim.calibrate import calibrate
    from moetrim.calibrate.distributed import env_world_size, is_main_process
    from moetrim.pipeline.compress import compress, statistics_needed

    profile = None
    if data is None and (place or streaming):  # a weight-only criterion: plan and apply from the files, nothing to calibrate
        del model
        plan_and_stream(model_path, None, tokenizer, out_dir, overwrite, dtype, trust_remote_code, **method)
        return
    if data is not None and (place or streaming or env_world_size() > 1):
        needs = statistics_needed(method["granularity"], method["criterion"], grad_checkpoint=grad_checkpoint)
        profile = calibrate(model, data, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                            seed=method["seed"], fisher_mode=fisher_mode, progress=True, **needs)
        if not is_main_process():
            return  # data-parallel calibration: rank 0 plans, applies and writes
        if place or streaming:  # the model did not fit one device: plan and apply from the files, one layer at a time
            del model
            plan_and_stream(model_path, profile, tokenizer, out_dir, overwrite, dtype, trust_remote_code, **method)
            return
    result = compress(model, data, method["granularity"], method["ratio"], tokenizer, profile=profile, criterion=method["criterion"],
                      allocation=method["allocation"], min_width=method["min_width"], round_to=method["round_to"],
                      protect=method["protect"], exponents=method["exponents"], max_tokens=max_tokens, seq_len=seq_len,
                      batch_size=batch_size, fisher_mode=fisher_mode, grad_checkpoint=grad_checkpoint, seed=method["seed"],
                      progress=True)
    from moetrim.apply import ApplyResult

    built = ApplyResult(result.report["format"], result.report["note"])
    save_sliced(result.model, result.plan, built, tokenizer, result.profile, model_path, out_dir, overwrite)


def _compress_replacing(model_path: str, data: str, out_dir: Path, *, granularity: str, criterion: Optional[str], ratio: float,
                        rank: int, max_group: int, base_weighting: str | None, whiten: bool, max_tokens, seq_len, batch_size: int,
                        fisher_mode: str, seed: int, overwrite: bool, recover_steps: int, recover_data: Optional[str],
                        recover_lr: float, device: str, dtype: str, trust_remote_code: bool) -> None:
    """replace, naive, merge, d2: calibrated (with mean outputs, and input Grams for --whiten), planned,
    built and optionally recovered in memory, then saved."""
    from moetrim.checkpoint import load_model
    from moetrim.model.view import find_moe_layers
    from moetrim.pipeline.compress import compress
    from moetrim.plan.replace import check_replace_options

    model = load(model_path, dtype, device, trust_remote_code)
    check_replace_options(granularity, ratio, rank, max_group, base_weighting, find_moe_layers(model))
    tokenizer = calibration_tokenizer(model, model_path, seq_len, trust_remote_code)
    result = compress(model, data, granularity, ratio, tokenizer, criterion=criterion, rank=rank, max_group=max_group,
                      base_weighting=base_weighting, whiten=whiten, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                      fisher_mode=fisher_mode, seed=seed, recover_steps=recover_steps, recover_data=recover_data, recover_lr=recover_lr,
                      teacher=lambda: load_model(model_path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code),
                      progress=True)
    save_replaced(result.model, result.plan, result.profile, model_path, out_dir, tokenizer, overwrite, result.report.get("recover"),
                  recover_data or data)
