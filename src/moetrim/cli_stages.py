"""What the stage commands share: loading quietly, calibrating, reporting a plan, applying and saving
in memory or streaming from the files (models larger than memory)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from moetrim.cli_common import err, out
from moetrim.errors import UsageError


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load(model_path: str, dtype: str, device: str, trust_remote_code: bool, **place):
    """The model, on --device (under torchrun: this process's GPU), or spread by `place` (cli_common.placement)."""
    from moetrim.calibrate.distributed import rank_device
    from moetrim.checkpoint import load_model
    from moetrim.cli_common import offload_scratch

    _quiet_transformers()
    with err.status(f"loading {model_path}"):
        return load_model(model_path, dtype=dtype, device=rank_device(device), trust_remote_code=trust_remote_code,
                          **offload_scratch(place))


def _calibrate(model, model_path, data, trust_remote_code, *, fisher, max_tokens, seq_len, batch_size, seed, fisher_mode, grad_magnitude=False,
               whiten=False, dense_outputs=False, grad_checkpoint=False):
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
        dense_outputs=dense_outputs,
        grad_checkpoint=grad_checkpoint,
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
    from moetrim.build.slicing import apply_plan
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


def _model_for_plan(model_path: str, trust_remote_code: bool):
    """A plan needs shapes, routers (the fingerprint) and, for weight criteria, one layer's experts at a
    time: an original checkpoint is opened on disk and never loaded whole."""
    from moetrim.checkpoint.disk import DiskModel
    from moetrim.checkpoint.load_save import MODEL_TYPES, _read_config, resolve_model_path

    if _read_config(resolve_model_path(model_path)).get("model_type") in MODEL_TYPES:
        return _load(model_path, "auto", "cpu", trust_remote_code), None  # refused by make_plan with its own message
    _quiet_transformers()
    with err.status(f"reading the shapes and routers of {model_path}"):
        disk = DiskModel(model_path, trust_remote_code=trust_remote_code)
    return disk.model, disk.layer_weights


def _apply_streaming(model_path, plan, tokenizer, profile, out_dir: Path, overwrite: bool, dtype: str, device: str, trust_remote_code: bool):
    from moetrim.build.streaming import apply_streaming
    from moetrim.checkpoint.disk import DiskModel

    if device not in ("cpu", None):
        raise UsageError("--streaming slices the checkpoint on the CPU: drop --device")
    _quiet_transformers()
    disk = DiskModel(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    result = apply_streaming(disk, plan, out_dir, tokenizer=tokenizer, profile=profile, source=model_path, overwrite=overwrite,
                             progress=True)
    _report_plan(plan, result.format, result.note)
    out.print(f"saved [bold]{out_dir}[/]")


def _read_json(path: Path):
    """The plan file's JSON, or None when it is not JSON (load_plan then says what is wrong)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _plan_and_stream(model_path, profile, tokenizer, out_dir, overwrite, dtype, trust_remote_code, **method):
    from moetrim.plan import make_plan

    model, layer_weights = _model_for_plan(model_path, trust_remote_code)
    plan = make_plan(model, profile, layer_weights=layer_weights, **method)
    _apply_streaming(model_path, plan, tokenizer, profile, out_dir, overwrite, dtype, "cpu", trust_remote_code)


def _calibrate_sequential(model_path, data, dtype, trust_remote_code, **opts):
    from moetrim.calibrate.sequential import calibrate_sequential
    from moetrim.checkpoint import load_tokenizer

    _quiet_transformers()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    return calibrate_sequential(model_path, data, tokenizer=tokenizer, dtype=dtype, progress=True, trust_remote_code=trust_remote_code,
                                **opts)
