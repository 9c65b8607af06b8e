"""`moetrim eval` (task accuracy and perplexity, or lm-eval tasks), `moetrim routing` (how a model
spreads tokens over its experts, optionally against the model it was made from) and `moetrim demo`
(the whole pipeline on the bundled model, dense against compressed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.checkpoint.outputs import bytes_of_weights, check_output, refuse_inputs
from moetrim.checkpoint.reports import write_report
from moetrim.cli.common import (
    DeviceMapOpt, DeviceOpt, DtypeOpt, MaxMemoryOpt, OffloadFolderOpt, OverwriteOpt, RatioOpt, SeedOpt, TrustOpt, data_files, err, handled,
    load, model_dir, out, placement, quiet_transformers, resolve_method,
)
from moetrim.errors import UsageError


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
    from moetrim.checkpoint import load_tokenizer
    from moetrim.pipeline.evaluate import evaluate, task_domains

    if lm_eval_tasks is None and include_paths:
        raise UsageError("--include-path applies to --lm-eval")
    if lm_eval_tasks is not None and tasks is not None:
        raise UsageError("--tasks and --lm-eval exclusive: the built-in suite is the lm-eval task 'moetrim' (or moetrim_math, ...)")
    domains = task_domains(model_dir(model_path), tasks)
    if json_path is not None:
        check_output(json_path, kind="json", inputs=[model_dir(model_path), *include_paths], overwrite=overwrite, option="--json")
    place = placement(device_map, max_memory, offload_folder, device, [model_dir(model_path)], {"--json": json_path})
    if place and lm_eval_tasks is not None:
        raise UsageError("--device-map goes with the built-in tasks for now, not with --lm-eval")
    if lm_eval_tasks is not None:
        return _eval_lm_eval(model_path, lm_eval_tasks, include_paths, n, batch_size, json_path, device, dtype, trust_remote_code)
    model = load(model_path, dtype, device, trust_remote_code, **place)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    res = evaluate(model, tokenizer, domains, n=n, batch_size=batch_size)
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
    from moetrim.pipeline.evaluate import evaluate

    names = bridge.parse_task_names(spec)
    paths = bridge.check_include_paths(include_paths)
    loaded = bridge.load_tasks(names, paths)
    model = load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    res = evaluate(model, tokenizer, lm_eval=loaded, n=n, batch_size=batch_size)
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
    quiet_transformers()
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


def _routing_table(report: dict, title: str) -> Table:
    with_base = "kl_to_base" in report["summary"]
    condensers = any(l["condensers"] for l in report["layers"])
    t = Table(title=title)
    columns = ["layer", "experts", "top-k", "entropy", "gini", "dead", "top-10% share", "busiest"]
    columns += ["KL to base", "top-k overlap"] if with_base else []
    columns += ["condensers"] if condensers else []
    for c in columns:
        t.add_column(c, justify="left" if c == "condensers" else "right")

    def tail(r: dict) -> list[str]:
        cells = [f"{r['kl_to_base']:.4f}", f"{r['topk_overlap']:.3f}"] if with_base else []
        return cells + ([",".join(map(str, r.get("condensers", []))) or "-"] if condensers else [])

    for l in report["layers"]:
        t.add_row(str(l["layer"]), str(l["experts"]), str(l["top_k"]), f"{l['entropy']:.3f}", f"{l['gini']:.3f}",
                  str(l["dead"]), f"{l['top10_share']:.3f}", f"{max(l['token_share']):.3f}", *tail(l))
    s = report["summary"]
    t.add_row("[bold]mean", "", "", f"{s['entropy']:.3f}", f"{s['gini']:.3f}", f"{s['dead']} in all", f"{s['top10_share']:.3f}", "",
              *tail(s))
    return t


@handled
def routing_cmd(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model directory (or 'reference')"),
    data: str = typer.Option(..., "--data", help=".txt or .jsonl text to route (comma-separated for several)"),
    base_path: Optional[str] = typer.Option(None, "--base", help="compare with this model (same MoE layers and experts), e.g. the one it was fine-tuned from"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the full report here (JSON; --overwrite replaces only a report moetrim wrote)"),
    png_path: Optional[Path] = typer.Option(None, "--png", help="write a heatmap of token shares, layers x experts (PNG; --overwrite replaces only one moetrim drew)"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per sequence (at most the model's context)"),
    max_tokens: int = typer.Option(20_000, "--max-tokens", help="route at most this many tokens of the data"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    trust_remote_code: bool = TrustOpt,
):
    """Routing health per MoE layer: expert token shares, entropy, Gini, dead experts (and router KL, top-k overlap vs --base)."""
    from moetrim.checkpoint import load_tokenizer
    from moetrim.evaluate.routing import routing_health

    files = data_files(data)
    if json_path is not None and png_path is not None and json_path.resolve() == png_path.resolve():
        raise UsageError(f"--json and --png both name {json_path}; give two files")
    inputs = [model_dir(model_path), model_dir(base_path) if base_path else None, *files]
    if json_path is not None:
        check_output(json_path, kind="json", inputs=inputs, overwrite=overwrite, option="--json")
    if png_path is not None:
        check_output(png_path, kind="image", inputs=inputs, overwrite=overwrite, option="--png")
    model = load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    base = load(base_path, dtype, device, trust_remote_code) if base_path else None
    report = routing_health(model, tokenizer, data, base=base, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    report = {"model": model_path, "base": base_path, "data": data, **report}
    out.print(_routing_table(report, f"{model_path}: routing of {report['tokens']:,} tokens"
                                     + (f" against {base_path}" if base_path else "")))
    if json_path is not None:
        write_report(json_path, "routing", report)
        out.print(f"report -> [bold]{json_path}[/]")
    if png_path is not None:
        from moetrim.evaluate.routing_plot import plot_routing

        plot_routing(report, png_path, title=Path(model_path).name)
        out.print(f"heatmap -> [bold]{png_path}[/]")
