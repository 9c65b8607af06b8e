"""Does LightMoE's annealed recovery matter once recovery really trains? An ablation at a real budget.

Expert replacing (`benchmarks/replace.py`'s `replace`: REAP selection, clustered bases, SVD corrections;
the rank, largest group and whitening of the `--ranks` x `--groups` x `--whiten` grid with the lowest
calib-split loss) is built at each of `--ratios` of
routed parameters removed, then recovered from that same start for `--steps` optimizer steps (default
1000) under each annealing setting of `moetrim finetune --method recover`:

- blend,kd: the paper's recipe (the original expert blended in and distillation, both fading out);
- kd: distillation only; blend: blending only; none: plain training of what compression created.

The same training (data, steps, lr, seed, LoRA rank 8 on attention) runs on the uncompressed model as the
control, once per seed. It must stay within noise of the dense model, or the recovery data itself teaches
the model; it is also LightMoE's LoRA baseline ("replacing at 30% is about equal to LoRA"). Recovery data
is the model's own training distribution (the train split of every skill it was trained on). Each seed
draws its own calibration sample, recovery data and init; comparisons are paired over seeds (95%
t-interval). Each run records eval accuracy, calib-split answer loss (what a user would watch for a
plateau) and the training-loss curve.

    python benchmarks/recovery.py --ratios 0.3,0.5,0.625 --seeds 0,1,2     # the protocol (issue 31)
    python benchmarks/recovery.py --model longtail                         # one seed at 50%
    python benchmarks/recovery.py --steps 300 --items 64                   # a shorter look

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
from report import (bundled_model, for_model, interval, paired_difference, publish, save_figure,  # noqa: E402
                    sweep_values, versions)

import moetrim  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402
from moetrim.train import FinetuneConfig, finetune  # noqa: E402

ANNEALS = ("blend,kd", "kd", "blend", "none")
DEFAULT_OUT = HERE / "results" / "recovery.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference", help="bundled model: reference or longtail")
    ap.add_argument("--ratios", default="0.5", help="fractions of routed-expert parameters removed, comma-separated (the protocol: 0.3,0.5,0.625)")
    ap.add_argument("--seeds", default="0", help="seeds, comma-separated: each draws its own calibration sample, recovery data and init")
    ap.add_argument("--steps", type=int, default=1000, help="recovery steps per run (default 1000)")
    ap.add_argument("--lr", type=float, default=5e-5, help="recovery learning rate (replace.py's)")
    ap.add_argument("--ranks", default="4,8,16,32", help="rank grid, chosen by calib-split loss")
    ap.add_argument("--groups", default="4,8,16", help="largest-group grid, chosen with the rank")
    ap.add_argument("--whiten", default="on,off", help="whitened corrections or not (on, off or on,off), chosen with the rank")
    ap.add_argument("--anneals", default=";".join(ANNEALS), help="annealing settings to compare, separated by ';' (blend,kd is one)")
    ap.add_argument("--items", type=int, default=128, help="eval items per domain")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    seeds, ratios = sweep_values(ap, args)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    anneals = [a.strip() for a in args.anneals.split(";") if a.strip()]
    if not anneals or any(a not in ANNEALS for a in anneals):
        ap.error(f"--anneals takes settings separated by ';' from {'; '.join(ANNEALS)}, got {args.anneals!r}")
    ranks, grid = rp.parse_ranks(args.ranks), rp.parse_grid(args.groups, args.whiten)
    if ranks is None or grid is None:
        return 2
    rp.GROUPS, rp.WHITEN = grid
    key, domains, _ = bundled_model(args.model)
    rp.MODEL, rp.DOMAINS = key, domains
    out = args.out or for_model(DEFAULT_OUT, key)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def train_cfg(seed: int, **kw) -> FinetuneConfig:
        return FinetuneConfig(lr=args.lr, max_steps=args.steps, batch_size=16, seq_len=128, lora=8, seed=seed, progress=False,
                              logging_steps=max(1, args.steps // 20), **kw)

    def scored(model, tok) -> dict:
        acc = evaluate_tasks(model, tok, list(domains), n=args.items)["accuracy"]
        return {"accuracy": acc, "mean": rp.mean(acc), "calib_loss": rp.calib_loss(model, tok)}

    dense, controls, runs = None, [], []
    for seed in seeds:
        base, tok, profile, records = rp.prepare(seed)
        if dense is None:  # the dense model's eval does not depend on the seed
            dense = scored(base, tok)
        for ratio in ratios:
            built, removed, choice = rp.build_chosen("replace", ratio, base, profile, tok, ranks)
            as_built = {**scored(built, tok), "removed_fraction": round(removed, 4), **choice}
            log(f"seed {seed}, {ratio:.1%}: replace as built {as_built['mean']:.3f} ({_config(choice)}) "
                f"({time.perf_counter() - t0:.0f}s)")
            rows = []
            for anneal in anneals:
                model = copy.deepcopy(built)  # every setting starts from the very same built model
                teacher = None if anneal == "none" else moetrim.reference_model(key)[0]
                res = finetune(model, tok, records, train_cfg(seed, method="recover", anneal=anneal), teacher=teacher)
                rows.append({"anneal": anneal, **scored(res.model, tok), "loss_curve": res.report["loss_curve"],
                             "seconds": res.report["seconds"], "trainable_parameters": res.report["trainable_parameters"]})
                log(f"  recover {anneal:9s}: mean {rows[-1]['mean']:.3f}  calib loss {rows[-1]['calib_loss']:.4f}  "
                    f"({time.perf_counter() - t0:.0f}s)")
                del model, teacher, res
            runs.append({"ratio": ratio, "seed": seed, "as_built": as_built, "rows": rows})
            del built
        control, _ = moetrim.reference_model(key)
        ctl = finetune(control, tok, records, train_cfg(seed, method="full", aux_coef=0.0))
        controls.append({"seed": seed, **scored(ctl.model, tok), "loss_curve": ctl.report["loss_curve"],
                         "trainable_parameters": ctl.report["trainable_parameters"]})
        log(f"seed {seed}: dense LoRA-trained the same way (control) {controls[-1]['mean']:.3f} ({time.perf_counter() - t0:.0f}s)")
    result = {"meta": {"model": key, "ratios": ratios, "seeds": seeds, "recovery_steps": args.steps, "lr": args.lr,
                       "rank_grid": ranks, "group_grid": list(rp.GROUPS),
                       "whiten_grid": list(rp.WHITEN), "anneals": anneals, "items_per_domain": args.items, "recovery_items": len(records),
                       "control": "the dense model, LoRA rank 8 on attention, the same data, steps, lr and seed",
                       "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(), "versions": versions()},
              "dense": dense, "controls": controls, "runs": runs}
    result["summary"] = summarise(result)
    publish(result, out, DEFAULT_OUT, "recovery", key, plot, lambda r, png: markdown(r, png, domains))
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def series(result: dict, ratio: float, pick) -> list[float]:
    """One value per seed (in the run's seed order) of `pick(run)` for the runs at `ratio`."""
    return [pick(r) for s in result["meta"]["seeds"] for r in result["runs"] if r["ratio"] == ratio and r["seed"] == s]


def anneal_mean(anneal: str):
    return lambda run: next(row["mean"] for row in run["rows"] if row["anneal"] == anneal)


def summarise(result: dict) -> list[dict]:
    """Per ratio: every setting's mean accuracy over seeds (95% t-interval) and the paired comparisons the
    protocol asks about: recovery against as built, each annealing against none, and recovered replace against
    the dense model LoRA-trained the same way (LightMoE's "about equal to LoRA")."""
    ctl = [c["mean"] for c in result["controls"]]
    out = []
    for ratio in result["meta"]["ratios"]:
        built = series(result, ratio, lambda r: r["as_built"]["mean"])
        row = {"ratio": ratio, "as_built": interval(built), "settings": {}, "vs_as_built": {}, "vs_none": {}, "vs_control": {}}
        for a in result["meta"]["anneals"]:
            vals = series(result, ratio, anneal_mean(a))
            row["settings"][a] = interval(vals)
            row["vs_as_built"][a] = paired_difference(vals, built)
            row["vs_control"][a] = paired_difference(vals, ctl)
            if a != "none" and "none" in result["meta"]["anneals"]:
                row["vs_none"][a] = paired_difference(vals, series(result, ratio, anneal_mean("none")))
        out.append(row)
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, anneals = result["meta"]["ratios"], result["meta"]["anneals"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [100 * r for r in ratios]
    rows = {r["ratio"]: r for r in result["summary"]}
    for name, get in [("as built", lambda r: r["as_built"])] + [(f"recovered, anneal {a}", lambda r, a=a: r["settings"][a]) for a in anneals]:
        m = [get(rows[r])[0] for r in ratios]
        h = [get(rows[r])[1] for r in ratios]
        ax.errorbar(xs, m, yerr=h, marker="o", capsize=3, label=name)
    ctl = interval([c["mean"] for c in result["controls"]])
    ax.axhline(result["dense"]["mean"], color="k", lw=0.8, label="dense")
    ax.axhspan(ctl[0] - ctl[1], ctl[0] + ctl[1], color="gray", alpha=0.25, label="dense + LoRA, same training")
    ax.set_xlabel("routed parameters removed (%)")
    ax.set_ylabel(f"mean eval accuracy ({len(result['meta']['seeds'])} seeds, 95% t-interval)")
    ax.legend(fontsize=7)
    mid = min(ratios, key=lambda r: abs(r - 0.5))
    first = result["meta"]["seeds"][0]
    run = next(r for r in result["runs"] if r["ratio"] == mid and r["seed"] == first)
    for row in run["rows"]:
        bx.plot([p["step"] for p in row["loss_curve"]], [p["loss"] for p in row["loss_curve"]], label=f"anneal {row['anneal']}")
    curve = result["controls"][0]["loss_curve"]
    bx.plot([p["step"] for p in curve], [p["loss"] for p in curve], "k--", lw=0.8, label="dense control")
    bx.set_xlabel("step")
    bx.set_ylabel("training loss (with the setting's distillation term)")
    bx.set_yscale("log")
    bx.set_title(f"{mid:.0%} removed, seed {first}")
    bx.legend(fontsize=7)
    fig.suptitle(f"replace + recovery on {result['meta']['model']} ({result['meta']['recovery_steps']} steps)")
    return save_figure(fig, path)


def _cell(mean_half) -> str:
    m, h = mean_half
    return f"{m:.3f}" if h == 0 else f"{m:.3f} ± {h:.3f}"


def markdown(result: dict, png: Path, domains: list[str]) -> str:
    meta, dense = result["meta"], result["dense"]
    seeds, anneals = meta["seeds"], meta["anneals"]
    cmd = "python benchmarks/recovery.py" + ("" if meta["model"] == "reference" else f" --model {meta['model']}")
    cmd += f" --ratios {','.join(str(r) for r in meta['ratios'])} --seeds {','.join(str(s) for s in seeds)}"
    if meta["recovery_steps"] != 1000:
        cmd += f" --steps {meta['recovery_steps']}"
    if anneals != list(ANNEALS):
        cmd += f" --anneals '{';'.join(anneals)}'"
    ctl = interval([c["mean"] for c in result["controls"]])
    lines = [f"### Recovery of replaced experts at a real budget on {meta['model']} ({meta['recovery_steps']} steps, lr {meta['lr']}, "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''})", "",
             f"`{cmd}` ({meta['seconds']:.0f} s, {meta['torch_threads']} thread{'s' if meta['torch_threads'] > 1 else ''}). "
             "Replace (REAP selection, clustered bases, SVD corrections; rank, largest group and whitening chosen from the grid by "
             "the lowest calib loss) "
             "is built once per ratio and seed, then recovered from that same start under each annealing of `moetrim finetune "
             f"--method recover` (LoRA rank 8 on attention too). Mean eval accuracy over {len(domains)} skills, {meta['items_per_domain']} "
             "items each, mean ± 95% t-interval over seeds (each seed draws its own calibration sample, recovery data and init). "
             f"Dense: {dense['mean']:.3f}; the dense model LoRA-trained the same way (the control, and LightMoE's LoRA baseline): "
             f"{_cell(ctl)}.", "",
             "| removed | configuration chosen (per seed) | as built | " + " | ".join(f"anneal {a}" for a in anneals) + " |",
             "|---|---|---|" + "---|" * len(anneals)]
    for row in result["summary"]:
        chosen = sorted({_config(r["as_built"]) for r in result["runs"] if r["ratio"] == row["ratio"]})
        lines.append(f"| {row['ratio']:.1%} | {', '.join(chosen)} | {_cell(row['as_built'])} | "
                     + " | ".join(_cell(row["settings"][a]) for a in anneals) + " |")
    lines += ["", f"![recovery]({'results/' + png.name})", "", "**What this run shows** (paired over seeds, from the JSON; "
              "one seed compares point estimates and says so):", ""]
    for row in result["summary"]:
        pct = f"{row['ratio']:.1%}"
        best = max(anneals, key=lambda a: row["settings"][a][0])
        lines.append(f"- {pct}: recovery ({best}) {_cell(row['settings'][best])} against {_cell(row['as_built'])} as built "
                     f"({_verdict(row['vs_as_built'][best])}); against the LoRA-trained dense model: {_verdict(row['vs_control'][best])}.")
        if row["vs_none"]:
            lines.append(f"  Annealing against plain training: " + ", ".join(f"{a} {_verdict(v)}" for a, v in row["vs_none"].items()) + ".")
    lines.append(f"- the control moves the dense model by {ctl[0] - dense['mean']:+.3f}: "
                 + ("the recovery data has little left to teach it." if abs(ctl[0] - dense["mean"]) < 0.01 else "the data itself teaches it."))
    if len(seeds) == 1:
        lines.append("- one seed: 'higher'/'lower' compare point estimates; differences under about 0.02 are within noise at this many items.")
    lines.append("")
    return "\n".join(lines)


def _config(built: dict) -> str:
    """The configuration chosen on calib: rank, and group size and whitening where the grid had them."""
    text = f"r{built.get('rank_chosen')}"
    if "group_chosen" in built:
        text += f"/g{built['group_chosen']}/{'whitened' if built['whiten_chosen'] else 'plain'}"
    return text


def _verdict(side: str) -> str:
    return {"a > b": "higher", "a < b": "lower", "tie": "tie"}[side]


if __name__ == "__main__":
    sys.exit(main())
