"""`moetrim eval` (task accuracy and perplexity) and `moetrim demo` (the whole pipeline on the bundled model)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.cli_common import (
    DeviceMapOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt, OffloadFolderOpt, OverwriteOpt, RatioOpt, SeedOpt, TrustOpt, err, handled, model_dir,
    out, placement, resolve_method,
)
from moetrim.checkpoint.outputs import bytes_of_weights, check_output, refuse_inputs
from moetrim.checkpoint.reports import write_report
from moetrim.errors import UsageError


def _load(*args, **place):
    from moetrim.cli import _load as load

    return load(*args, **place)


def _quiet_transformers() -> None:
    from moetrim.cli import _quiet_transformers as quiet

    quiet()


@handled
def eval_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or a bundled model: 'reference', 'reference-longtail')"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated domains, or 'all' (the default: every skill the "
                                                                "model's training.json records, else math, knowledge, code, strings)"),
    n: Optional[int] = typer.Option(None, "--n", help="evaluation items per domain (default: the full eval split)"),
    batch_size: int = typer.Option(64, "--batch-size", help="items generated at once"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the results here (JSON; --overwrite replaces only a report moetrim wrote)"),
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    offload_folder: Optional[Path] = OffloadFolderOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
    lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval", metavar="TASKS",
                                                help="run these lm-eval tasks instead (comma-separated; 'moetrim' is the built-in suite)"),
    include_paths: list[Path] = typer.Option([], "--include-path", metavar="DIR", help="with --lm-eval: a folder of your own lm-eval task files (repeatable)"),
):
    """Accuracy (greedy exact match) and perplexity per task domain, or lm-eval tasks (--lm-eval)."""
    from moetrim.assets import trained_domains
    from moetrim.checkpoint import load_tokenizer
    from moetrim.data.tasks import parse_domains
    from moetrim.evaluate.tasks_eval import evaluate_tasks

    if lm_eval_tasks is None and include_paths:
        raise UsageError("--include-path applies to --lm-eval")
    if lm_eval_tasks is not None and tasks is not None:
        raise UsageError("--tasks and --lm-eval exclusive: the built-in suite is the lm-eval task 'moetrim' (or moetrim_math, ...)")
    try:
        domains = parse_domains(tasks or "all", trained_domains(model_dir(model_path)))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if json_path is not None:
        check_output(json_path, kind="json", inputs=[model_dir(model_path), *include_paths], overwrite=overwrite, option="--json")
    place = placement(device_map, max_memory, offload_folder, device, [model_dir(model_path)], {"--json": json_path})
    if place and lm_eval_tasks is not None:
        raise UsageError("--device-map goes with the built-in tasks for now, not with --lm-eval")
    if lm_eval_tasks is not None:
        return _eval_lm_eval(model_path, lm_eval_tasks, include_paths, n, batch_size, json_path, device, dtype, trust_remote_code)
    model = _load(model_path, dtype, device, trust_remote_code, **place)
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
        write_report(json_path, "eval", res)


def _eval_lm_eval(model_path: str, spec: str, include_paths: list[Path], n: Optional[int], batch_size: int,
                  json_path: Optional[Path], device: str, dtype: str, trust_remote_code: bool) -> None:
    """`moetrim eval --lm-eval`: names checked before the model loads, then lm-eval on moetrim's loaded model."""
    from moetrim.checkpoint import load_tokenizer
    from moetrim.integrations import lm_eval as bridge

    names = bridge.parse_task_names(spec)
    paths = bridge.check_include_paths(include_paths)
    loaded = bridge.load_tasks(names, paths)
    model = _load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    res = bridge.evaluate_lm_eval(model, tokenizer, loaded, limit=n, batch_size=batch_size)
    t = Table(title=f"{model_path} (lm-eval {res['lm_eval']['version']})")
    for c in ("task", "metric", "value", "items"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for task, metrics in res["lm_eval"]["results"].items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                t.add_row(task, metric, f"{value:.4f}", str(res["lm_eval"]["n"].get(task, "")))
    out.print(t)
    if json_path is not None:
        write_report(json_path, "eval", res)


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
    from moetrim.pipeline.demo import fresh_out_dir, run_demo

    resolve_method("dims", criterion, ratio, "global")
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


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("demo")(demo)
