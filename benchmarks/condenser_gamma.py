"""How large must the condenser's phase-1 γ be before routing really sparsifies? Entropy, Gini and cost per γ.

ExpertCondenser's phase 1 is aux-free SFT with a sparsifying routing bias: after every optimizer step each
expert's bias moves by γ toward the busy experts (b_e += γ·sign(u_e − mean u), `moetrim.train.bias`), so busy
experts attract more tokens; at the switch the r busiest experts per layer become the condensers. The
authors' γ is 1e-3, and in `finetune.py` the condenser at that γ moved routing entropy by only about 0.03,
so the sparsification the method relies on hardly happened. This runs phase 1 alone (`moetrim finetune
--method auxfree --bias sparsify --gamma γ`) for as many steps as the condenser's phase 1 gets in
`finetune.py --quick` (half of 250) at each γ of the grid, plus γ = 0 (the same SFT without a bias) as the
control, all from the same model, data, lr and seed. Per γ, on calib text only (this chooses a setting):

- routing on the new domain's text (what phase 1 trains on) and on the original skills' text:
  normalised entropy and Gini (means over layers), and the share of routed slots that the r busiest
  experts per layer take (the experts that would become condensers);
- calib accuracy on the new domain and the mean over the original skills: what sparsifying costs.

    python benchmarks/condenser_gamma.py --model longtail --lr 3e-4   # γ 0, 1e-3, 1e-2, 3e-2, 1e-1
    python benchmarks/condenser_gamma.py --gammas 0,1e-3,1e-1 --steps 60

Writes benchmarks/results/condenser_gamma.json (condenser_gamma-longtail.json), the PNG beside it and a
table in benchmarks/README.md.
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

from report import bundled_model, for_model, publish, save_figure, versions  # noqa: E402

import moetrim  # noqa: E402
from moetrim.data.tasks import calibration_texts, get_items, to_sft_records  # noqa: E402
from moetrim.evaluate.routing import routing_health  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.train import FinetuneConfig, finetune  # noqa: E402

DEFAULT_OUT = HERE / "results" / "condenser_gamma.json"
DEFAULT_LR = 1e-4
CONDENSERS = 2  # r, the authors' and moetrim's default


def routing(model, tok, texts: list[str]) -> dict:
    """Means over layers: entropy, Gini, and the routed-slot share of each layer's r busiest experts."""
    health = routing_health(model, tok, texts, max_tokens=20000)
    top = [sum(sorted(layer["token_share"], reverse=True)[:CONDENSERS]) for layer in health["layers"]]
    return {"entropy": health["summary"]["entropy"], "gini": health["summary"]["gini"], "top_r_share": sum(top) / len(top),
            "top_r_share_layers": top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference", help="bundled model: reference or longtail")
    ap.add_argument("--gammas", default="0,1e-3,1e-2,3e-2,1e-1", help="phase-1 bias steps (0: the same SFT without a bias)")
    ap.add_argument("--steps", type=int, default=125, help="phase-1 steps (finetune.py --quick's condenser: half of 250)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="phase-1 lr (the committed long-tail run uses 3e-4, the lr finetune.py's grid chose for its condenser)")
    ap.add_argument("--items", type=int, default=64, help="calib items per domain for the accuracies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        gammas = sorted({float(g) for g in args.gammas.split(",") if g.strip()})
    except ValueError:
        ap.error(f"--gammas: {args.gammas!r} is not a comma-separated list of numbers")
    if not gammas or min(gammas) < 0 or args.steps < 1:
        ap.error("--gammas takes numbers >= 0 (at least one) and --steps at least 1")
    key, domains, new = bundled_model(args.model)
    out = args.out or for_model(DEFAULT_OUT, key)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    records = to_sft_records(get_items(new, "train", n=4000, seed=0))
    texts = {"new": [it.text for it in get_items(new, "calib", 128, seed=0)],
             "original": calibration_texts(list(domains), n_per_domain=64, seed=0)}

    def measured(model, tok) -> dict:
        acc = evaluate_tasks(model, tok, [new, *domains], n=args.items, split="calib")["accuracy"]
        return {"routing_new": routing(model, tok, texts["new"]), "routing_original": routing(model, tok, texts["original"]),
                "calib_new": acc[new], "calib_original": sum(acc[d] for d in domains) / len(domains), "calib_accuracy": acc}

    base_model, tok = moetrim.reference_model(key)
    rows = [{"gamma": None, **measured(base_model, tok)}]
    log(f"before fine-tuning: entropy on {new} {rows[0]['routing_new']['entropy']:.3f} ({time.perf_counter() - t0:.0f}s)")
    for gamma in gammas:
        model, _ = moetrim.reference_model(key)
        cfg = FinetuneConfig(method="auxfree", bias="sparsify" if gamma > 0 else "none", gamma=gamma, lr=args.lr,
                             max_steps=args.steps, batch_size=16, seq_len=128, warmup=0.1, seed=args.seed, progress=False,
                             logging_steps=max(1, args.steps // 10))
        res = finetune(model, tok, records, cfg)
        rows.append({"gamma": gamma, **measured(res.model, tok), "seconds": res.report["seconds"]})
        r = rows[-1]
        log(f"γ {gamma:g}: entropy on {new} {r['routing_new']['entropy']:.3f}, top-{CONDENSERS} share "
            f"{r['routing_new']['top_r_share']:.3f}; calib {new} {r['calib_new']:.3f}, original {r['calib_original']:.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
        del model, res
    result = {"meta": {"model": key, "new_domain": new, "steps": args.steps, "lr": args.lr, "seed": args.seed,
                       "condensers": CONDENSERS, "calib_items": args.items, "seconds": round(time.perf_counter() - t0, 1),
                       "torch_threads": torch.get_num_threads(), "versions": versions()}, "rows": rows}
    publish(result, out, DEFAULT_OUT, "condenser-gamma", key, plot, markdown)
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["gamma"] is not None]
    xs = list(range(len(rows)))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for what, style in (("routing_new", "-o"), ("routing_original", "--s")):
        ax.plot(xs, [r[what]["entropy"] for r in rows], style, color="C0", label=f"entropy ({what.split('_')[1]} text)")
        ax.plot(xs, [r[what]["top_r_share"] for r in rows], style, color="C1", label=f"top-{result['meta']['condensers']} share ({what.split('_')[1]})")
    ax.set_xticks(xs, [f"{r['gamma']:g}" for r in rows])
    ax.set_xlabel("phase-1 γ (0: no bias)")
    ax.legend(fontsize=7)
    bx.plot(xs, [r["calib_new"] for r in rows], "-o", label=f"calib {result['meta']['new_domain']}")
    bx.plot(xs, [r["calib_original"] for r in rows], "-s", label="calib, original skills")
    bx.set_xticks(xs, [f"{r['gamma']:g}" for r in rows])
    bx.set_xlabel("phase-1 γ")
    bx.set_ylabel("accuracy")
    bx.legend(fontsize=7)
    fig.suptitle(f"condenser phase 1 on {result['meta']['model']} ({result['meta']['steps']} steps, lr {result['meta']['lr']})")
    return save_figure(fig, path)


def markdown(result: dict, png: Path) -> str:
    meta, rows = result["meta"], result["rows"]
    r = meta["condensers"]
    cmd = "python benchmarks/condenser_gamma.py" + ("" if meta["model"] == "reference" else f" --model {meta['model']}") \
        + ("" if meta["lr"] == DEFAULT_LR else f" --lr {meta['lr']:g}")
    lines = [f"### Condenser phase 1: how much γ sparsifies routing ({meta['model']}, {meta['steps']} steps, lr {meta['lr']}, seed {meta['seed']})",
             "", f"`{cmd}` ({meta['seconds']:.0f} s). Phase 1 alone (aux-free SFT on {meta['new_domain']} with the sparsifying "
             "bias), γ = 0 the same SFT without a bias. Routing: means over layers on calib text; top-r share: the routed "
             f"slots the {r} busiest experts of a layer take (they become the condensers). Accuracies on the calib split, "
             f"{meta['calib_items']} items per domain.", "",
             f"| γ | entropy, {meta['new_domain']} | Gini, {meta['new_domain']} | top-{r} share, {meta['new_domain']} | "
             f"entropy, original | top-{r} share, original | calib {meta['new_domain']} | calib original |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = "before fine-tuning" if row["gamma"] is None else f"{row['gamma']:g}"
        n, o = row["routing_new"], row["routing_original"]
        lines.append(f"| {name} | {n['entropy']:.3f} | {n['gini']:.3f} | {n['top_r_share']:.3f} | {o['entropy']:.3f} | "
                     f"{o['top_r_share']:.3f} | {row['calib_new']:.3f} | {row['calib_original']:.3f} |")
    lines += ["", f"![condenser γ]({'results/' + png.name})", ""]
    control = next((x for x in rows if x["gamma"] == 0), None)
    if control is not None:
        for row in rows:
            if row["gamma"]:
                d = row["routing_new"]["entropy"] - control["routing_new"]["entropy"]
                lines.append(f"- γ {row['gamma']:g}: entropy on {meta['new_domain']} {d:+.3f} against no bias, top-{r} share "
                             f"{row['routing_new']['top_r_share'] - control['routing_new']['top_r_share']:+.3f}; calib original "
                             f"{row['calib_original'] - control['calib_original']:+.3f}.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
