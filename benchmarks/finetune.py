"""Fine-tuning methods on a domain the reference model has never seen: what each learns, what each keeps.

The bundled reference model (trained on math, knowledge, code and strings) is fine-tuned on the
`units` domain (unit conversion with a worked chain, `moetrim tasks units`) with every method of
`moetrim finetune`: full SFT (with the load-balancing loss), aux-free SFT, ESFT, DenseMixer and
condenser (bias sparsification, then always-active condenser experts). Every method gets the same
training items, steps, batch, learning-rate schedule and seed; seeds change the data order (and
ESFT's scoring sample). Measured per run:

- new-domain accuracy (units eval split) and retention: accuracy on the four original domains,
  the long tail the condenser method claims to keep;
- routing health on the original domains' text before and after (normalised entropy, Gini, dead
  experts, router KL and top-k overlap against the reference model);
- active experts per token at inference, seconds per optimizer step, trainable parameters.

A finding says one method beats another only where the paired difference over seeds has a 95%
t-interval that excludes 0; the rest are ties.

``--model longtail`` runs the same on the long-tail reference model: its new domain is the one its
``training.json`` names (``dates``, date word problems that need its rare calendar skill) and
retention is over its nine skills.

    python benchmarks/finetune.py --quick     # 250 steps, 128 eval items per domain, 3 seeds (557 s idle on 2 cores)
    python benchmarks/finetune.py             # 600 steps, 256 eval items per domain, 3 seeds
    python benchmarks/finetune.py --quick --model longtail   # 9 skills, new domain dates (996 s idle on 2 cores)
    python benchmarks/finetune.py --quick --model longtail --lrs 3e-5,1e-4,3e-4,1e-3   # lr chosen on calib (1790 s)

Writes benchmarks/results/finetune.json (finetune-longtail.json), the PNG beside it and a table in
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

from report import bundled_model, for_model, interval, load_model, paired_difference, save_figure, section, update_section, versions, write_json  # noqa: E402

from moetrim.data.tasks import calibration_texts, get_items, to_sft_records  # noqa: E402
from moetrim.evaluate.routing import routing_health  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.train import FinetuneConfig, finetune  # noqa: E402

METHODS = ("full", "auxfree", "esft", "densemixer", "condenser")
FULL_GRID = (3e-5, 1e-4, 3e-4, 1e-3)  # the protocol's grid: the condenser authors' scale (1e-5 .. 1e-4) up to ours
RARE_SHARE = 0.03  # a skill with at most this share of the training tokens is a rare one (the long tail)
DEFAULT_OUT = HERE / "results" / "finetune.json"
# Set by --model from the model's training.json: the domains it was trained on and the one it never saw.
MODEL, DOMAINS, NEW = "reference", ["math", "knowledge", "code", "strings"], "units"
RARE: list[str] = []  # the model's rare skills (the long tail), from its training.json token shares


def rare_skills(key: str) -> list[str]:
    """Skills given at most RARE_SHARE of the model's training tokens (none for the first model's even mixture)."""
    from moetrim.assets import BUNDLED, training_record

    shares = (training_record(BUNDLED[key]) or {}).get("hyperparameters", {}).get("token_shares", {})
    return [d for d in DOMAINS if d in shares and shares[d] <= RARE_SHARE]
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def paired(a: list[float], b: list[float]) -> str:
    return {"a > b": "higher", "a < b": "lower", "tie": "tie"}[paired_difference(a, b)]


def measure(model, tok, n_items: int, general: list[str], base=None) -> dict:
    acc = evaluate_tasks(model, tok, [NEW, *DOMAINS], n=n_items)
    health = routing_health(model, tok, general, base=base, max_tokens=20000)
    accuracy = dict(acc["accuracy"])
    common = [d for d in DOMAINS if d not in RARE]
    return {"accuracy": accuracy, "retention": sum(accuracy[d] for d in DOMAINS) / len(DOMAINS),
            "retention_common": sum(accuracy[d] for d in common) / len(common),
            "retention_rare": sum(accuracy[d] for d in RARE) / len(RARE) if RARE else None,
            "routing": health["summary"], "routing_layers": [
                {k: l.get(k) for k in ("layer", "entropy", "gini", "dead", "token_share")} for l in health["layers"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="250 steps and 128 eval items per domain")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600, quick 250)")
    ap.add_argument("--items", type=int, default=None, help="eval items per domain (default 256, quick 128)")
    ap.add_argument("--train-items", type=int, default=4000, help="units training items (the same for every method and seed)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate for every method when no grid is searched")
    ap.add_argument("--lrs", default=None, help="learning-rate grid (comma-separated): each method's lr is the one whose seed-0 "
                    "run scores best on the calib split (new domain and retention), never on eval; default: the one --lr "
                    f"with --quick, else {','.join(map(str, FULL_GRID))}")
    ap.add_argument("--calib-items", type=int, default=64, help="calib items per domain for choosing the lr")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default="reference", help="bundled model: reference (new domain units) or longtail (dates)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: results/finetune.json, finetune-longtail.json, ...)")
    ap.add_argument("--weights", type=Path, default=None, help="fine-tune these weights (a folder, e.g. a training run's) as --model "
                    "instead of the bundled ones; needs --out")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and PNG from an existing --out JSON, run nothing")
    args = ap.parse_args(argv)
    if args.weights is not None and (args.out is None or not (args.weights / "config.json").is_file()):
        ap.error("--weights: give a folder holding config.json and model.safetensors, and an --out file for its results")
    global MODEL, DOMAINS, NEW, RARE
    MODEL, DOMAINS, NEW = bundled_model(args.model)
    RARE = rare = rare_skills(MODEL)
    args.out = args.out or for_model(DEFAULT_OUT, MODEL)
    if args.report_only:
        import json

        return report(json.loads(args.out.read_text()), args.out)
    steps = args.steps or (250 if args.quick else 600)
    n_items = args.items or (128 if args.quick else 256)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    try:
        grid = sorted(float(v) for v in args.lrs.split(",") if v.strip()) if args.lrs else ([args.lr] if args.quick else list(FULL_GRID))
    except ValueError:
        ap.error(f"--lrs: {args.lrs!r} is not a comma-separated list of numbers, e.g. 1e-4,3e-4")
    if not grid or any(v <= 0 for v in grid):
        ap.error("--lrs: give at least one learning rate, all > 0")
    if 0 not in seeds:
        seeds = [0, *seeds] if len(grid) > 1 else seeds
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    records = to_sft_records(get_items(NEW, "train", n=args.train_items, seed=0))
    general = calibration_texts(list(DOMAINS), n_per_domain=64, seed=0)  # the calib split: never trained or evaluated on
    base_model, tok = load_model(MODEL, args.weights)
    base = measure(base_model, tok, n_items, general)
    log(f"reference: {NEW} {base['accuracy'][NEW]:.3f}, original domains {base['retention']:.3f}")
    def train(method: str, lr: float, seed: int):
        model, _ = load_model(MODEL, args.weights)
        cfg = FinetuneConfig(method=method, lr=lr, max_steps=steps, batch_size=args.batch_size, seq_len=128,
                             warmup=0.1, seed=seed, progress=False, logging_steps=max(1, steps // 10))
        return finetune(model, tok, records, cfg)

    # the lr of each method: seed 0 over the grid, scored on the calib split; that run is kept as seed 0's
    chosen, search, kept = {}, {}, {}
    for method in methods:
        if len(grid) == 1:
            chosen[method] = grid[0]
            continue
        search[method] = []
        for lr in grid:
            res = train(method, lr, 0)
            cal = evaluate_tasks(res.model, tok, [NEW, *DOMAINS], n=args.calib_items, split="calib")["accuracy"]
            entry = {"lr": lr, "new": cal[NEW], "retention": sum(cal[d] for d in DOMAINS) / len(DOMAINS)}
            entry["score"] = (entry["new"] + entry["retention"]) / 2
            search[method].append(entry)
            log(f"lr search {method:10s} lr {lr:g}: calib {NEW} {entry['new']:.3f}  retention {entry['retention']:.3f}  "
                f"score {entry['score']:.3f}  ({time.perf_counter() - t0:.0f}s)")
            if method not in chosen or entry["score"] > max(e["score"] for e in search[method][:-1]):
                chosen[method], kept[method] = lr, res
            del res
    runs = []
    for seed in seeds:
        for method in methods:
            res = kept.pop(method) if seed == 0 and method in kept else train(method, chosen[method], seed)
            rep = res.report
            row = {"method": method, "seed": seed, "lr": chosen[method], **measure(res.model, tok, n_items, general, base=base_model),
                   "seconds_per_step": rep["seconds_per_step"], "active_experts_per_token": rep["active_experts_per_token"],
                   "trainable_parameters": rep["trainable_parameters"], "final_loss": rep["final_loss"],
                   "condensers": rep.get("condensers"), "esft_trained_fraction": rep.get("esft", {}).get("trained_expert_fraction")}
            row["score"] = (row["accuracy"][NEW] + row["retention"]) / 2
            runs.append(row)
            log(f"seed {seed} {method:10s}: {NEW} {row['accuracy'][NEW]:.3f}  retention {row['retention']:.3f}  "
                f"entropy {row['routing']['entropy']:.3f}  KL {row['routing'].get('kl_to_base', 0):.3f}  "
                f"{rep['seconds_per_step']:.3f} s/step  ({time.perf_counter() - t0:.0f}s)")
            del res
    summary = summarise(runs, methods)
    for entry in summary:
        entry["lr_grid"], entry["lr_chosen"] = grid, chosen[entry["method"]]
        entry["lr_search"] = search.get(entry["method"], [])
    result = {"meta": {"model": MODEL, "weights": str(args.weights) if args.weights else "bundled", "new_domain": NEW, "domains": DOMAINS, "quick": args.quick, "steps": steps, "batch_size": args.batch_size, "lr": args.lr if len(grid) == 1 else None, "lr_grid": grid,
                       "lr_chosen_on": "calib split, seed 0, mean of new-domain accuracy and retention" if len(grid) > 1 else None,
                       "calib_items": args.calib_items, "rare_skills": rare, "train_items": args.train_items,
                       "items_per_domain": n_items, "seeds": seeds, "seconds": round(time.perf_counter() - t0, 1),
                       "top_k": base_model.config.num_experts_per_tok, "torch_threads": torch.get_num_threads(), "defaults": FinetuneConfig().__dict__,
                       "versions": versions()},
              "reference": base, "runs": runs, "summary": summary}
    write_json(args.out, result)
    report(result, args.out)
    log(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


def report(result: dict, out: Path) -> int:
    """The PNG beside the JSON, the table on stdout and, for the default output, in benchmarks/README.md."""
    png = plot(result, out.with_suffix(".png"))
    table = markdown(result, png)
    print(table)
    if out.resolve() == for_model(DEFAULT_OUT, MODEL).resolve():
        update_section(section("finetune", MODEL), table)
    return 0


def summarise(runs: list[dict], methods: list[str]) -> list[dict]:
    out = []
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        if not rs:
            continue
        entry = {"method": m, "seeds": [r["seed"] for r in rs]}
        for key, get in (("new", lambda r: r["accuracy"][NEW]), ("retention", lambda r: r["retention"]), ("score", lambda r: r["score"]),
                         ("retention_common", lambda r: r.get("retention_common", r["retention"])),
                         ("retention_rare", lambda r: r.get("retention_rare")),
                         ("entropy", lambda r: r["routing"]["entropy"]), ("gini", lambda r: r["routing"]["gini"]),
                         ("dead", lambda r: r["routing"]["dead"]), ("kl", lambda r: r["routing"].get("kl_to_base", 0.0)),
                         ("overlap", lambda r: r["routing"].get("topk_overlap", 1.0)), ("seconds_per_step", lambda r: r["seconds_per_step"])):
            vals = [get(r) for r in rs]
            if any(v is None for v in vals):
                continue
            entry[key], entry[key + "_ci95"] = interval(vals)
            entry[key + "_per_seed"] = vals
        entry["per_domain"] = {d: interval([r["accuracy"][d] for r in rs])[0] for d in DOMAINS}
        entry["active_experts_per_token"] = rs[0]["active_experts_per_token"]
        entry["trainable_parameters"] = rs[0]["trainable_parameters"]
        out.append(entry)
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = result["reference"]
    for s in result["summary"]:
        ax.errorbar(s["retention"], s["new"], xerr=s["retention_ci95"], yerr=s["new_ci95"], fmt="o", capsize=3, label=s["method"])
    ax.scatter([ref["retention"]], [ref["accuracy"][NEW]], marker="*", s=120, color="black", label="reference (before)")
    ax.set_xlabel(f"retention: mean accuracy on the {len(DOMAINS)} original domains")
    ax.set_ylabel(f"{NEW} accuracy (new domain)")
    ax.set_title("learned vs kept (mean over seeds, 95% CI)")
    ax.legend(fontsize=8)
    names = [s["method"] for s in result["summary"]]
    x = range(len(names))
    bx.bar([i - 0.2 for i in x], [s["entropy"] for s in result["summary"]], width=0.4, label="entropy (norm.)")
    bx.bar([i + 0.2 for i in x], [s["gini"] for s in result["summary"]], width=0.4, label="Gini")
    bx.axhline(ref["routing"]["entropy"], color="C0", ls="--", lw=0.8)
    bx.axhline(ref["routing"]["gini"], color="C1", ls="--", lw=0.8)
    bx.set_xticks(list(x), names)
    bx.set_title("routing on the original domains (dashed: before)")
    bx.legend(fontsize=8)
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    meta, ref = result["meta"], result["reference"]
    doms = list(DOMAINS)
    grid = meta.get("lr_grid") or [meta["lr"]]
    lr_text = f"lr {grid[0]}" if len(grid) == 1 else f"lr per method chosen on the calib split from {', '.join(map(str, grid))}"
    rare = meta.get("rare_skills") or []
    tail_head = " common | rare |" if rare else ""
    tail_rule = "---|---|" if rare else ""

    def tail(src: dict) -> str:
        return f" {src.get('retention_common', src['retention']):.3f} | {src.get('retention_rare') or 0:.3f} |" if rare else ""
    lines = [f"### Fine-tuning {'' if MODEL == 'reference' else MODEL + ' '}on a new domain ({'quick' if meta['quick'] else 'full'}: {meta['steps']} steps of {meta['batch_size']}, "
             f"{lr_text}, {meta['items_per_domain']} eval items per domain, seeds {', '.join(map(str, meta['seeds']))})", "",
             "`python benchmarks/finetune.py" + (" --quick" if meta["quick"] else "") + ("" if MODEL == "reference" else f" --model {MODEL}")
             + f"` ({meta['seconds']:.0f} s). `{NEW}` is the new domain; retention is the mean accuracy on the {len(doms)} original domains; routing is measured on "
             "the original domains' calib text. Mean over seeds, ± half-width of the 95% t-interval."
             + (f" Rare skills (at most {RARE_SHARE:.0%} of the training tokens): {', '.join(rare)}." if rare else ""), "",
             f"| method | lr | {NEW} | " + " | ".join(doms) + f" | retention |{tail_head} score | entropy | Gini | dead | KL vs ref | top-k overlap | experts/token | s/step |",
             "|---|---|---|" + "---|" * len(doms) + tail_rule + "---|---|---|---|---|---|---|---|---|",
             f"| reference (before) | - | {ref['accuracy'][NEW]:.3f} | " + " | ".join(f"{ref['accuracy'][d]:.3f}" for d in doms)
             + f" | {ref['retention']:.3f} |{tail(ref)} {(ref['accuracy'][NEW] + ref['retention']) / 2:.3f} | {ref['routing']['entropy']:.3f} | "
             f"{ref['routing']['gini']:.3f} | {ref['routing']['dead']:.1f} | - | - | {meta.get('top_k', 2)} | - |"]
    for s in result["summary"]:
        lines.append(f"| {s['method']} | {s.get('lr_chosen', grid[0]):g} | {s['new']:.3f} ± {s['new_ci95']:.3f} | "
                     + " | ".join(f"{s['per_domain'][d]:.3f}" for d in doms)
                     + f" | {s['retention']:.3f} ± {s['retention_ci95']:.3f} |{tail(s)} {s['score']:.3f} ± {s['score_ci95']:.3f} | {s['entropy']:.3f} | "
                     f"{s['gini']:.3f} | {s['dead']:.1f} | {s['kl']:.3f} | {s['overlap']:.3f} | {s['active_experts_per_token']} | "
                     f"{s['seconds_per_step']:.3f} |")
    lines += ["", f"![fine-tuning]({'results/' + png.name})", "", "**What this run shows** (computed from the JSON):", ""]
    lines += [f"- {f}" for f in findings(result)]
    lines.append("")
    return "\n".join(lines)


def findings(result: dict) -> list[str]:
    summ = {s["method"]: s for s in result["summary"]}
    out = []
    if "condenser" in summ:
        c = summ["condenser"]
        for other in ("full", "auxfree", "esft", "densemixer"):
            if other not in summ:
                continue
            o = summ[other]
            parts = [f"{label}: {paired(c[key + '_per_seed'], o[key + '_per_seed'])} ({c[key]:.3f} vs {o[key]:.3f})"
                     for key, label in (("new", NEW), ("retention", "retention"), ("score", "score"))]
            out.append(f"condenser vs {other}: " + "; ".join(parts) + ".")
    best = max(summ.values(), key=lambda s: s["score"]) if summ else None
    if best:
        tied = [s["method"] for s in summ.values() if s is not best and paired(s["score_per_seed"], best["score_per_seed"]) == "tie"]
        out.append(f"highest score (mean of {NEW} accuracy and retention): {best['method']} ({best['score']:.3f})"
                   + (f", tied with {', '.join(tied)}" if tied else "") + ".")
    ref = result["reference"]
    forgot = [f"{s['method']} {s['retention'] - ref['retention']:+.3f}" for s in summ.values()]
    out.append(f"retention change against the reference ({ref['retention']:.3f}): " + ", ".join(forgot) + ".")
    if "condenser" in summ:
        c = summ["condenser"]
        out.append(f"condensers make {c['active_experts_per_token']} experts run per token (additive budget), so the condenser "
                   f"rows cost {c['seconds_per_step'] / summ['full']['seconds_per_step']:.2f}x full SFT's seconds per step here"
                   if "full" in summ else "")
    out = [line for line in out if line]
    return out


if __name__ == "__main__":
    sys.exit(main())
