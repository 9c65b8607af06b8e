"""Does each paper's finding hold on the bundled models? One table, read off the committed results.

Runs no model: it reads what quality.py, replace.py, recovery.py and finetune.py wrote under
benchmarks/results/ (quality.json, replace.json, recovery.json, finetune.json and their -longtail
twins) and answers, per model ("reference" and "longtail"):

- a: dimension trimming beats whole-expert pruning at equal parameters (50% removed, task-agnostic);
- b: a few critical dimensions (at most 16 removed, ranked by math-calibrated Fisher) carry a skill;
- c1/c2: MAN/MSAN are the best expert criteria task-agnostic; frequency/gate-based ones task-specific;
- d1/d2: replacing beats merging and expert pruning at 50%, and is about equal to LoRA at 30%
  (d2 from recovery.py's real budget and seeds where recovery.json has a 30% ratio, else replace.py);
- d3: LightMoE's annealed recovery (blend + distillation) beats plain recovery (recovery.py, 50%);
- e1/e2: condensers beat DenseMixer and ESFT on the new domain, and keep the long tail (retention);
- f1: CAMERA-P's micro-experts beat D²-MoE and REAP at equal parameters (50%, as built);
- f2: MoNE's novices beat pruning the same experts by the expert criteria (quality.py);
- f3: REAM beats REAP and HC-SMoE-style merging (30%, as built; the authors report 25%);
- f4: AIMER, with no data, is no worse than calibrated REAP ("at least": holds unless refuted);
- f5: Router KD (only the routers, distilled from the dense model) improves a REAP-pruned model.

Decision rule (`decide`): with per-seed values, "holds" when the paired 95% t-interval of the
difference excludes 0 in the finding's direction, "refuted" when it excludes 0 the other way, "tie"
otherwise; with a single seed, point estimates within 0.01 are a tie. A finding against several
methods holds only if it holds against each, and is refuted if it is refuted against any. A finding
whose data is absent gets no cell: it is listed under `missing` with the reason, and so is one whose
JSON records other bundled weights than the checkout's (a result from weights since replaced).

    python benchmarks/fidelity.py                       # reads benchmarks/results, writes fidelity.json + README section
    python benchmarks/fidelity.py --results DIR --out F # elsewhere (the README is left alone)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import bundled_weights, for_model, interval, paired_difference, section, update_section, write_json  # noqa: E402

MODELS = ("reference", "longtail")
SOURCES = ("quality", "replace", "recovery", "finetune")
TOL = 0.01  # single seed: point estimates closer than this are a tie
RATIO = 0.5  # findings a and c are read at 50% removed
FEW = 16  # "a few" critical dimensions: at most this many removed
AGNOSTIC_PICKS = ("man", "msan")
SPECIFIC_PICKS = ("frequency", "soft_frequency", "reap")  # frequency- and gate-based (as quality.py groups them)
DEFAULT_RESULTS = HERE / "results"
DEFAULT_OUT = DEFAULT_RESULTS / "fidelity.json"


def decide(mine: list[float], other: list[float], *, equal: bool = False, tol: float = TOL) -> str:
    """'holds', 'tie' or 'refuted' for "mine > other" (or "mine ≈ other" with equal): paired over seeds by
    the 95% t-interval (report.paired_difference); one seed compares point estimates with `tol`, because
    one draw has no interval and a tiny gap is no evidence."""
    if not mine or len(mine) != len(other):
        raise ValueError(f"decide needs paired values of one length, got {len(mine)} and {len(other)}")
    if len(mine) == 1:
        d = round(mine[0] - other[0], 12)
        side = "a > b" if d > tol else "a < b" if d < -tol else "tie"
    else:
        side = paired_difference(mine, other)
    if equal:
        return "holds" if side == "tie" else "refuted"
    return {"a > b": "holds", "a < b": "refuted", "tie": "tie"}[side]


def combine(verdicts: list[str]) -> str:
    """Beating several methods holds only against each of them; losing to any one refutes it."""
    if "refuted" in verdicts:
        return "refuted"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "tie"


@dataclass
class Comparison:
    """What a finding compares: the favoured method's value per seed against each rival's."""
    text: str
    values: dict[str, float]
    mine: dict[int, float]
    others: dict[str, dict[int, float]]
    equal: bool = False
    protocol: str = ""
    at_least: bool = False  # the finding is "no worse than": a tie supports it


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def judge(c: Comparison) -> tuple[str, list[float] | None, str]:
    """(verdict, 95% interval of the paired difference against the strongest rival or None for one seed,
    the seeds phrase for the protocol)."""
    verdicts, seeds = [], []
    for series in c.others.values():
        seeds = sorted(set(c.mine) & set(series))
        if not seeds:
            raise ValueError("no seed in common")
        verdict = decide([c.mine[s] for s in seeds], [series[s] for s in seeds], equal=c.equal)
        verdicts.append("holds" if c.at_least and verdict == "tie" else verdict)
    strongest = max(c.others.values(), key=lambda s: mean(s.values()))
    seeds = sorted(set(c.mine) & set(strongest))
    if len(seeds) < 2:
        return combine(verdicts), None, f"single seed {seeds[0]} (point estimates, tolerance {TOL})"
    m, half = interval([c.mine[s] - strongest[s] for s in seeds])
    return combine(verdicts), [round(m - half, 4), round(m + half, 4)], f"seeds {','.join(map(str, seeds))} (paired 95% t-interval)"


# ---- quality.json: findings a, b, c ----

def quality_protocol(d: dict) -> str:
    m = d.get("meta", {})
    return (f"{'quick' if m.get('quick') else 'full'}, {m.get('items_per_domain')} eval items/domain, "
            f"{m.get('calib_items_per_domain')} calib items/domain")


def experts_and_dims(d: dict, setting: str) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Per criterion, mean accuracy per seed at RATIO removed: (dims criteria, expert criteria)."""
    out: dict[str, dict[str, dict[int, float]]] = {"dims": {}, "experts": {}}
    for r in d.get("summary") or []:
        if r["setting"] == setting and abs(r["ratio"] - RATIO) < 1e-9 and r["granularity"] in out:
            out[r["granularity"]][r["criterion"]] = dict(zip(r["seeds"], r["mean_accuracy_per_seed"]))
    return out["dims"], out["experts"]


def best(series: dict[str, dict[int, float]]) -> str:
    return max(sorted(series), key=lambda k: mean(series[k].values()))


def finding_a(d: dict) -> Comparison | str:
    dims, experts = experts_and_dims(d, "task-agnostic")
    if not dims or not experts:
        return f"no task-agnostic dims and experts rows at {RATIO:.0%} in the grid summary"
    bd, be = best(dims), best(experts)
    md, me = mean(dims[bd].values()), mean(experts[be].values())
    return Comparison(f"{bd} dims {md:.3f} vs {be} experts {me:.3f} (best of each, {RATIO:.0%} removed)",
                      {f"dims:{bd}": round(md, 4), f"experts:{be}": round(me, 4)}, dims[bd],
                      {f"experts:{k}": v for k, v in experts.items()}, protocol=quality_protocol(d))


def finding_b(d: dict) -> Comparison | str:
    crit = d.get("critical_dims") or []
    ks = sorted({r["k"] for r in crit if r["ranking"] == "fisher" and r["k"] <= FEW}
                & {r["k"] for r in crit if r["ranking"] == "random"})
    if not ks:
        return "no critical-dimensions experiment (Fisher and random rankings) in this JSON"
    k = ks[-1]
    acc = {r["ranking"]: r["accuracy"] for r in crit if r["k"] == k}
    dense = d["dense"]["accuracy"]["math"]
    seed = (d.get("meta", {}).get("seeds") or [0])[0]
    drop_f, drop_r = dense - acc["fisher"]["math"], dense - acc["random"]["math"]
    text = (f"k={k} dims removed: math {acc['fisher']['math']:.3f} by Fisher rank vs {acc['random']['math']:.3f} at random "
            f"(dense {dense:.3f}; knowledge {acc['fisher']['knowledge']:.3f})")
    return Comparison(text, {"k": k, "math_fisher": acc["fisher"]["math"], "math_random": acc["random"]["math"],
                             "math_dense": dense, "knowledge_fisher": acc["fisher"]["knowledge"]},
                      {seed: drop_f}, {"random": {seed: drop_r}},
                      protocol=quality_protocol(d) + "; critical dims run on the first seed only")


def expert_picks(d: dict, setting: str, picks: tuple[str, ...]) -> Comparison | str:
    _, experts = experts_and_dims(d, setting)
    mine = {k: v for k, v in experts.items() if k in picks}
    rest = {k: v for k, v in experts.items() if k not in picks}
    if not mine or not rest:
        return f"no {setting} expert rows at {RATIO:.0%} for {'/'.join(picks)} and the others"
    bm, br = best(mine), best(rest)
    mm, mr = mean(mine[bm].values()), mean(rest[br].values())
    return Comparison(f"best pick {bm} {mm:.3f} vs best other {br} {mr:.3f} ({setting}, {RATIO:.0%})",
                      {bm: round(mm, 4), br: round(mr, 4)}, mine[bm], rest, protocol=quality_protocol(d))


# ---- replace.json: finding d ----

def replace_protocol(d: dict) -> str:
    m = d.get("meta", {})
    rank = f"rank grid {','.join(map(str, m['rank_grid']))}" if m.get("rank_grid") else f"rank {m.get('rank')}"
    return (f"{'quick' if m.get('quick') else 'full'}, {m.get('recover_steps')} recovery steps, lr {m.get('lr')}, {rank}, "
            f"{m.get('items_per_domain')} eval items/domain")


def replace_rows(d: dict, ratio: float) -> dict[str, dict]:
    return {r["method"]: r for r in d.get("rows", []) if abs(r["ratio"] - ratio) < 1e-9}


def finding_d1(d: dict) -> Comparison | str:
    rows = replace_rows(d, 0.5)
    need = [m for m in ("replace", "merge", "reap") if m not in rows]
    if need:
        return f"no 50% row for {', '.join(need)}"
    seed = d.get("meta", {}).get("seed", 0)
    val = {m: r["recovered_mean"] for m, r in rows.items()}
    rank = f" (rank {rows['replace']['rank_chosen']})" if "rank_chosen" in rows["replace"] else ""
    outside = ", ".join(f"{m} {val[m]:.3f}" for m in ("d2", "dims") if m in val)
    text = (f"replace{rank} {val['replace']:.3f} vs merge {val['merge']:.3f}, reap {val['reap']:.3f} after recovery"
            + (f" (not in the claim: {outside})" if outside else ""))
    return Comparison(text, {m: round(v, 4) for m, v in val.items()}, {seed: val["replace"]},
                      {m: {seed: val[m]} for m in ("merge", "reap")}, protocol=replace_protocol(d))


def finding_d2(d: dict) -> Comparison | str:
    if "controls" in d:  # recovery.json: per-seed runs at a real budget
        return recovery_d2(d)
    if "as_built" in d:
        return "an older single-ratio recovery.json (rerun recovery.py --ratios 0.3,0.5,0.625 --seeds 0,1,2)"
    rows = replace_rows(d, 0.3)
    if not rows:
        return "no 30% ratio in replace rows: evidence missing"
    val = {m: rows[m]["recovered_mean"] for m in rows if "lora" in m.lower()}
    dense = d.get("dense", {})
    if dense.get("trained_mean") is not None:  # replace.py's control: the dense model LoRA-tuned on the recovery data
        val["dense+LoRA"] = dense["trained_mean"]
    lora = sorted(val)
    if not lora or "replace" not in rows:
        return f"no LoRA row at 30% (methods there: {', '.join(rows)}): evidence missing"
    seed = d.get("meta", {}).get("seed", 0)
    val["replace"] = rows["replace"]["recovered_mean"]
    return Comparison(f"replace {val['replace']:.3f} vs " + ", ".join(f"{m} {val[m]:.3f}" for m in lora) + " (30%)",
                      {m: round(v, 4) for m, v in val.items()}, {seed: val["replace"]},
                      {m: {seed: val[m]} for m in lora}, equal=True, protocol=replace_protocol(d))


# ---- recovery.json: d2 at a real budget, d3 ----

PAPER_ANNEAL = "blend,kd"  # LightMoE's recipe: the original expert blended in and distillation, both fading


def recovery_protocol(d: dict) -> str:
    m = d["meta"]
    return (f"recovery.py, {m['recovery_steps']} recovery steps, lr {m['lr']}, rank grid {','.join(map(str, m['rank_grid']))}, "
            f"{m['items_per_domain']} eval items/domain")


def recovery_means(d: dict, ratio: float, anneal: str) -> dict[int, float]:
    """Per seed: recovered replace's mean accuracy at `ratio` under `anneal` (recovery.json's layout)."""
    if "runs" not in d:
        raise KeyError("runs (an older single-ratio recovery.json: rerun recovery.py --ratios 0.3,0.5,0.625 --seeds 0,1,2)")
    return {r["seed"]: next(row["mean"] for row in r["rows"] if row["anneal"] == anneal)
            for r in d["runs"] if abs(r["ratio"] - ratio) < 1e-9 and any(row["anneal"] == anneal for row in r["rows"])}


def recovery_d2(d: dict) -> Comparison | str:
    mine = recovery_means(d, 0.3, PAPER_ANNEAL)
    if not mine:
        return f"recovery.json has no 30% run with anneal {PAPER_ANNEAL} (rerun recovery.py --ratios 0.3,...)"
    lora = {c["seed"]: c["mean"] for c in d["controls"]}
    text = (f"replace {mean(mine.values()):.3f} vs dense+LoRA {mean(lora.values()):.3f} after the same training (30%, "
            f"mean of {len(mine)} seed{'s' if len(mine) > 1 else ''})")
    return Comparison(text, {"replace": round(mean(mine.values()), 4), "dense+LoRA": round(mean(lora.values()), 4)}, mine,
                      {"dense+LoRA": lora}, equal=True, protocol=recovery_protocol(d))


def finding_d3(d: dict) -> Comparison | str:
    ratio = 0.5
    mine, plain = recovery_means(d, ratio, PAPER_ANNEAL), recovery_means(d, ratio, "none")
    if not mine or not plain:
        return f"recovery.json lacks a 50% run with anneal {PAPER_ANNEAL} and with none"
    others = {a: recovery_means(d, ratio, a) for a in ("kd", "blend")}
    outside = ", ".join(f"{a} only {mean(v.values()):.3f}" for a, v in others.items() if v)
    text = (f"blend+KD {mean(mine.values()):.3f} vs plain {mean(plain.values()):.3f} (50%)"
            + (f" (ablations: {outside})" if outside else ""))
    return Comparison(text, {"blend+KD": round(mean(mine.values()), 4), "none": round(mean(plain.values()), 4)}, mine,
                      {"none": plain}, protocol=recovery_protocol(d))


# ---- finetune.json: finding e ----

RIVALS = ("densemixer", "esft")


def finetune_protocol(d: dict, methods: tuple[str, ...]) -> str:
    m = d.get("meta", {})
    grid = m.get("lr_grid") or [m.get("lr")]
    if len(grid) == 1:
        lr = f"lr {grid[0]}"
    else:
        chosen = {s["method"]: s.get("lr_chosen") for s in d.get("summary", [])}
        lr = f"lr grid {','.join(map(str, grid))}, chosen " + ", ".join(f"{x} {chosen.get(x)}" for x in methods)
    return (f"{'quick' if m.get('quick') else 'full'}, {m.get('steps')} steps of {m.get('batch_size')}, {lr}, "
            f"{m.get('items_per_domain')} eval items/domain")


def finetune_series(d: dict, method: str, key: str) -> dict[int, float]:
    """Per-seed values of `key` for a method: the summary's `key_per_seed` if present, else from the runs."""
    for s in d.get("summary", []):
        if s["method"] == method and s.get(key + "_per_seed") is not None:
            return dict(zip(s["seeds"], s[key + "_per_seed"]))
    new = d.get("meta", {}).get("new_domain", "units")
    out = {}
    for r in d.get("runs", []):
        v = r["accuracy"].get(new) if key == "new" else r.get(key)
        if r["method"] == method and v is not None:
            out[r["seed"]] = v
    return out


def finetune_finding(d: dict, key: str, label: str) -> Comparison | str:
    methods = ("condenser", *RIVALS)
    series = {m: finetune_series(d, m, key) for m in methods}
    if not all(series.values()):
        return f"no {label} for " + ", ".join(m for m in methods if not series[m])
    means = {m: mean(s.values()) for m, s in series.items()}
    text = f"condenser {means['condenser']:.3f} vs " + ", ".join(f"{m} {means[m]:.3f}" for m in RIVALS) + f" ({label})"
    return Comparison(text, {m: round(v, 4) for m, v in means.items()}, series["condenser"],
                      {m: series[m] for m in RIVALS}, protocol=finetune_protocol(d, methods))


def finding_e1(d: dict) -> Comparison | str:
    return finetune_finding(d, "new", f"{d.get('meta', {}).get('new_domain', 'units')} accuracy")


def finding_e2(d: dict) -> Comparison | str:
    """Rare-skill retention where the runs record it (the long tail itself), else retention on every original skill."""
    rare = all(finetune_series(d, m, "retention_rare") for m in ("condenser", *RIVALS))
    return finetune_finding(d, "retention_rare" if rare else "retention",
                            "rare-skill retention" if rare else "retention on the original skills")


# ---- the 2026 methods (issue 33): each paper's headline claim, read off the same JSON ----

def method_rows(d: dict, setting: str) -> dict[str, dict[int, float]]:
    """'granularity:criterion' -> mean accuracy per seed at RATIO removed, every row of the grid summary."""
    return {f"{r['granularity']}:{r['criterion']}": dict(zip(r["seeds"], r["mean_accuracy_per_seed"]))
            for r in d.get("summary") or [] if r["setting"] == setting and abs(r["ratio"] - RATIO) < 1e-9}


def quality_pair(d: dict, mine: str, rivals: list[str] | None, label: str, at_least: bool = False) -> Comparison | str:
    """`mine` against `rivals` (default: every expert criterion) in the task-agnostic grid at RATIO."""
    rows = method_rows(d, "task-agnostic")
    rivals = rivals or [k for k in rows if k.startswith("experts:") and k != mine]
    missing = [k for k in [mine, *rivals] if k not in rows]
    if missing or not rivals:
        return f"no task-agnostic {RATIO:.0%} row for {', '.join(missing) or 'any rival'} (rerun quality.py)"
    top = max(sorted(rivals), key=lambda k: mean(rows[k].values()))
    vm, vt = mean(rows[mine].values()), mean(rows[top].values())
    return Comparison(f"{mine} {vm:.3f} vs {'best of ' if len(rivals) > 1 else ''}{top} {vt:.3f} ({label}, {RATIO:.0%})",
                      {mine: round(vm, 4), top: round(vt, 4)}, rows[mine], {k: rows[k] for k in rivals},
                      protocol=quality_protocol(d), at_least=at_least)


def replace_pair(d: dict, ratio: float, mine: str, rivals: tuple[str, ...]) -> Comparison | str:
    """`mine` against `rivals` as built (training-free, as the authors report) at `ratio` in replace.json."""
    rows = replace_rows(d, ratio)
    need = [m for m in (mine, *rivals) if m not in rows]
    if need:
        return f"no {ratio:.0%} row for {', '.join(need)} (rerun replace.py)"
    seed = d.get("meta", {}).get("seed", 0)
    val = {m: rows[m]["mean"] for m in (mine, *rivals)}
    return Comparison(f"{mine} {val[mine]:.3f} vs " + ", ".join(f"{m} {val[m]:.3f}" for m in rivals) + f" as built ({ratio:.0%})",
                      {m: round(v, 4) for m, v in val.items()}, {seed: val[mine]}, {m: {seed: val[m]} for m in rivals},
                      protocol=replace_protocol(d) + "; compared as built")


def recovered_pair(d: dict, ratio: float, trained: str, built: str) -> Comparison | str:
    """`trained` after its recovery against `built` as built (the same compressed model before training)."""
    rows = replace_rows(d, ratio)
    need = [m for m in (trained, built) if m not in rows]
    if need:
        return f"no {ratio:.0%} row for {', '.join(need)} (rerun replace.py)"
    seed = d.get("meta", {}).get("seed", 0)
    after, before = rows[trained]["recovered_mean"], rows[built]["mean"]
    other = rows[built].get("recovered_mean")
    text = f"{trained} {after:.3f} after vs {before:.3f} as built ({ratio:.0%})" + (
        f"; {built} recovered with LoRA instead: {other:.3f}" if other is not None else "")
    return Comparison(text, {f"{trained} recovered": round(after, 4), f"{built} as built": round(before, 4)}, {seed: after},
                      {f"{built} as built": {seed: before}}, protocol=replace_protocol(d))


# A finding's source, or its sources in order of preference: the first whose JSON gives the evidence is read.
FINDINGS: list[tuple[str, str, str | tuple[str, ...], Callable[[dict], Comparison | str]]] = [
    ("a", "dimension trimming beats whole-expert pruning at equal parameters", "quality", finding_a),
    ("b", "a few critical dimensions carry a skill (math)", "quality", finding_b),
    ("c1", "MAN/MSAN are the best expert criteria task-agnostic", "quality",
     lambda d: expert_picks(d, "task-agnostic", AGNOSTIC_PICKS)),
    ("c2", "frequency/gate-based criteria are the best task-specific", "quality",
     lambda d: expert_picks(d, "task-specific", SPECIFIC_PICKS)),
    ("d1", "replacing beats merging and expert pruning at 50%", "replace", finding_d1),
    ("d2", "replacing is about equal to LoRA at 30%", ("recovery", "replace"), finding_d2),
    ("d3", "LightMoE's annealed recovery beats plain recovery", "recovery", finding_d3),
    ("e1", "condensers beat DenseMixer and ESFT in-domain", "finetune", finding_e1),
    ("e2", "condensers keep the long tail better than DenseMixer and ESFT", "finetune", finding_e2),
    ("f1", "CAMERA-P's micro-experts beat D²-MoE and expert pruning at equal parameters", "replace",
     lambda d: replace_pair(d, 0.5, "camera", ("d2", "reap"))),
    ("f2", "MoNE's novices beat expert pruning", "quality",
     lambda d: quality_pair(d, "novice:mone", None, "task-agnostic")),
    ("f3", "REAM beats REAP and HC-SMoE merging (authors: at 25%)", "replace",
     lambda d: replace_pair(d, 0.3, "ream", ("reap", "merge"))),
    ("f4", "AIMER, with no data, is no worse than calibrated REAP", "quality",
     lambda d: quality_pair(d, "experts:aimer", ["experts:reap"], "task-agnostic", at_least=True)),
    ("f5", "Router KD (routers alone, distilled) improves a pruned model", "replace",
     lambda d: recovered_pair(d, 0.5, "reap_router_kd", "reap")),
]


def build(results: Path) -> dict:
    """Every finding on every model: a cell where the JSON has the data, an entry in `missing` where not."""
    loaded: dict[tuple[str, str], dict | str] = {}
    current = bundled_weights()
    for src in SOURCES:
        for model in MODELS:
            path = for_model(results / f"{src}.json", model)
            loaded[src, model] = json.loads(path.read_text()) if path.exists() else f"{path.name} not found in {results}"
            data = loaded[src, model]
            measured = data.get("stack", {}).get("bundled_weights", {}).get(model) if isinstance(data, dict) else None
            if measured and current.get(model) and measured != current[model]:  # a result on weights since replaced
                loaded[src, model] = (f"{path.name} was measured on other {model} weights ({measured}, bundled now "
                                      f"{current[model]}): rerun {src}.py")
    cells, missing = [], []
    for fid, text, srcs, fn in FINDINGS:
        for model in MODELS:
            reasons, cell = [], None
            for src in (srcs,) if isinstance(srcs, str) else srcs:
                name = for_model(Path(f"{src}.json"), model).name
                data = loaded[src, model]
                try:
                    comp = fn(data) if isinstance(data, dict) else data
                except (KeyError, TypeError, ValueError, IndexError, StopIteration) as exc:  # another layout: say so, guess nothing
                    comp = f"{name} lacks what this finding needs ({type(exc).__name__}: {exc})"
                if isinstance(comp, str):
                    reasons.append(comp)
                    continue
                verdict, ci, seeds = judge(comp)
                cell = {"finding": f"{fid}: {text}", "model": model, "source": name, "figure": {"text": comp.text, "values": comp.values},
                        "interval": ci, "verdict": verdict, "protocol": f"{comp.protocol}; {seeds}"}
                break
            if cell is not None:
                cells.append(cell)
            else:
                missing.append({"finding": f"{fid}: {text}", "model": model, "source": name, "reason": "; ".join(reasons)})
    found = sorted(for_model(Path(f"{s}.json"), m).name for (s, m), v in loaded.items() if isinstance(v, dict))
    return {"meta": {"results": str(results), "found": found, "tolerance_single_seed": TOL,
                     "decision_rule": "holds: paired 95% t-interval over seeds excludes 0 in the finding's direction; refuted: "
                                      "excludes 0 the other way; tie: otherwise; one seed: point estimates within "
                                      f"{TOL} are a tie; against several rivals: holds only against each, refuted against any"},
            "cells": cells, "missing": missing}


def markdown(result: dict) -> str:
    """Rows = findings, columns = models; each cell 'figure — verdict'; then each source's protocol."""
    lines = ["### Do the papers' findings hold here? (read off the committed results)", "",
             "`python benchmarks/fidelity.py`: runs no model, reads quality, replace, recovery and finetune JSON. "
             f"Verdict: {result['meta']['decision_rule']}.", "",
             "| finding | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for fid, text, _, _ in FINDINGS:
        row = []
        for model in MODELS:
            cell = next((c for c in result["cells"] if c["finding"].startswith(f"{fid}:") and c["model"] == model), None)
            if cell is None:
                why = next(m["reason"] for m in result["missing"] if m["finding"].startswith(f"{fid}:") and m["model"] == model)
                row.append(f"missing: {why}")
            else:
                ci = f" [{cell['interval'][0]:+.3f}, {cell['interval'][1]:+.3f}]" if cell["interval"] else ""
                row.append(f"{cell['figure']['text']}{ci} — **{cell['verdict']}**")
        lines.append(f"| {fid}: {text} | " + " | ".join(r.replace("|", "/") for r in row) + " |")
    lines += ["", "Brackets: 95% interval of the paired difference (favoured minus strongest rival) over seeds. Protocols:", ""]
    seen: dict[tuple[str, str], list[str]] = {}
    for c in result["cells"]:
        seen.setdefault((c["source"], c["protocol"]), []).append(c["finding"].split(":")[0])
    lines += [f"- `{src}` ({', '.join(ids)}): {protocol}" for (src, protocol), ids in seen.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="folder of the benchmarks' JSON (default benchmarks/results)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the cells (default benchmarks/results/fidelity.json)")
    args = ap.parse_args(argv)
    result = build(args.results)
    if not result["meta"]["found"]:
        names = ", ".join(for_model(Path(f"{s}.json"), m).name for s in SOURCES for m in MODELS)
        print(f"error: {args.results} has none of {names}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    table = markdown(result)
    print(table)
    if args.out.resolve() == DEFAULT_OUT.resolve():
        update_section(section("fidelity", "reference"), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
