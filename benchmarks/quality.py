"""What each compression method keeps, measured on the bundled reference model's task suite.

Three experiments, all on a bundled reference model (`--model reference`, the default, or `--model
longtail`, on every skill its training.json records):

1. Grid: every dimension criterion, every expert criterion and MoNE (novices) at 25% and 50% of routed-expert
   parameters removed; per-domain exact-match accuracy and the mean.
   - task-agnostic: calibrated on a mixture of all domains, evaluated on every domain;
   - task-specific: calibrated on one domain, evaluated on that domain.
2. Critical dimensions: remove only the k most important dimensions (k = 1 ... 64) ranked by
   math-calibrated Fisher, by activation, and at random; math vs knowledge accuracy against k.
3. Dense reference figures for every domain.

The grid runs once per seed (--seeds, default 0,1,2; seed 0 alone for --quick on the long-tail model): each seed draws its own calibration texts and
its own random baselines; the evaluation items are the same for every seed, so methods are compared
paired. Tables give the mean over seeds with a 95% t-interval; a finding says one method beats
another only where the paired difference over seeds has a 95% t-interval that excludes 0, and calls
the rest ties. The interval covers calibration draws, not the sampling of evaluation items (a
fixed set of 200-256 per domain: about ±3 points on one domain's accuracy, binomially). Critical
dimensions run on the first seed only.

    python benchmarks/quality.py --quick     # 64 calibration texts per domain, 200 eval items: minutes on 2 CPU cores
    python benchmarks/quality.py             # 128 calibration texts per domain, 256 eval items

Writes benchmarks/results/quality.json, benchmarks/results/critical_dims.png and a table in
benchmarks/README.md. Nothing here is tuned to favour a method: every method gets the same
calibration data, seed, allocation defaults and evaluation items.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import bundled_model, for_model, interval, paired_difference, save_figure, section, update_section, write_json  # noqa: E402

import moetrim  # noqa: E402
from moetrim.apply import apply_plan as apply_any  # noqa: E402
from moetrim.apply.slicing import apply_plan, shared_copy  # noqa: E402
from moetrim.calibrate import calibrate  # noqa: E402
from moetrim.data.tasks import DOMAINS, calibration_texts  # noqa: E402
from moetrim.errors import MoetrimError  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.model.view import find_moe_layers  # noqa: E402
from moetrim.plan import make_plan  # noqa: E402

DIM_CRITERIA = ("fisher", "taylor", "activation", "router_weighted", "output_aware", "magnitude", "camera", "random")
EXPERT_CRITERIA = ("frequency", "soft_frequency", "ean", "reap", "man", "msan", "mone", "aimer", "random")
NOVICE_CRITERIA = ("mone",)  # MoNE: removed experts become constant outputs (granularity novice)
CRITICAL_K = (1, 2, 4, 8, 12, 16, 32, 64)
ALLOCATIONS = ("global", "layer", "uniform", "layer_width")  # Fisher dims, task-agnostic
ALLOCATION_RATIOS = (0.25, 0.5, 0.75)
DEFAULT_OUT = HERE / "results" / "quality.json"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def remove_top_k(model, scores: dict[int, torch.Tensor], k: int):
    """A plan that removes exactly the k highest-scoring dimensions over the whole model."""
    plan = make_plan(model, None, granularity="dims", criterion="random", ratio=0.0, allocation="global")
    layers = find_moe_layers(model)
    flat = torch.cat([scores[l.index].flatten() for l in layers])
    top = torch.sort(flat, descending=True, stable=True).indices[:k].tolist()
    width = layers[0].widths[0]
    per_layer = layers[0].num_experts * width
    drop: dict[tuple[int, int], set[int]] = {}
    for t in top:
        li, rest = divmod(t, per_layer)
        e, j = divmod(rest, width)
        drop.setdefault((li, e), set()).add(j)
    for li, lp in enumerate(plan.layers):
        dims = []
        for e in lp.kept_experts:
            gone = drop.get((li, e), set())
            dims.append([j for j in range(width) if j not in gone])
        lp.kept_dims = dims
        lp.widths = [len(d) for d in dims]
    plan.params_after = sum(l.params_at(lp.widths) for l, lp in zip(layers, plan.layers))
    plan.criterion = "remove-top-k"
    return plan


def evaluate(model, tok, domains, n) -> dict:
    res = evaluate_tasks(model, tok, list(domains), n=n, batch_size=64)
    return {"accuracy": res["accuracy"], "perplexity": res["perplexity"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calibration texts (64 per domain) and 200 eval items per domain")
    ap.add_argument("--items", type=int, default=None, help="evaluation items per domain (default 256, quick 200)")
    ap.add_argument("--calib", type=int, default=None, help="calibration items per domain (default 128, quick 64)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds; the grid runs once per seed (default 0,1,2; "
                    "--quick on the long-tail model 0: its 9 skills make one seed take about 14 minutes)")
    ap.add_argument("--model", default="reference",
                    help="a bundled model (reference, longtail: every skill its training.json records) or a model directory")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: results/quality.json, quality-longtail.json, ...)")
    args = ap.parse_args(argv)
    from moetrim.assets import BUNDLED, bundled_name

    key = args.model if args.model in BUNDLED else bundled_name(args.model)
    if key is not None:
        key, domains, _ = bundled_model(key)
        args.model = "reference" if key == "reference" else f"reference-{key}"  # moetrim.load resolves the name
    else:
        domains = list(DOMAINS)
    default_out = for_model(DEFAULT_OUT, key or "reference")
    args.out = args.out or default_out
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick and key == "longtail" else "0,1,2")).split(",")]
    n_items = args.items or (200 if args.quick else 256)
    n_calib = args.calib or (64 if args.quick else 128)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        model = moetrim.load(args.model, dtype=torch.float32)
        tok = moetrim.load_tokenizer(args.model)
    except MoetrimError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code

    dense = evaluate(model, tok, domains, n_items)
    log(f"dense: {dense['accuracy']}")
    rows = []

    def run(setting, granularity, criterion, ratio, profile, eval_domains, seed):
        m = shared_copy(model)
        plan = make_plan(m, profile, granularity=granularity, criterion=criterion, ratio=ratio, seed=seed)
        apply_any(m, plan, profile) if granularity == "novice" else apply_plan(m, plan)
        res = evaluate(m, tok, eval_domains, n_items)
        row = {"setting": setting, "granularity": granularity, "criterion": criterion, "ratio": ratio, "seed": seed,
               "removed_fraction": round(plan.removed_fraction, 4), "allocation": plan.allocation, **res}
        del m
        return row

    alloc_rows: list[dict] = []
    methods = [("dims", c) for c in DIM_CRITERIA] + [("experts", c) for c in EXPERT_CRITERIA] + [("novice", c) for c in NOVICE_CRITERIA]
    calib_tokens = {}
    for seed in seeds:
        log(f"seed {seed}: calibrating on the mixture and on each domain")
        prof_mix = calibrate(model, calibration_texts(domains, n_per_domain=n_calib, seed=seed), tokenizer=tok,
                             seq_len=256, batch_size=8, seed=seed)
        prof_dom = {d: calibrate(model, calibration_texts([d], n_per_domain=n_calib * 2, seed=seed), tokenizer=tok,
                                 seq_len=256, batch_size=8, seed=seed) for d in domains}
        calib_tokens[seed] = {"mixture": prof_mix.tokens, **{d: p.tokens for d, p in prof_dom.items()}}
        if seed == seeds[0]:
            first_math_profile = prof_dom["math"]
        for allocation in ALLOCATIONS:
            for ratio in ALLOCATION_RATIOS:
                m = shared_copy(model)
                plan = make_plan(m, prof_mix, granularity="dims", criterion="fisher", ratio=ratio, allocation=allocation, seed=seed)
                apply_plan(m, plan)
                res = evaluate(m, tok, domains, n_items)
                alloc_rows.append({"allocation": allocation, "ratio": ratio, "seed": seed, **res,
                                   "mean_accuracy": sum(res["accuracy"].values()) / len(domains)})
                del m
        for granularity, criterion in methods:
            for ratio in (0.25, 0.5):
                row = run("task-agnostic", granularity, criterion, ratio, prof_mix, domains, seed)
                row["mean_accuracy"] = sum(row["accuracy"].values()) / len(domains)
                rows.append(row)
                spec = {"accuracy": {}, "perplexity": {}}
                for d in domains:
                    r = run("task-specific", granularity, criterion, ratio, prof_dom[d], [d], seed)
                    spec["accuracy"][d] = r["accuracy"][d]
                    spec["perplexity"][d] = r["perplexity"][d]
                rows.append({"setting": "task-specific", "granularity": granularity, "criterion": criterion, "ratio": ratio,
                             "seed": seed, "removed_fraction": row["removed_fraction"], "allocation": row["allocation"], **spec,
                             "mean_accuracy": sum(spec["accuracy"].values()) / len(domains)})
                log(f"seed {seed} {granularity:7s} {criterion:15s} {ratio:.2f}: agnostic {row['mean_accuracy']:.3f}  "
                    f"specific {rows[-1]['mean_accuracy']:.3f}  ({time.perf_counter() - t0:.0f}s)")

    log("critical dimensions (math-calibrated)")
    layers = find_moe_layers(model)
    pm = first_math_profile
    gen = torch.Generator().manual_seed(seeds[0])
    rankings = {
        "fisher": {l.index: pm.get(l.index, "fisher") for l in layers},
        "activation": {l.index: pm.get(l.index, "act_abs_sum") for l in layers},
        "random": {l.index: torch.rand(pm.get(l.index, "fisher").shape, generator=gen, dtype=torch.float64) for l in layers},
    }
    critical = []
    for method, scores in rankings.items():
        for k in CRITICAL_K:
            m = shared_copy(model)
            apply_plan(m, remove_top_k(m, scores, k))
            res = evaluate(m, tok, ["math", "knowledge"], n_items)
            critical.append({"ranking": method, "k": k, **res})
            log(f"  {method:10s} k={k:3d}: math {res['accuracy']['math']:.3f} knowledge {res['accuracy']['knowledge']:.3f}")
            del m

    result = {
        "meta": {"model": key or args.model, "quick": args.quick, "items_per_domain": n_items, "calib_items_per_domain": n_calib, "seeds": seeds,
                 "calibration_tokens": calib_tokens, "seconds": round(time.perf_counter() - t0, 1),
                 "torch_threads": torch.get_num_threads()},
        "dense": dense,
        "grid": rows,
        "summary": summarise(rows, domains),
        "critical_dims": critical,
        "allocations": alloc_rows,
    }
    write_json(args.out, result)
    png = plot_critical(critical, dense, for_model(args.out.parent / "critical_dims.png", key or "reference"))
    table = markdown(result, png)
    print(table)
    wrote = [str(args.out), str(png)]
    if key is not None and args.out.resolve() == default_out.resolve():  # experiments written elsewhere leave the README alone
        update_section(section("quality", key), table)
        wrote.append("benchmarks/README.md")
    log(f"wrote {', '.join(wrote)} in {time.perf_counter() - t0:.0f}s")
    return 0


def key_of(r: dict) -> tuple:
    return (r["setting"], r["granularity"], r["criterion"], r["ratio"])


def summarise(rows: list[dict], domains: list[str]) -> list[dict]:
    """Per method: the mean over seeds and the 95% interval of every accuracy, with the per-seed values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key_of(r), []).append(r)
    out = []
    for (setting, gran, crit, ratio), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        mean, ci = interval([r["mean_accuracy"] for r in rs])
        out.append({"setting": setting, "granularity": gran, "criterion": crit, "ratio": ratio,
                    "seeds": [r["seed"] for r in rs], "mean_accuracy": mean, "mean_accuracy_ci95": ci,
                    "mean_accuracy_per_seed": [r["mean_accuracy"] for r in rs],
                    "accuracy": {d: interval([r["accuracy"][d] for r in rs])[0] for d in domains},
                    "accuracy_ci95": {d: interval([r["accuracy"][d] for r in rs])[1] for d in domains}})
    return out


def compare(a: dict, b: dict) -> str:
    """'a > b', 'a < b' or 'tie': the paired difference of mean accuracy over seeds, by its 95% t-interval
    (identical differences in every seed count as a difference, equal values as a tie)."""
    return paired_difference(a["mean_accuracy_per_seed"], b["mean_accuracy_per_seed"])


def plot_critical(critical: list[dict], dense: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, domain in zip(axes, ("math", "knowledge")):
        for method, style in (("fisher", "o-"), ("activation", "s--"), ("random", "^:")):
            pts = [(r["k"], r["accuracy"][domain]) for r in critical if r["ranking"] == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"top-k by {method}")
        ax.axhline(dense["accuracy"][domain], color="gray", lw=0.8, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dimensions removed (k)")
        ax.set_title(f"{domain} accuracy")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("exact-match accuracy")
    axes[1].legend(loc="lower left")
    fig.suptitle("Removing only the k most important dimensions (math-calibrated ranking)")
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    dense = result["dense"]["accuracy"]
    doms = list(dense)
    meta = result["meta"]
    seeds = meta["seeds"]
    model = meta.get("model", "reference")
    lines = [f"### Quality on the {'reference' if model == 'reference' else model} model ({'quick' if meta['quick'] else 'full'}: {meta['items_per_domain']} eval items per domain, "
             f"seeds {', '.join(map(str, seeds))})",
             "", "`python benchmarks/quality.py" + (" --quick" if meta["quick"] else "") + ("" if model == "reference" else f" --model {model}") + f"` ({meta['seconds']:.0f} s); exact-match accuracy, "
             f"mean over {len(seeds)} seeds (calibration draws and random baselines); mean column: ± half-width of the 95% "
             "t-interval over seeds. Evaluation items are the same for every seed (paired).", ""]
    for setting in ("task-agnostic", "task-specific"):
        lines += [f"**{setting}** ({'calibrated on the mixture of all domains' if setting == 'task-agnostic' else 'calibrated on the evaluated domain'})", "",
                  "| granularity | criterion | removed | " + " | ".join(doms) + " | mean |",
                  "|---|---|---|" + "---|" * (len(doms) + 1)]
        lines.append("| dense | - | 0% | " + " | ".join(f"{dense[d]:.3f}" for d in doms) + f" | {sum(dense.values()) / len(doms):.3f} |")
        for r in result["summary"]:
            if r["setting"] != setting:
                continue
            lines.append(f"| {r['granularity']} | {r['criterion']} | {r['ratio']:.0%} | "
                         + " | ".join(f"{r['accuracy'][d]:.3f}" for d in doms)
                         + f" | {r['mean_accuracy']:.3f} ± {r['mean_accuracy_ci95']:.3f} |")
        lines.append("")
    lines += allocation_table(result)
    lines += ["**critical dimensions** (remove only the k most important dims, math-calibrated ranking): math / knowledge accuracy", "",
              "| ranking | " + " | ".join(f"k={k}" for k in CRITICAL_K) + " |", "|---|" + "---|" * len(CRITICAL_K)]
    for method in ("fisher", "activation", "random"):
        cells = []
        for k in CRITICAL_K:
            r = next(x for x in result["critical_dims"] if x["ranking"] == method and x["k"] == k)
            cells.append(f"{r['accuracy']['math']:.2f} / {r['accuracy']['knowledge']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"![critical dimensions](results/{png.name})", "", "**What this run shows** (computed from the JSON above):", ""]
    lines += [f"- {f}" for f in findings(result)]
    lines.append("")
    return "\n".join(lines)


def allocation_table(result: dict) -> list[str]:
    """Fisher dims under each allocation (task-agnostic), mean over seeds with the 95% interval, and
    layer_width (one width per layer, the serving-friendly one) against global and uniform, paired."""
    rows = result.get("allocations") or []
    if not rows:
        return []
    def per_seed(alloc, ratio):
        return [r["mean_accuracy"] for r in sorted(rows, key=lambda r: r["seed"]) if r["allocation"] == alloc and r["ratio"] == ratio]
    lines = ["**allocations** (Fisher dims, task-agnostic; mean accuracy over seeds ± 95% interval; `layer_width`: one "
             "expert width per layer, set by the global ranking)", "",
             "| allocation | " + " | ".join(f"{r:.0%}" for r in ALLOCATION_RATIOS) + " |", "|---|" + "---|" * len(ALLOCATION_RATIOS)]
    for alloc in ALLOCATIONS:
        cells = []
        for ratio in ALLOCATION_RATIOS:
            mean, half = interval(per_seed(alloc, ratio))
            cells.append(f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {alloc} | " + " | ".join(cells) + " |")
    verdicts = []
    for ratio in ALLOCATION_RATIOS:
        lw = per_seed("layer_width", ratio)
        parts = [f"{({'a > b': 'above', 'a < b': 'below', 'tie': 'tied with'})[paired_difference(lw, per_seed(other, ratio))]} {other}"
                 for other in ("global", "uniform")]
        verdicts.append(f"{ratio:.0%}: layer_width is " + ", ".join(parts))
    lines += ["", "Paired over seeds: " + "; ".join(verdicts) + ".", ""]
    return lines


def findings(result: dict) -> list[str]:
    """Plain statements read off the measured numbers, including where the papers' claims do not hold."""
    dense = result["dense"]["accuracy"]
    dense_mean = sum(dense.values()) / len(dense)
    summary = result["summary"]

    def select(setting, gran, ratio):
        return [r for r in summary if (r["setting"], r["granularity"], r["ratio"]) == (setting, gran, ratio)]

    def best(rows: list[dict]) -> str:
        """The top method and every method tied with it (paired over seeds)."""
        top = min(rows, key=lambda r: (-r["mean_accuracy"], r["criterion"]))
        tied = [r for r in rows if r is not top and compare(r, top) == "tie"]
        names = f"{top['criterion']} ({top['mean_accuracy']:.3f})"
        if tied:
            names += ", tied with " + ", ".join(f"{r['criterion']} ({r['mean_accuracy']:.3f})" for r in sorted(tied, key=lambda r: -r["mean_accuracy"]))
        return names

    out = []
    for ratio in (0.25, 0.5):
        dims, experts = select("task-agnostic", "dims", ratio), select("task-agnostic", "experts", ratio)
        fisher = next(r for r in dims if r["criterion"] == "fisher")
        top_e = min(experts, key=lambda r: (-r["mean_accuracy"], r["criterion"]))
        verdict = {"a > b": "beats", "a < b": "does NOT beat", "tie": "ties with"}[compare(fisher, top_e)]
        out.append(
            f"{ratio:.0%} removed, task-agnostic: Fisher dimension pruning keeps {fisher['mean_accuracy'] / dense_mean if dense_mean else float('nan'):.2f} of dense mean "
            f"accuracy ({fisher['mean_accuracy']:.3f} ± {fisher['mean_accuracy_ci95']:.3f} vs {dense_mean:.3f}). Best dimension criterion: "
            f"{best(dims)}. Best expert criterion: {best(experts)}. Fisher dimension pruning {verdict} the best expert criterion "
            f"({top_e['criterion']}), paired over seeds."
        )
    for setting, favoured in (("task-agnostic", ("man", "msan")), ("task-specific", ("frequency", "soft_frequency", "reap"))):
        for ratio in (0.25, 0.5):
            ranked = sorted(select(setting, "experts", ratio), key=lambda r: (-r["mean_accuracy"], r["criterion"]))
            order = ", ".join(f"{r['criterion']} {r['mean_accuracy']:.3f}" for r in ranked)
            places = [i + 1 for i, r in enumerate(ranked) if r["criterion"] in favoured]
            out.append(f"expert criteria, {setting}, {ratio:.0%} (mean over seeds): {order}. The principle's picks ({', '.join(favoured)}) "
                       f"place {', '.join(map(str, places))} of {len(ranked)}; best: {best(ranked)}.")
    crit = result["critical_dims"]
    for method in ("fisher", "activation", "random"):
        pts = sorted((r for r in crit if r["ranking"] == method), key=lambda r: r["k"])
        half = next((r for r in pts if r["accuracy"]["math"] <= 0.5 * dense["math"]), None)
        last = pts[-1]
        if half is None:
            out.append(f"critical dimensions by {method}: math accuracy never falls to half of dense up to k={last['k']} "
                       f"(math {last['accuracy']['math']:.2f}, knowledge {last['accuracy']['knowledge']:.2f} at k={last['k']}).")
        else:
            out.append(f"critical dimensions by {method}: removing k={half['k']} dims halves math accuracy "
                       f"(math {half['accuracy']['math']:.2f}, knowledge {half['accuracy']['knowledge']:.2f}; dense "
                       f"{dense['math']:.2f} / {dense['knowledge']:.2f}).")
    return out


if __name__ == "__main__":
    sys.exit(main())
