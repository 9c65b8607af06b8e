"""What the stage commands (`plan`, `apply`, `compress`) show and save: the plan as a table, a
compressed model saved with its plan, profile and recipe, and the streaming path that plans and
applies from the checkpoint's files (models larger than memory) with its progress on screen."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from moetrim.cli.common import err, out, quiet_transformers
from moetrim.errors import UsageError


def report_plan(plan, fmt: str | None = None, note: str = "") -> None:
    from moetrim.plan import ReplacePlan

    if isinstance(plan, ReplacePlan):  # --method auto chose a replace method alone
        report_replace_plan(plan)
        _report_auto_notes(plan, note)
        return
    t = Table(title="plan", show_header=False)
    t.add_row("method", f"{plan.granularity} / {plan.criterion} / {plan.allocation}")
    t.add_row("routed-expert params", f"{plan.params_before:,} -> {plan.params_after:,}")
    tol = f", tolerance ±{plan.ratio_tolerance:.1%}" if plan.ratio_tolerance is not None else ""
    t.add_row("removed", f"{plan.removed_fraction:.1%} (asked {plan.ratio:.1%}{tol})")
    experts = [len(l.kept_experts) for l in plan.layers]
    widths = [w for l in plan.layers for w in l.widths]
    t.add_row("experts per layer", f"{min(experts)}..{max(experts)} of {plan.layers[0].experts_before}")
    t.add_row("expert widths", f"{min(widths)}..{max(widths)} of {plan.layers[0].width_before}")
    if plan.replaced_layers:
        t.add_row("replaced layers", "; ".join(f"{r.layer}: {len(r.kept)} kept, {len(r.novices)} novices, "
                                               f"{sum(len(g) for g in r.groups)} in {len(r.groups)} groups (rank {r.rank})"
                                               for r in plan.replaced_layers))
    if fmt:
        t.add_row("checkpoint", {"standard": "standard (loads in plain transformers)", "replaced": "replaced experts (load with moetrim.load)"}
                  .get(fmt, "variable-width (load with moetrim.load)"))
    out.print(t)
    _report_auto_notes(plan, note)


def _report_auto_notes(plan, note: str) -> None:
    for line in (n for n in getattr(plan, "notes", []) if n.startswith("auto:")):  # what --method auto chose, and why
        out.print(line)
    if note:
        err.print(f"note: {note}")


def report_replace_plan(plan) -> None:
    t = Table(title="plan", show_header=False)
    t.add_row("method", f"{plan.granularity} / {plan.criterion} / rank {plan.rank}")
    counted = {"novice": "novice vectors counted", "ream": "merged experts"}.get(plan.granularity, "bases and corrections counted")
    t.add_row("routed-expert params", f"{plan.params_before:,} -> {plan.params_after:,} stored ({counted})")
    t.add_row("removed", f"{plan.removed_fraction:.1%} (asked {plan.ratio:.1%})")

    def layer(l) -> str:
        if plan.granularity == "novice":
            return f"{l.layer}: {len(l.kept)} kept, {len(l.novices)} novices"
        if plan.granularity == "ream":
            return f"{l.layer}: {len(l.groups)} kept, {sum(len(g) - 1 for g in l.groups)} merged into them"
        return f"{l.layer}: {len(l.kept)} kept, {sum(len(g) for g in l.groups)} in {len(l.groups)} groups"

    t.add_row("per layer", "; ".join(layer(l) for l in plan.layers))
    out.print(t)


def save_sliced(model, plan, result, tokenizer, profile, model_path, out_dir: Path, overwrite: bool) -> None:
    """Save a model a dims or experts plan was applied to (`result`: its ApplyResult), with its plan,
    profile and recipe, and show the plan."""
    from moetrim.checkpoint import make_recipe, save_checkpoint

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
    report_plan(plan, result.format, result.note)
    out.print(f"saved [bold]{out_dir}[/]")


def save_replaced(model, plan, profile, model_path, out_dir: Path, tokenizer, overwrite: bool, recover: dict | None = None,
                  recover_data: str | None = None) -> None:
    """Save a model with replaced experts, with its plan and recipe (and recovery's record and report),
    and show the plan."""
    import json

    from moetrim.checkpoint import make_recipe, save_checkpoint

    recipe = make_recipe(plan, profile, model_path, plan.checkpoint_format)
    extra = {}
    if recover:
        recipe["recover"] = {"steps": recover["steps"], "data": recover_data, "anneal": recover["anneal"], "lr": recover["lr"]}
        extra["recover.json"] = json.dumps(recover["report"], indent=2) + "\n"
    with err.status(f"saving {out_dir}"):
        save_checkpoint(model, out_dir, tokenizer=tokenizer, plan=plan, recipe=recipe, overwrite=overwrite, extra_files=extra)
    report_replace_plan(plan)
    out.print(f"saved [bold]{out_dir}[/] (load with moetrim.load)")


def model_for_plan(model_path: str, trust_remote_code: bool):
    """A plan needs shapes, routers (the fingerprint) and, for weight criteria, one layer's experts at a
    time: an original checkpoint is opened on disk and never loaded whole."""
    from moetrim.checkpoint.disk import DiskModel
    from moetrim.checkpoint.load_save import MODEL_TYPES, _read_config, resolve_model_path
    from moetrim.cli.common import load

    if _read_config(resolve_model_path(model_path)).get("model_type") in MODEL_TYPES:
        return load(model_path, "auto", "cpu", trust_remote_code), None  # refused by make_plan with its own message
    quiet_transformers()
    with err.status(f"reading the shapes and routers of {model_path}"):
        disk = DiskModel(model_path, trust_remote_code=trust_remote_code)
    return disk.model, disk.layer_weights


def apply_streaming(model_path, plan, tokenizer, profile, out_dir: Path, overwrite: bool, dtype: str, device: str, trust_remote_code: bool):
    """Apply a plan from the checkpoint's files one decoder layer at a time, saving as it goes."""
    from moetrim.apply.streaming import apply_streaming as apply_from_disk
    from moetrim.checkpoint.disk import DiskModel

    if device not in ("cpu", None):
        raise UsageError("--streaming slices the checkpoint on the CPU: drop --device")
    quiet_transformers()
    disk = DiskModel(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    result = apply_from_disk(disk, plan, out_dir, tokenizer=tokenizer, profile=profile, source=model_path, overwrite=overwrite,
                             progress=True)
    report_plan(plan, result.format, result.note)
    out.print(f"saved [bold]{out_dir}[/]")


def plan_and_stream(model_path, profile, tokenizer, out_dir, overwrite, dtype, trust_remote_code, **method):
    """Plan from the checkpoint on disk, then apply streaming (compress with --sequential, --streaming or --device-map)."""
    from moetrim.plan import make_plan

    model, layer_weights = model_for_plan(model_path, trust_remote_code)
    plan = make_plan(model, profile, layer_weights=layer_weights, **method)
    apply_streaming(model_path, plan, tokenizer, profile, out_dir, overwrite, dtype, "cpu", trust_remote_code)


def calibrate_sequential(model_path, data, dtype, trust_remote_code, **opts):
    """Calibrate one decoder layer at a time from the checkpoint's files (forward statistics only)."""
    from moetrim.calibrate.sequential import calibrate_sequential as calibrate_from_disk
    from moetrim.checkpoint import load_tokenizer

    quiet_transformers()
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    return calibrate_from_disk(model_path, data, tokenizer=tokenizer, dtype=dtype, progress=True, trust_remote_code=trust_remote_code,
                               **opts)
