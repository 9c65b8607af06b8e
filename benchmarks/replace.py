"""Expert replacing against merging, D²-MoE and pruning at equal stored parameters, with and without recovery.

On a bundled reference model (``--model reference``, the default, or ``longtail``: every skill its
training.json records), at 30% and 50% of routed-expert parameters removed (bases and
low-rank factors counted against the budget):

- replace: REAP-selected experts, clustered by mean output into groups with a usage-weighted base
  each and SVD corrections; the rank (`--ranks` 4, 8, 16, 32), the largest group (`--groups` 4, 8, 16)
  and whitening (`--whiten` on, off) are the configuration the budget reaches with the lowest
  calib-split answer loss (chosen per ratio, never on eval; naive: the rank);
- naive: the same selection, one base per layer, corrections starting at zero, no annealing;
- merge: HC-SMoE (every expert's mean output over the same tokens, average-linkage Euclidean
  clustering, members' routing weights summed); the merge's weighting (the paper's usage counts,
  uniform or Fisher) is chosen by calib-split loss, as replace's configuration;
- ream: REAM (the most salient experts absorb their nearest others after neuron matching; the rest
  leave the router: a standard checkpoint);
- d2: D²-MoE (one base per layer, deltas on gate, up and down at the largest rank the budget
  allows; no base pruning); whitening (`--whiten`) and the base's weighting (the paper's Fisher, or
  usage) are chosen by calib-split loss, as replace's configuration;
- novice: MoNE (the experts MoNE's score ranks lowest become their mean output, router untouched);
- reap: REAP expert pruning; reap_router_kd: the same model recovered by Router KD instead (only the
  routers train, on KL to the dense model); dims: Fisher dimension trimming (global allocation); camera: CAMERA-P's
  micro-expert energy (its own allocation: the same ratio per layer, no width floor).

Each is evaluated as built and after the same recovery budget: the same training items (the train
split of the four domains, disjoint from the eval split), steps, learning rate and seed. Recovery
trains what compression created plus rank-8 LoRA on attention for every method (the only tensors a
pruned or trimmed model can train); replace, merge and d2 anneal (blend + distillation fading
out), naive does not. One seed: the recovery runs dominate the time.

    python benchmarks/replace.py --quick     # 100 recovery steps, 128 eval items per domain
    python benchmarks/replace.py             # 300 recovery steps, 256 eval items per domain

Writes benchmarks/results/replace.json, benchmarks/results/replace.png and a table in
benchmarks/README.md.
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

from report import bundled_model, for_model, save_figure, section, update_section, versions, write_json  # noqa: E402

import moetrim  # noqa: E402
from moetrim.apply.replace import apply_replace_plan  # noqa: E402
from moetrim.apply.slicing import apply_plan, shared_copy  # noqa: E402
from moetrim.data.tasks import calibration_texts, get_items, to_sft_records  # noqa: E402
from moetrim.evaluate.tasks_eval import _encode_pairs, answer_nll, evaluate_tasks, pad_id  # noqa: E402
from moetrim.evaluate.throughput import compare_throughput  # noqa: E402
from moetrim.model.view import find_moe_layers  # noqa: E402
from moetrim.plan import make_plan  # noqa: E402
from moetrim.plan.replace import make_replace_plan  # noqa: E402
from moetrim.train import FinetuneConfig, finetune  # noqa: E402

METHODS = ("replace", "naive", "merge", "ream", "d2", "novice", "reap", "reap_router_kd", "dims", "camera")
RATIOS = (0.3, 0.5)
DEFAULT_OUT = HERE / "results" / "replace.json"
# Set by --model: the bundled model and the domains its training.json records.
MODEL, DOMAINS = "reference", ["math", "knowledge", "code", "strings"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def calib_loss(model, tok, n: int = 48) -> float:
    """Mean answer NLL per token on the calib split of every domain: what a configuration is chosen by (never eval)."""
    pairs = [pr for d in DOMAINS for pr in _encode_pairs(tok, get_items(d, "calib", n, seed=0))]
    with torch.inference_mode():
        total, count = answer_nll(model.eval(), pairs, pad_id(tok))
    return total / max(count, 1)


def parse_ranks(text: str) -> list[int] | None:
    """--ranks as whole numbers of at least 1; None (after one error line) otherwise."""
    try:
        ranks = [int(r) for r in text.split(",") if r]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        print(f"error: --ranks must be whole numbers of at least 1, comma-separated (e.g. 4,8,16), got {text!r}", file=sys.stderr)
        return None
    return ranks


def prepare(seed: int):
    """(model, tokenizer, the calibration profile every method plans from, the recovery records: the train
    split of every skill, disjoint from calib and eval)."""
    base, tok = moetrim.reference_model(MODEL)
    profile = moetrim.calibrate(base, calibration_texts(list(DOMAINS), n_per_domain=64, seed=seed), tokenizer=tok,
                                seq_len=256, batch_size=8, seed=seed, whiten=True, dense_outputs=True)
    records = [r for d in DOMAINS for r in to_sft_records(get_items(d, "train", n=1000, seed=seed + 1))]
    return base, tok, profile, records


# The configuration grid replace is chosen from (besides --ranks): the largest group a base serves and whether
# the corrections are whitened. Set by --groups / --whiten; naive has one base per layer and corrections that
# start at zero, so only its rank is chosen.
GROUPS: tuple[int, ...] = (4, 8, 16)
WHITEN: tuple[bool, ...] = (True, False)


def parse_grid(groups: str, whiten: str) -> tuple[tuple[int, ...], tuple[bool, ...]] | None:
    """--groups (whole numbers >= 2) and --whiten (on, off or on,off); None after one error line."""
    try:
        g = tuple(int(x) for x in groups.split(",") if x.strip())
    except ValueError:
        g = ()
    w = tuple({"on": True, "off": False}.get(x.strip()) for x in whiten.split(",") if x.strip())
    if not g or min(g) < 2 or not w or None in w:
        print(f"error: --groups takes whole numbers of at least 2 and --whiten on, off or on,off (got {groups!r}, {whiten!r})",
              file=sys.stderr)
        return None
    return g, w


# The same freedom for the baselines that store factors or merge: D²-MoE chooses whether its deltas are
# whitened (--whiten) and how experts weigh in its one base per layer (its paper's Fisher, or usage counts);
# HC-SMoE merging chooses how members weigh in their merged expert (its paper's usage counts, uniform or Fisher).
D2_WEIGHTINGS: tuple[str, ...] = ("fisher", "usage")
MERGE_WEIGHTINGS: tuple[str, ...] = ("usage", "uniform", "fisher")


def config_grid(method: str, ranks: list[int]) -> list[dict]:
    """The configurations `method` is chosen from, each a dict of make_replace_plan options (one empty dict:
    the method has none to choose)."""
    if method == "replace":
        return [{"rank": r, "max_group": g, "whiten": w} for r in ranks for g in GROUPS for w in WHITEN]
    if method == "naive":
        return [{"rank": r} for r in ranks]
    if method == "d2":
        return [{"whiten": w, "base_weighting": b} for w in WHITEN for b in D2_WEIGHTINGS]
    if method == "merge":
        return [{"base_weighting": b} for b in MERGE_WEIGHTINGS]
    return [{}]


def config_name(cfg: dict) -> str:
    parts = [f"rank {cfg['rank']}"] if "rank" in cfg else []
    parts += [f"group {cfg['max_group']}"] if "max_group" in cfg else []
    parts += [("whitened" if cfg["whiten"] else "plain")] if "whiten" in cfg else []
    parts += [f"{cfg['base_weighting']}-weighted"] if "base_weighting" in cfg else []
    return ", ".join(parts) or "as defined"


def build_chosen(method: str, ratio: float, base, profile, tok, ranks: list[int]):
    """Build ``method`` at ``ratio``; where it has a configuration grid (`config_grid`: replace's rank x
    largest group x whitening, naive's rank, D²-MoE's whitening x base weighting, merging's weighting) it
    tries every configuration the budget reaches and keeps the one with the lowest calib-split loss (never
    eval). Returns (model, removed, choice), or raises UsageError (with every reason) when no
    configuration reaches the ratio."""
    from moetrim.errors import UsageError

    grid = config_grid(method, ranks)
    if grid == [{}]:
        model, removed = build(method, ratio, base, profile, ranks[0])
        return model, removed, {}
    tried, best = {}, None
    for cfg in grid:
        name = config_name(cfg)
        try:
            model, removed = build(method, ratio, base, profile, **{"rank": ranks[0], **cfg})
        except UsageError as exc:
            tried[name] = f"unreachable: {exc}"
            continue
        loss = calib_loss(model, tok)
        tried[name] = round(loss, 4)
        if best is None or loss < best[0]:
            best = (loss, cfg, model, removed)
        else:
            del model
    if best is None:
        raise UsageError(f"no configuration of {method} reaches {ratio:.0%}: " + "; ".join(f"{n}: {why}" for n, why in tried.items()))
    cfg = best[1]
    log(f"{ratio:.0%} {method}: configuration by calib loss {tried} -> {config_name(cfg)}")
    choice = {"config_grid": tried, "config_chosen": config_name(cfg)}
    for key, field in (("rank", "rank_chosen"), ("max_group", "group_chosen"), ("whiten", "whiten_chosen"),
                       ("base_weighting", "weighting_chosen")):
        if key in cfg:
            choice[field] = cfg[key]
    return best[2], best[3], choice


def build(method: str, ratio: float, base, profile, rank: int, *, max_group: int | None = None, whiten: bool | None = None,
          base_weighting: str | None = None):
    if method in ("replace", "naive", "merge", "ream", "d2", "novice"):
        model, _ = moetrim.reference_model(MODEL)
        extra = {k: v for k, v in (("max_group", max_group), ("whiten", whiten), ("base_weighting", base_weighting)) if v is not None}
        plan = make_replace_plan(model, profile, method=method, ratio=ratio, rank=rank, **extra)
        apply_replace_plan(model, plan, profile)
        return model, plan.removed_fraction
    model = shared_copy(base)
    plan = make_plan(model, profile, granularity="experts" if method.startswith("reap") else "dims",
                     criterion={"reap": "reap", "reap_router_kd": "reap", "camera": "camera"}.get(method, "fisher"), ratio=ratio)
    apply_plan(model, plan)
    for p in model.parameters():  # recovery trains in place: give the copy its own tensors
        p.data = p.data.clone()
    return model, plan.removed_fraction


def stored(model) -> dict:
    routed = sum(l.routed_params() for l in find_moe_layers(model))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"routed_params": routed, "weight_bytes": total}


def mean(acc: dict) -> float:
    return sum(acc[d] for d in DOMAINS) / len(DOMAINS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="recovery steps (default 300, quick 100)")
    ap.add_argument("--items", type=int, default=None, help="eval items per domain (default 256, quick 128)")
    ap.add_argument("--lr", type=float, default=5e-5, help="recovery learning rate (2e-4 already costs the dense model accuracy here)")
    ap.add_argument("--rank", type=int, default=16, help="the rank of --curve")
    ap.add_argument("--ranks", default="4,8,16,32", help="replace/naive: rank grid, chosen per ratio by calib-split loss")
    ap.add_argument("--groups", default="4,8,16", help="replace: largest-group grid, chosen with the rank")
    ap.add_argument("--whiten", default="on,off", help="replace: whitened corrections or not (on, off or on,off), chosen with the rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="reference", help="bundled model: reference or longtail (on every skill it was trained on)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: results/replace.json, replace-longtail.json, ...)")
    ap.add_argument("--curve", action="store_true", help="instead: accuracy as built over removed fractions 25-87.5%% per method")
    args = ap.parse_args(argv)
    global MODEL, DOMAINS
    MODEL, DOMAINS, _ = bundled_model(args.model)
    args.out = args.out or for_model(DEFAULT_OUT, MODEL)
    if args.curve:
        return curve(args)
    steps = args.steps or (100 if args.quick else 300)
    n_items = args.items or (128 if args.quick else 256)
    methods = [m for m in args.methods.split(",") if m]
    ranks, grid = parse_ranks(args.ranks), parse_grid(args.groups, args.whiten)
    if ranks is None or grid is None:
        return 2
    global GROUPS, WHITEN
    GROUPS, WHITEN = grid
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, tok, profile, records = prepare(args.seed)
    dense_acc = evaluate_tasks(base, tok, list(DOMAINS), n=n_items)["accuracy"]
    dense = {"accuracy": dense_acc, "mean": mean(dense_acc), **stored(base)}
    log(f"dense: mean {dense['mean']:.3f} ({time.perf_counter() - t0:.0f}s)")
    from moetrim.errors import UsageError

    rows, skipped = [], []
    built = {}
    for ratio in RATIOS:
        for method in methods:
            try:
                model, removed, choice = build_chosen(method, ratio, base, profile, tok, ranks)
            except UsageError as exc:
                skipped.append({"method": method, "ratio": ratio, "why": str(exc)})
                log(f"{ratio:.0%} {method}: skipped ({exc})")
                continue
            acc = evaluate_tasks(model, tok, list(DOMAINS), n=n_items)["accuracy"]
            teacher, _ = moetrim.reference_model(MODEL)
            if method == "reap_router_kd":  # Router KD: the same pruned model, only its routers trained, on KL to the dense model
                cfg = FinetuneConfig(method="recover", lr=args.lr, max_steps=steps, batch_size=16, seq_len=128, router_only=True,
                                     seed=args.seed, progress=False)
            else:
                cfg = FinetuneConfig(method="recover", lr=args.lr, max_steps=steps, batch_size=16, seq_len=128, lora=8,
                                     anneal="none" if method == "naive" else "blend,kd", seed=args.seed, progress=False)
            res = finetune(model, tok, records, cfg, teacher=teacher)
            rec_acc = evaluate_tasks(res.model, tok, list(DOMAINS), n=n_items)["accuracy"]
            row = {"method": method, "ratio": ratio, "removed_fraction": round(removed, 4), **stored(res.model),
                   **choice, "accuracy": acc, "mean": mean(acc), "recovered_accuracy": rec_acc, "recovered_mean": mean(rec_acc),
                   "recover_seconds": res.report["seconds"], "recover_trainable": res.report["trainable_parameters"]}
            rows.append(row)
            built[f"{method}@{ratio}"] = res.model
            log(f"{ratio:.0%} {method:8s}: removed {removed:.3f}  mean {row['mean']:.3f} -> recovered {row['recovered_mean']:.3f}  "
                f"({time.perf_counter() - t0:.0f}s)")
            del model, res, teacher
    # the same training on the uncompressed model: what the recovery recipe itself does to a model that needs none
    control, _ = moetrim.reference_model(MODEL)
    ctl = finetune(control, tok, records, FinetuneConfig(method="full", lr=args.lr, max_steps=steps, batch_size=16, seq_len=128,
                                                          lora=8, aux_coef=0.0, seed=args.seed, progress=False))
    ctl_acc = evaluate_tasks(ctl.model, tok, list(DOMAINS), n=n_items)["accuracy"]
    dense["trained_accuracy"], dense["trained_mean"] = ctl_acc, mean(ctl_acc)
    dense["trained_with"] = {"lora_rank": 8, "lora_on": "attention", "steps": steps, "lr": args.lr}  # LightMoE's LoRA comparison
    log(f"dense trained the same way: {dense['trained_mean']:.3f}")
    log("decode speed, all models side by side (alternating, medians)")
    speeds = compare_throughput({"dense": base, **built}, vocab_size=base.config.vocab_size, prompt_len=64, decode_steps=32,
                                repeats=5, threads=1)
    dense["decode_tokens_per_s"] = speeds["dense"]["decode_tokens_per_s"]
    for r in rows:
        r["decode_tokens_per_s"] = speeds[f"{r['method']}@{r['ratio']}"]["decode_tokens_per_s"]
    result = {"meta": {"model": MODEL, "quick": args.quick, "recover_steps": steps, "recovery_steps": steps, "lr": args.lr, "rank_grid": ranks, "group_grid": list(GROUPS), "whiten_grid": list(WHITEN),
                       "d2_weighting_grid": list(D2_WEIGHTINGS), "merge_weighting_grid": list(MERGE_WEIGHTINGS), "items_per_domain": n_items,
                       "seed": args.seed, "recovery_items": len(records), "seconds": round(time.perf_counter() - t0, 1),
                       "versions": versions()},
              "dense": dense, "rows": rows, "skipped": skipped}
    write_json(args.out, result, experts_implementation=getattr(base.config, "_experts_implementation", None))
    png = plot(result, args.out.with_suffix(".png"))
    table = markdown(result, png)
    print(table)
    if args.out.resolve() == for_model(DEFAULT_OUT, MODEL).resolve():
        update_section(section("replace", MODEL), table)
    log(f"wrote {args.out}, {png} in {time.perf_counter() - t0:.0f}s")
    return 0


CURVE_RATIOS = (0.25, 0.5, 0.625, 0.75, 0.875)
CURVE_OUT = HERE / "results" / "replace_curve.json"


def curve(args) -> int:
    """Mean accuracy as built at each removed fraction, for the best criterion of each granularity (no recovery)."""
    from moetrim.errors import UsageError

    n_items = args.items or (128 if args.quick else 256)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base, tok = moetrim.reference_model(MODEL)
    profile = moetrim.calibrate(base, calibration_texts(list(DOMAINS), n_per_domain=64, seed=args.seed), tokenizer=tok,
                                seq_len=256, batch_size=8, seed=args.seed, whiten=True, dense_outputs=True)
    dense = mean(evaluate_tasks(base, tok, list(DOMAINS), n=n_items)["accuracy"])
    points = []
    for method in [m for m in args.methods.split(",") if m]:
        for ratio in CURVE_RATIOS:
            try:
                model, removed = build(method, ratio, base, profile, args.rank)
            except UsageError as exc:
                points.append({"method": method, "ratio": ratio, "mean": None, "why": str(exc)})
                log(f"{method} {ratio}: unreachable ({exc})")
                continue
            acc = evaluate_tasks(model, tok, list(DOMAINS), n=n_items)["accuracy"]
            points.append({"method": method, "ratio": ratio, "removed_fraction": round(removed, 4), "accuracy": acc, "mean": mean(acc)})
            log(f"{method:8s} {ratio:.3f}: removed {removed:.3f} mean {mean(acc):.3f} ({time.perf_counter() - t0:.0f}s)")
            del model
    result = {"meta": {"model": MODEL, "items_per_domain": n_items, "rank": args.rank, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1),
                       "versions": versions()},
              "dense_mean": dense, "points": points}
    curve_out = for_model(CURVE_OUT, MODEL)
    write_json(curve_out, result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in dict.fromkeys(p["method"] for p in points):
        pts = [(p["removed_fraction"], p["mean"]) for p in points if p["method"] == m and p["mean"] is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=m)
    ax.axhline(dense, color="gray", lw=0.8, label="dense")
    ax.set_xlabel("fraction of routed-expert parameters removed")
    ax.set_ylabel(f"mean accuracy ({len(DOMAINS)} domains), as built")
    ax.legend(fontsize=8)
    png = save_figure(fig, curve_out.with_suffix(".png"))
    methods = list(dict.fromkeys(p["method"] for p in points))
    lines = [f"### Accuracy as built over the removed fraction ({n_items} eval items per domain, rank {args.rank}, no recovery)", "",
             f"`python benchmarks/replace.py --curve{' --quick' if args.quick else ''}{'' if MODEL == 'reference' else ' --model ' + MODEL}` "
             f"({result['meta']['seconds']:.0f} s); mean accuracy over the {len(DOMAINS)} domains (dense {dense:.3f}); '-': the method cannot reach that fraction.", "",
             "| method | " + " | ".join(f"{r:.1%}" for r in CURVE_RATIOS) + " |", "|---|" + "---|" * len(CURVE_RATIOS)]
    for m in methods:
        cells = []
        for r in CURVE_RATIOS:
            p = next(p for p in points if p["method"] == m and p["ratio"] == r)
            cells.append("-" if p["mean"] is None else f"{p['mean']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"![removed fraction curve](results/{png.name})", ""]
    table = "\n".join(lines)
    print(table)
    update_section(section("replace-curve", MODEL), table)
    return 0


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    methods = sorted({r["method"] for r in result["rows"]}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
    for ax, key, title in ((axes[0], "mean", "as built"), (axes[1], "recovered_mean", "after the same recovery")):
        for m in methods:
            pts = sorted((r["ratio"], r[key]) for r in result["rows"] if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=m)
        ax.axhline(result["dense"]["mean"], color="gray", lw=0.8, label="dense")
        ax.set_xlabel("fraction of routed-expert parameters removed")
        ax.set_title(title)
    axes[0].set_ylabel(f"mean accuracy ({len(DOMAINS)} domains)")
    axes[1].legend(fontsize=8)
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    meta, dense = result["meta"], result["dense"]
    doms = list(DOMAINS)
    lines = [f"### Replacing vs merging vs pruning at equal parameters ({'quick' if meta['quick'] else 'full'}: "
             f"{meta['recover_steps']} recovery steps, lr {meta['lr']}, {meta['items_per_domain']} eval items, seed {meta['seed']})",
             "", "`python benchmarks/replace.py" + (" --quick" if meta["quick"] else "") + ("" if MODEL == "reference" else f" --model {MODEL}")
             + f"` ({meta['seconds']:.0f} s). Accuracy per domain "
             "as built → after recovery (dense: → after the same training, LoRA on attention); routed parameters as stored (bases and "
             "factors counted); decode tokens/s at batch 1, one thread, all models measured side by side.", "",
             "| removed | method | " + " | ".join(doms) + " | mean | mean recovered | routed params | weight MiB | decode tok/s |",
             "|---|---|" + "---|" * len(doms) + "---|---|---|---|---|",
             "| 0% | dense | " + " | ".join(f"{dense['accuracy'][d]:.2f} → {dense['trained_accuracy'][d]:.2f}" for d in doms)
             + f" | {dense['mean']:.3f} | {dense['trained_mean']:.3f} | "
             f"{dense['routed_params']:,} | {dense['weight_bytes'] / 2**20:.1f} | {dense['decode_tokens_per_s']:.0f} |"]
    for r in result["rows"]:
        name = r["method"] + (f" ({r['config_chosen']})" if "config_chosen" in r else f" (rank {r['rank_chosen']})" if "rank_chosen" in r else "")
        lines.append(f"| {r['removed_fraction']:.1%} | {name} | "
                     + " | ".join(f"{r['accuracy'][d]:.2f} → {r['recovered_accuracy'][d]:.2f}" for d in doms)
                     + f" | {r['mean']:.3f} | {r['recovered_mean']:.3f} | {r['routed_params']:,} | {r['weight_bytes'] / 2**20:.1f} | "
                     f"{r['decode_tokens_per_s']:.0f} |")
    lines += ["", f"![replacing]({'results/' + png.name})", "", "**What this run shows** (computed from the JSON):", ""]
    for ratio in sorted({r["ratio"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["ratio"] == ratio]
        for key, label in (("mean", "as built"), ("recovered_mean", "after recovery")):
            ranked = sorted(rs, key=lambda r: -r[key])
            lines.append(f"- {ratio:.0%} removed, {label}: " + ", ".join(f"{r['method']} {r[key]:.3f}" for r in ranked) + ".")
    lines.append(f"- The same training on the dense model moves its mean from {dense['mean']:.3f} to {dense['trained_mean']:.3f}: "
                 "the recovery data (the task suite's train split, which the reference model was trained on) has little left to teach it.")
    for sk in result.get("skipped", []):
        lines.append(f"- {sk['ratio']:.0%} {sk['method']}: not built ({sk['why']}).")
    lines.append("- One seed and 128–256 items per domain: differences under about 0.03 are within noise.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
