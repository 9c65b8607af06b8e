"""Does LightMoE's annealed recovery matter once recovery really trains? An ablation at a real budget.

Expert replacing (`benchmarks/replace.py`'s `replace`: REAP selection, clustered bases, whitened-SVD
corrections at the rank of `--ranks` with the lowest calib-split loss) is built once at `--ratio` of
routed parameters removed, then recovered from that same start for `--steps` optimizer steps (default
1000) under each annealing setting of `moetrim finetune --method recover`:

- blend,kd: the paper's recipe (the original expert blended in and distillation, both fading out);
- kd: distillation only; blend: blending only; none: plain training of what compression created.

The same training (data, steps, lr, seed, LoRA rank 8 on attention) runs on the uncompressed model as the
control: it must stay within noise of the dense model, or the recovery data itself teaches the model.
Recovery data is the model's own training distribution (the train split of every skill it was trained
on). Each run records eval accuracy, calib-split answer loss (what a user would watch for a plateau) and
the training-loss curve.

    python benchmarks/recovery.py --model longtail            # 1000 steps, 50% removed (about 25 min on 2 cores)
    python benchmarks/recovery.py --steps 300 --items 64      # a shorter look

Writes benchmarks/results/recovery.json (recovery-longtail.json), the PNG beside it and a table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import replace as rp  # noqa: E402
from report import bundled_model, for_model, save_figure, section, update_section, versions, write_json  # noqa: E402

import moetrim  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.train import FinetuneConfig, finetune  # noqa: E402

ANNEALS = ("blend,kd", "kd", "blend", "none")
DEFAULT_OUT = HERE / "results" / "recovery.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference", help="bundled model: reference or longtail")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of routed-expert parameters removed (default 0.5)")
    ap.add_argument("--steps", type=int, default=1000, help="recovery steps per run (default 1000)")
    ap.add_argument("--lr", type=float, default=5e-5, help="recovery learning rate (replace.py's)")
    ap.add_argument("--ranks", default="4,8,16,32", help="rank grid, chosen by calib-split loss")
    ap.add_argument("--anneals", default=";".join(ANNEALS), help="annealing settings to compare, separated by ';' (blend,kd is one)")
    ap.add_argument("--items", type=int, default=128, help="eval items per domain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.ratio < 1 or args.steps < 1:
        print("error: --ratio must lie strictly between 0 and 1 and --steps be at least 1", file=sys.stderr)
        return 2
    anneals = [a.strip() for a in args.anneals.split(";") if a.strip()]
    if not anneals or any(a not in ANNEALS for a in anneals):
        print(f"error: --anneals takes settings separated by ';' from {'; '.join(ANNEALS)}, got {args.anneals!r}", file=sys.stderr)
        return 2
    ranks = rp.parse_ranks(args.ranks)
    if ranks is None:
        return 2
    key, domains, _ = bundled_model(args.model)
    rp.MODEL, rp.DOMAINS = key, domains
    out = args.out or for_model(DEFAULT_OUT, key)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    base, tok, profile, records = rp.prepare(args.seed)
    dense_acc = evaluate_tasks(base, tok, list(domains), n=args.items)["accuracy"]
    dense = {"accuracy": dense_acc, "mean": rp.mean(dense_acc), "calib_loss": rp.calib_loss(base, tok)}
    built, removed, choice = rp.build_chosen("replace", args.ratio, base, profile, tok, ranks)
    built_acc = evaluate_tasks(built, tok, list(domains), n=args.items)["accuracy"]
    as_built = {"accuracy": built_acc, "mean": rp.mean(built_acc), "calib_loss": rp.calib_loss(built, tok),
                "removed_fraction": round(removed, 4), **choice}
    log(f"dense {dense['mean']:.3f}; replace as built {as_built['mean']:.3f} (removed {removed:.3f}, rank {choice.get('rank_chosen')}) "
        f"({time.perf_counter() - t0:.0f}s)")

    def recover(anneal: str) -> dict:
        model = copy.deepcopy(built)  # every setting starts from the very same built model
        teacher, _ = moetrim.reference_model(key)
        cfg = FinetuneConfig(method="recover", lr=args.lr, max_steps=args.steps, batch_size=16, seq_len=128, lora=8,
                             anneal=anneal, seed=args.seed, progress=False, logging_steps=max(1, args.steps // 20))
        res = finetune(model, tok, records, cfg, teacher=None if anneal == "none" else teacher)
        acc = evaluate_tasks(res.model, tok, list(domains), n=args.items)["accuracy"]
        return {"anneal": anneal, "accuracy": acc, "mean": rp.mean(acc), "calib_loss": rp.calib_loss(res.model, tok),
                "loss_curve": res.report["loss_curve"], "seconds": res.report["seconds"],
                "trainable_parameters": res.report["trainable_parameters"]}

    rows = []
    for anneal in anneals:
        rows.append(recover(anneal))
        r = rows[-1]
        log(f"recover {anneal:9s}: mean {r['mean']:.3f}  calib loss {r['calib_loss']:.4f}  ({time.perf_counter() - t0:.0f}s)")
    control, _ = moetrim.reference_model(key)
    ctl = finetune(control, tok, records, FinetuneConfig(method="full", lr=args.lr, max_steps=args.steps, batch_size=16, seq_len=128,
                                                          lora=8, aux_coef=0.0, seed=args.seed, progress=False,
                                                          logging_steps=max(1, args.steps // 20)))
    ctl_acc = evaluate_tasks(ctl.model, tok, list(domains), n=args.items)["accuracy"]
    dense.update(trained_accuracy=ctl_acc, trained_mean=rp.mean(ctl_acc), trained_calib_loss=rp.calib_loss(ctl.model, tok),
                 trained_loss_curve=ctl.report["loss_curve"])
    log(f"dense trained the same way: {dense['trained_mean']:.3f} ({time.perf_counter() - t0:.0f}s)")
    result = {"meta": {"model": key, "ratio": args.ratio, "recovery_steps": args.steps, "lr": args.lr, "rank_grid": ranks,
                       "items_per_domain": args.items, "seed": args.seed, "recovery_items": len(records),
                       "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(), "versions": versions()},
              "dense": dense, "as_built": as_built, "rows": rows}
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    table = markdown(result, png, domains)
    print(table)
    if out.resolve() == for_model(DEFAULT_OUT, key).resolve():
        update_section(section("recovery", key), table)
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in result["rows"]:
        ax.plot([p["step"] for p in r["loss_curve"]], [p["loss"] for p in r["loss_curve"]], label=f"replace, anneal {r['anneal']}")
    curve = result["dense"]["trained_loss_curve"]
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], "k--", lw=0.8, label="dense control")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (with the setting's distillation term)")
    ax.set_yscale("log")
    ax.set_title(f"recovery at {result['meta']['ratio']:.0%} removed ({result['meta']['model']})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def markdown(result: dict, png: Path, domains: list[str]) -> str:
    meta, dense, built = result["meta"], result["dense"], result["as_built"]
    lines = [f"### Recovery ablation: replace at {meta['ratio']:.0%} removed on {meta['model']} ({meta['recovery_steps']} steps, "
             f"lr {meta['lr']}, rank {built.get('rank_chosen')}, seed {meta['seed']})", "",
             f"`python benchmarks/recovery.py{'' if meta['model'] == 'reference' else ' --model ' + meta['model']}"
             f"{'' if meta['recovery_steps'] == 1000 else ' --steps ' + str(meta['recovery_steps'])}` ({meta['seconds']:.0f} s). "
             f"Every setting starts from the same built model; {meta['items_per_domain']} eval items per domain; calib loss is the mean "
             "answer NLL per token on the calib split.", "",
             "| model | " + " | ".join(domains) + " | mean | calib loss |", "|---|" + "---|" * len(domains) + "---|---|",
             "| dense | " + " | ".join(f"{dense['accuracy'][d]:.3f}" for d in domains) + f" | {dense['mean']:.3f} | {dense['calib_loss']:.4f} |",
             "| dense, trained the same way (control) | " + " | ".join(f"{dense['trained_accuracy'][d]:.3f}" for d in domains)
             + f" | {dense['trained_mean']:.3f} | {dense['trained_calib_loss']:.4f} |",
             "| replace as built | " + " | ".join(f"{built['accuracy'][d]:.3f}" for d in domains) + f" | {built['mean']:.3f} | {built['calib_loss']:.4f} |"]
    for r in result["rows"]:
        lines.append(f"| replace, recovered (anneal {r['anneal']}) | " + " | ".join(f"{r['accuracy'][d]:.3f}" for d in domains)
                     + f" | {r['mean']:.3f} | {r['calib_loss']:.4f} |")
    lines += ["", f"![recovery ablation](results/{png.name})", "", "**What this run shows** (computed from the JSON):", ""]
    best = max(result["rows"], key=lambda r: r["mean"])
    none = next((r for r in result["rows"] if r["anneal"] == "none"), None)
    lines.append(f"- recovery moves replace from {built['mean']:.3f} to {best['mean']:.3f} at best (anneal {best['anneal']}); "
                 f"the dense model is {dense['mean']:.3f}.")
    if none is not None and best is not none:
        lines.append(f"- annealing against plain training: {best['mean'] - none['mean']:+.3f} mean accuracy (one seed: a gap under "
                     "about 0.02 is within noise at this many items).")
    lines.append(f"- the control moves the dense model by {dense['trained_mean'] - dense['mean']:+.3f}.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
