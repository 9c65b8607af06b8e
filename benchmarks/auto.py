"""Does `--method auto` beat the best single method? Auto against every training-free method, at 50% and 75%.

On a bundled reference model, per seed (each seed draws its own calibration texts; the eval items are the
same for every seed, so methods are compared paired): calibrate once on the mixture of every skill (the
calib split), then compress at each `--ratios` with

- auto: per layer, trim dims (Fisher or CAMERA-P), remove experts (REAP), make novices (MoNE), merge
  (HC-SMoE) or replace (rank 16, as built), and how much, by the final-logit KL on the calibration texts
  (moetrim.plan.auto), guarded against each candidate alone;
- every single training-free method, each with its own defaults: Fisher dims (global), CAMERA-P dims,
  REAP experts, AIMER experts (no data), MoNE novices, HC-SMoE merging, REAM merging;

and evaluate every skill on the eval split (never seen by any choice). The best single method is picked
per ratio by its mean over seeds, and auto is compared with it paired over seeds.

    python benchmarks/auto.py                    # the first model, seeds 0,1,2
    python benchmarks/auto.py --model longtail --seeds 0

Writes benchmarks/results/auto.json (auto-longtail.json), the PNG beside it and a table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import interval, paired_difference, publish, save_figure, sweep_setup, versions  # noqa: E402

import moetrim  # noqa: E402
from moetrim.apply import apply_plan  # noqa: E402
from moetrim.apply.slicing import shared_copy  # noqa: E402
from moetrim.calibrate import calibrate  # noqa: E402
from moetrim.calibrate.run import select_chunks  # noqa: E402
from moetrim.data.tasks import calibration_texts  # noqa: E402
from moetrim.data.text import batches  # noqa: E402
from moetrim.errors import UsageError  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.plan import make_plan  # noqa: E402
from moetrim.plan.auto import make_auto_plan  # noqa: E402

SINGLE = (("dims", "fisher"), ("dims", "camera"), ("experts", "reap"), ("experts", "aimer"), ("novice", "mone"), ("merge", None),
          ("ream", None))
DEFAULT_OUT = HERE / "results" / "auto.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def name_of(granularity: str, criterion: str | None) -> str:
    return granularity if criterion is None else f"{granularity}:{criterion}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, seeds, ratios, key, domains, out = sweep_setup(ap, argv, DEFAULT_OUT)
    t0 = time.perf_counter()
    model, tok = moetrim.reference_model(key)
    dense = evaluate_tasks(model, tok, domains, n=args.items)["accuracy"]
    rows = []
    for seed in seeds:
        texts = calibration_texts(domains, n_per_domain=args.calib, seed=seed)
        profile = calibrate(model, texts, tokenizer=tok, seq_len=256, batch_size=8, seed=seed, dense_outputs=True)
        calib_batches = batches(select_chunks(texts, tok, seq_len=256, max_tokens=None, seed=seed), 8)
        for ratio in ratios:
            t1 = time.perf_counter()
            plans = {"auto": make_auto_plan(model, profile, calib_batches, ratio=ratio, seed=seed)}
            auto_seconds = time.perf_counter() - t1
            for granularity, criterion in SINGLE:
                try:
                    plans[name_of(granularity, criterion)] = make_plan(model, profile, granularity=granularity, criterion=criterion,
                                                                       ratio=ratio, seed=seed)
                except UsageError as exc:
                    log(f"seed {seed} {ratio:.0%} {name_of(granularity, criterion)}: skipped ({exc})")
            for name, plan in plans.items():
                m = copy.deepcopy(model) if getattr(plan, "granularity", "") in ("novice", "ream", "merge") else shared_copy(model)
                apply_plan(m, plan, profile)
                acc = evaluate_tasks(m, tok, domains, n=args.items)["accuracy"]
                row = {"seed": seed, "ratio": ratio, "method": name, "removed_fraction": round(plan.removed_fraction, 4),
                       "accuracy": acc, "mean": sum(acc.values()) / len(acc)}
                if name == "auto":
                    row["chosen"] = next(n for n in plan.notes if n.startswith("auto:"))
                    row["layer_choices"] = [n.split(" (final-logit")[0] for n in plan.notes if n.startswith("layer ")]
                    row["plan_seconds"] = round(auto_seconds, 1)
                rows.append(row)
                log(f"seed {seed} {ratio:.0%} {name:14s}: removed {plan.removed_fraction:.3f}  mean {row['mean']:.3f}  "
                    f"({time.perf_counter() - t0:.0f}s)")
                del m
    summary = summarise(rows, ratios)
    result = {"meta": {"model": key, "seeds": seeds, "ratios": ratios, "items_per_domain": args.items, "calib_items": args.calib,
                       "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(), "versions": versions()},
              "dense": {"accuracy": dense, "mean": sum(dense.values()) / len(dense)}, "rows": rows, "summary": summary}
    publish(result, out, DEFAULT_OUT, "auto", key, plot, markdown)
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def summarise(rows: list[dict], ratios: list[float]) -> list[dict]:
    """Per ratio and method: mean over seeds ± 95% t-interval; auto against the best single method, paired."""
    out = []
    for ratio in ratios:
        methods = sorted({r["method"] for r in rows if r["ratio"] == ratio}, key=lambda m: (m != "auto", m))
        per = {m: [r["mean"] for r in sorted((r for r in rows if r["ratio"] == ratio and r["method"] == m), key=lambda r: r["seed"])]
               for m in methods}
        singles = [m for m in methods if m != "auto"]
        best = max(singles, key=lambda m: (sum(per[m]) / len(per[m]), m)) if singles else None
        for m in methods:
            mean, ci = interval(per[m])
            entry = {"ratio": ratio, "method": m, "mean": mean, "ci95": ci, "per_seed": per[m], "best_single": m == best}
            if m == "auto" and best is not None:
                diff, half = interval([a - b for a, b in zip(per["auto"], per[best])])
                if len(per["auto"]) > 1:
                    side = paired_difference(per["auto"], per[best])
                else:  # one seed has no interval: a gap under a point is no evidence (fidelity.py's tolerance)
                    side = "a > b" if diff > 0.01 else "a < b" if diff < -0.01 else "tie"
                entry["vs_best_single"] = {"method": best, "difference": diff, "ci95": half, "seeds": len(per["auto"]),
                                           "verdict": {"a > b": "higher", "a < b": "lower", "tie": "tie"}[side]}
            out.append(entry)
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = result["meta"]["ratios"]
    methods = [s["method"] for s in result["summary"] if s["ratio"] == ratios[0]]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(ratios)
    for i, ratio in enumerate(ratios):
        rows = {s["method"]: s for s in result["summary"] if s["ratio"] == ratio}
        ax.bar([j + i * width for j in range(len(methods))], [rows[m]["mean"] if m in rows else 0 for m in methods], width,
               yerr=[rows[m]["ci95"] if m in rows else 0 for m in methods], capsize=2, label=f"{ratio:.0%} removed")
    ax.axhline(result["dense"]["mean"], color="gray", lw=0.8, label="dense")
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean accuracy over skills")
    ax.set_title(f"--method auto against each training-free method ({result['meta']['model']})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    meta = result["meta"]
    lines = [f"### `--method auto` against every training-free method ({meta['model']}, seeds {', '.join(map(str, meta['seeds']))})", "",
             f"`python benchmarks/auto.py{'' if meta['model'] == 'reference' else ' --model ' + meta['model']}"
             f"{'' if meta['seeds'] == [0, 1, 2] else ' --seeds ' + ','.join(map(str, meta['seeds']))}` ({meta['seconds']:.0f} s): "
             f"calibrated on the calib split ({meta['calib_items']} items per skill), every choice made there; mean accuracy over "
             f"every skill on the eval split ({meta['items_per_domain']} items each), mean over seeds ± 95% t-interval. Dense: "
             f"{result['dense']['mean']:.3f}.", "",
             "| removed | method | mean accuracy | vs the best single method (paired) |", "|---|---|---|---|"]
    for s in result["summary"]:
        vs = s.get("vs_best_single")
        cell = (f"{vs['verdict']}{' with' if vs['verdict'] == 'tie' else ' than'} {vs['method']}: {vs['difference']:+.3f}"
                + (f" ± {vs['ci95']:.3f}" if vs["seeds"] > 1 else " (one seed: within 0.01 is a tie)" if vs["verdict"] == "tie"
                   else " (one seed)") if vs
                else "best single method" if s["best_single"] else "")
        lines.append(f"| {s['ratio']:.0%} | {s['method']} | {s['mean']:.3f} ± {s['ci95']:.3f} | {cell} |")
    picks = sorted({r["chosen"].split("chosen: ")[-1] for r in result["rows"] if r["method"] == "auto"})
    lines += ["", f"What auto chose (by calib KL): {'; '.join(picks)}."]
    kinds = {}  # per ratio: how often each method won a layer in the per-layer allocation, over seeds
    for r in result["rows"]:
        if r["method"] == "auto":
            for c in r.get("layer_choices", []):
                method = c.split(": ", 1)[1].split(" at ")[0].split(" (")[0]
                kinds.setdefault(r["ratio"], {}).setdefault(method, 0)
                kinds[r["ratio"]][method] += 1
    for ratio, counts in sorted(kinds.items()):
        lines.append(f"Per-layer allocation at {ratio:.0%}, layers won over all seeds: "
                     + ", ".join(f"{m} {n}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ".")
    lines += ["", f"![auto](results/{png.name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
