"""What widths in buckets cost in accuracy: global Fisher trimming with exact per-expert widths against
widths rounded to multiples of `--round-to` (the plan option that makes few grouped GEMM calls cover a
layer, so variable-width experts run near their bound; see `speed.py --round-to`).

On a bundled reference model, per seed (each seed draws its own calibration texts; the eval items are
the same for every seed, so the comparison is paired): calibrate once on the mixture of every skill,
then plan Fisher dims with the global allocation at each `--ratios` with exact widths and with widths
in multiples of width/16, width/8 and width/4 (at real layer shapes, width 768-1408, width/8 to width/16
is the 64-128 that speed.py measures), and evaluate every skill.

    python benchmarks/width_buckets.py                    # the first model, seeds 0,1,2 (a few minutes on 2 cores)
    python benchmarks/width_buckets.py --model longtail

Writes benchmarks/results/width_buckets.json (width_buckets-longtail.json), the PNG beside it and a table
in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import interval, paired_difference, publish, save_figure, sweep_setup, versions  # noqa: E402

import moetrim  # noqa: E402
from moetrim.apply.slicing import apply_plan, shared_copy  # noqa: E402
from moetrim.calibrate import calibrate  # noqa: E402
from moetrim.data.tasks import calibration_texts  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.model.view import find_moe_layers  # noqa: E402
from moetrim.plan import make_plan  # noqa: E402

DIVISORS = (16, 8, 4)  # round_to = expert width / divisor
DEFAULT_OUT = HERE / "results" / "width_buckets.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, seeds, ratios, key, domains, out = sweep_setup(ap, argv, DEFAULT_OUT)
    t0 = time.perf_counter()
    model, tok = moetrim.reference_model(key)
    width = max(find_moe_layers(model)[0].widths)
    settings = [None, *(width // d for d in DIVISORS if width // d >= 1)]
    rows = []
    for seed in seeds:
        profile = calibrate(model, calibration_texts(domains, n_per_domain=args.calib, seed=seed), tokenizer=tok,
                            seq_len=256, batch_size=8, seed=seed)
        for ratio in ratios:
            for round_to in settings:
                m = shared_copy(model)
                plan = make_plan(m, profile, granularity="dims", criterion="fisher", ratio=ratio, allocation="global",
                                 round_to=round_to, seed=seed)
                apply_plan(m, plan)
                acc = evaluate_tasks(m, tok, domains, n=args.items)["accuracy"]
                distinct = sorted({w for lp in plan.layers for w in lp.widths})
                rows.append({"seed": seed, "ratio": ratio, "round_to": round_to, "removed_fraction": round(plan.removed_fraction, 4),
                             "distinct_widths": len(distinct), "accuracy": acc, "mean": sum(acc.values()) / len(acc)})
                log(f"seed {seed} {ratio:.0%} round_to {round_to or 'exact':>5}: removed {plan.removed_fraction:.3f}  "
                    f"{len(distinct)} widths  mean {rows[-1]['mean']:.3f}  ({time.perf_counter() - t0:.0f}s)")
                del m
    summary = []
    for ratio in ratios:
        exact = [r["mean"] for r in sorted((r for r in rows if r["ratio"] == ratio and r["round_to"] is None), key=lambda r: r["seed"])]
        for round_to in settings:
            sel = sorted((r for r in rows if r["ratio"] == ratio and r["round_to"] == round_to), key=lambda r: r["seed"])
            means = [r["mean"] for r in sel]
            mean, ci = interval(means)
            summary.append({"ratio": ratio, "round_to": round_to, "mean": mean, "ci95": ci, "per_seed": means,
                            "removed_fraction": sum(r["removed_fraction"] for r in sel) / len(sel),
                            "distinct_widths": max(r["distinct_widths"] for r in sel),
                            "vs_exact": None if round_to is None else {"a > b": "higher", "a < b": "lower", "tie": "tie"}[paired_difference(means, exact)]})
    result = {"meta": {"model": key, "expert_width": width, "seeds": seeds, "ratios": ratios, "items_per_domain": args.items,
                       "calib_items": args.calib, "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
                       "versions": versions()},
              "rows": rows, "summary": summary}
    publish(result, out, DEFAULT_OUT, "width-buckets", key, plot, markdown)
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for ratio in result["meta"]["ratios"]:
        rows = [s for s in result["summary"] if s["ratio"] == ratio]
        labels = ["exact" if s["round_to"] is None else str(s["round_to"]) for s in rows]
        ax.errorbar(range(len(rows)), [s["mean"] for s in rows], yerr=[s["ci95"] for s in rows], fmt="o-", capsize=3,
                    label=f"{ratio:.0%} removed")
        ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel(f"widths in multiples of (expert width {result['meta']['expert_width']})")
    ax.set_ylabel("mean accuracy over skills")
    ax.set_title(f"global Fisher trimming, exact vs bucketed widths ({result['meta']['model']})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    meta = result["meta"]
    lines = [f"### Widths in buckets: what they cost in accuracy ({meta['model']}, expert width {meta['expert_width']}, "
             f"seeds {', '.join(map(str, meta['seeds']))})", "",
             f"`python benchmarks/width_buckets.py{'' if meta['model'] == 'reference' else ' --model ' + meta['model']}` "
             f"({meta['seconds']:.0f} s): Fisher, global allocation, task-agnostic calibration; mean accuracy over every skill "
             f"({meta['items_per_domain']} eval items each), mean over seeds ± 95% t-interval; 'vs exact': the paired difference "
             "over seeds (a tie when its 95% interval holds 0).", "",
             "| removed | widths in multiples of | distinct widths | removed fraction | mean accuracy | vs exact |", "|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['ratio']:.0%} | {'exact' if s['round_to'] is None else s['round_to']} | {s['distinct_widths']} | "
                     f"{s['removed_fraction']:.3f} | {s['mean']:.3f} ± {s['ci95']:.3f} | {s['vs_exact'] or '-'} |")
    lines += ["", f"![width buckets](results/{png.name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
