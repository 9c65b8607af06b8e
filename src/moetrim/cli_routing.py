"""`moetrim tasks` (task-suite items as a fine-tuning or calibration data file) and `moetrim routing`
(how a model spreads tokens over its experts, optionally against the model it was made from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from moetrim.checkpoint.atomic import write_text
from moetrim.checkpoint.outputs import check_output
from moetrim.checkpoint.reports import write_report
from moetrim.cli_common import DeviceOpt, DtypeOpt, OverwriteOpt, SeedOpt, TrustOpt, data_files, handled, model_dir, out
from moetrim.data.tasks import DOMAINS, SPLITS, TASK_DOMAINS, TaskItem, get_items, to_sft_records
from moetrim.errors import UsageError

TASK_FILE_SUFFIXES = (".jsonl", ".txt")


def task_file_text(items: list[TaskItem], suffix: str) -> str:
    """A .jsonl of prompt/response records, or .txt with one item's text per blank-line separated
    paragraph (what `moetrim.data.text.read_documents` reads back)."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in to_sft_records(items))
    return "\n\n".join(item.text.strip() for item in items) + "\n"


@handled
def tasks_cmd(
    domain: str = typer.Argument(..., metavar="DOMAIN", help=f"{', '.join(TASK_DOMAINS)} (the reference model never saw "
                                 f"{', '.join(d for d in TASK_DOMAINS if d not in DOMAINS)})"),
    split: str = typer.Option("train", "--split", help=", ".join(SPLITS)),
    n: int = typer.Option(2000, "--n", help="items to write"),
    seed: int = SeedOpt,
    out_path: Path = typer.Option(..., "--out", help="FILE.jsonl (prompt/response records) or FILE.txt (one item per paragraph)"),
    overwrite: bool = OverwriteOpt,
):
    """Write task-suite items as a data file for `moetrim finetune`, `calibrate` or `routing`."""
    if out_path.suffix not in TASK_FILE_SUFFIXES:
        raise UsageError(f"--out {out_path} must end in .jsonl (prompt/response records) or .txt (one item per paragraph)")
    try:
        get_items(domain, split, 0)  # checks the names before anything else
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_output(out_path, kind="task file", overwrite=overwrite)
    try:
        items = get_items(domain, split, n, seed=seed)
    except ValueError as exc:
        raise UsageError(f"{exc}; ask for fewer with --n") from None
    write_text(out_path, task_file_text(items, out_path.suffix))
    out.print(f"{len(items):,} {domain}/{split} items (seed {seed}) -> [bold]{out_path}[/]")


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
    from moetrim.cli import _load
    from moetrim.evaluate.routing import routing_health

    files = data_files(data)
    if json_path is not None and png_path is not None and json_path.resolve() == png_path.resolve():
        raise UsageError(f"--json and --png both name {json_path}; give two files")
    inputs = [model_dir(model_path), model_dir(base_path) if base_path else None, *files]
    if json_path is not None:
        check_output(json_path, kind="json", inputs=inputs, overwrite=overwrite, option="--json")
    if png_path is not None:
        check_output(png_path, kind="image", inputs=inputs, overwrite=overwrite, option="--png")
    model = _load(model_path, dtype, device, trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    base = _load(base_path, dtype, device, trust_remote_code) if base_path else None
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


def register(app: typer.Typer) -> None:
    """Add `tasks` and `routing` to the `moetrim` command line."""
    app.command("tasks")(tasks_cmd)
    app.command("routing")(routing_cmd)
