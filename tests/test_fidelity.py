"""benchmarks/fidelity.py: the verdict rule, and the findings table built from results JSON (no model runs)."""

from __future__ import annotations

import json

import pytest
from helpers import BENCHMARKS, benchmark_module

VERDICTS = {"holds", "tie", "refuted"}


@pytest.fixture(scope="module")
def fid():
    yield from benchmark_module("fidelity")


def test_decide_paired_over_seeds(fid):
    assert fid.decide([0.90, 0.92, 0.91], [0.80, 0.81, 0.79]) == "holds"
    assert fid.decide([0.80, 0.81, 0.79], [0.90, 0.92, 0.91]) == "refuted"
    # a mean gap of 0.02 whose seeds disagree in sign: the interval holds 0
    assert fid.decide([0.90, 0.70, 0.95], [0.80, 0.85, 0.84]) == "tie"
    assert fid.decide([0.5, 0.5], [0.5, 0.5]) == "tie"
    # "about equal" findings hold on a tie and fail on any difference
    assert fid.decide([0.90, 0.70, 0.95], [0.80, 0.85, 0.84], equal=True) == "holds"
    assert fid.decide([0.90, 0.92, 0.91], [0.80, 0.81, 0.79], equal=True) == "refuted"


def test_decide_single_seed_uses_the_tolerance(fid):
    assert fid.decide([0.955], [0.950]) == "tie"
    assert fid.decide([0.945], [0.950]) == "tie"
    assert fid.decide([0.970], [0.950]) == "holds"
    assert fid.decide([0.930], [0.950]) == "refuted"
    assert fid.decide([0.930], [0.950], tol=0.05) == "tie"
    with pytest.raises(ValueError):
        fid.decide([0.9, 0.8], [0.9])


def test_combine_needs_every_rival_beaten(fid):
    assert fid.combine(["holds", "holds"]) == "holds"
    assert fid.combine(["holds", "tie"]) == "tie"
    assert fid.combine(["holds", "refuted"]) == "refuted"


def _summary(setting, gran, crit, per_seed, seeds=(0, 1, 2), ratio=0.5):
    return {"setting": setting, "granularity": gran, "criterion": crit, "ratio": ratio, "seeds": list(seeds),
            "mean_accuracy_per_seed": per_seed, "mean_accuracy": sum(per_seed) / len(per_seed)}


def _quality(critical=True) -> dict:
    s = [_summary("task-agnostic", "dims", "fisher", [0.90, 0.91, 0.92]),
         _summary("task-agnostic", "dims", "random", [0.60, 0.62, 0.61]),
         _summary("task-agnostic", "experts", "man", [0.50, 0.52, 0.49]),
         _summary("task-agnostic", "experts", "frequency", [0.70, 0.72, 0.71]),
         _summary("task-specific", "experts", "reap", [0.80, 0.79, 0.81]),
         _summary("task-specific", "experts", "msan", [0.60, 0.62, 0.61]),
         _summary("task-agnostic", "dims", "fisher", [0.99, 0.99, 0.99], ratio=0.25)]
    crit = [{"ranking": r, "k": k, "accuracy": {"math": m, "knowledge": 1.0}}
            for r, k, m in (("fisher", 8, 0.40), ("random", 8, 0.99), ("fisher", 64, 0.0), ("random", 64, 0.98))]
    return {"meta": {"quick": True, "items_per_domain": 200, "calib_items_per_domain": 64, "seeds": [0, 1, 2]},
            "dense": {"accuracy": {"math": 1.0, "knowledge": 1.0}}, "summary": s, "critical_dims": crit if critical else []}


def _cell(result, fid_id, model):
    found = [c for c in result["cells"] if c["finding"].startswith(f"{fid_id}:") and c["model"] == model]
    return found[0] if found else None


def test_quality_findings_from_synthetic_json(fid, tmp_path):
    (tmp_path / "quality.json").write_text(json.dumps(_quality()))
    (tmp_path / "quality-longtail.json").write_text(json.dumps(_quality(critical=False)))
    result = fid.build(tmp_path)
    a = _cell(result, "a", "reference")
    assert a["verdict"] == "holds" and a["figure"]["values"] == {"dims:fisher": 0.91, "experts:frequency": 0.71}
    lo, hi = a["interval"]
    assert 0.1 < lo < 0.2 < hi < 0.3  # fisher minus frequency per seed: 0.20, 0.19, 0.21
    assert "seeds 0,1,2" in a["protocol"] and a["source"] == "quality.json"
    assert _cell(result, "c1", "reference")["verdict"] == "refuted"  # man below frequency on every seed
    assert _cell(result, "c2", "reference")["verdict"] == "holds"
    b = _cell(result, "b", "reference")  # k = 8 (the largest k <= 16): Fisher-ranked removal costs math 0.60, random 0.01
    assert b["verdict"] == "holds" and b["figure"]["values"]["k"] == 8 and b["interval"] is None
    assert "single seed" in b["protocol"]
    assert _cell(result, "b", "longtail") is None
    reasons = {(m["finding"].split(":")[0], m["model"]): m["reason"] for m in result["missing"]}
    assert "critical" in reasons["b", "longtail"]
    assert "replace.json not found" in reasons["d1", "reference"] and "finetune-longtail.json" in reasons["e1", "longtail"]
    # every finding on every model lands exactly once, as a cell or as missing
    ids = [(c["finding"], c["model"]) for c in result["cells"]] + [(m["finding"], m["model"]) for m in result["missing"]]
    assert len(ids) == len(set(ids)) == len(fid.FINDINGS) * len(fid.MODELS)


def _run(method, seed, new, ret, rare=None):
    return {"method": method, "seed": seed, "accuracy": {"units": new}, "retention": ret, "retention_rare": rare}


def test_finetune_uses_rare_retention_when_present_and_replace_single_seed(fid, tmp_path):
    runs = []
    for seed in (0, 1, 2):
        runs += [_run("condenser", seed, 0.50 + 0.01 * seed, 0.80, 0.70 + 0.01 * seed),
                 _run("densemixer", seed, 0.30 + 0.02 * seed, 0.85, 0.40),
                 _run("esft", seed, 0.00, 0.95, 0.50 + 0.01 * seed)]
    meta = {"quick": True, "steps": 250, "batch_size": 16, "lr": 5e-4, "lr_grid": [5e-4], "items_per_domain": 128, "seeds": [0, 1, 2]}
    (tmp_path / "finetune-longtail.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": []}))
    rows = [{"method": m, "ratio": r, "recovered_mean": v} for m, r, v in
            (("replace", 0.5, 0.80), ("merge", 0.5, 0.50), ("reap", 0.5, 0.795), ("replace", 0.3, 0.90), ("lora", 0.3, 0.905))]
    (tmp_path / "replace.json").write_text(json.dumps({"meta": {"quick": True, "recover_steps": 100, "lr": 5e-5, "rank": 16,
                                                                 "items_per_domain": 128, "seed": 0}, "rows": rows}))
    result = fid.build(tmp_path)
    e1, e2 = _cell(result, "e1", "longtail"), _cell(result, "e2", "longtail")
    assert e1["verdict"] == "holds" and e1["interval"] is not None
    assert "rare-skill retention" in e2["figure"]["text"] and e2["verdict"] == "holds"  # retention alone would refute it
    assert "lr 0.0005" in e1["protocol"]
    d1 = _cell(result, "d1", "reference")  # beats merge, within 0.01 of reap on one seed
    assert d1["verdict"] == "tie" and d1["interval"] is None and "single seed 0" in d1["protocol"]
    assert _cell(result, "d2", "reference")["verdict"] == "holds"  # about equal to LoRA, as claimed
    assert _cell(result, "a", "reference") is None and _cell(result, "e1", "reference") is None


def test_main_exits_2_without_any_json(fid, tmp_path, capsys):
    assert fid.main(["--results", str(tmp_path), "--out", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quality.json" in err
    assert not (tmp_path / "f.json").exists()


def test_committed_results_give_complete_cells(fid, tmp_path, capsys):
    readme = BENCHMARKS / "README.md"
    before = readme.read_text()
    out = tmp_path / "fidelity.json"
    assert fid.main(["--out", str(out)]) == 0
    assert readme.read_text() == before  # only the default --out rewrites the README section
    result = json.loads(out.read_text())
    assert result["cells"]
    for cell in result["cells"]:
        assert {"finding", "model", "figure", "interval", "verdict", "protocol", "source"} <= set(cell)
        assert cell["verdict"] in VERDICTS and cell["model"] in fid.MODELS
        assert cell["figure"]["text"] and cell["figure"]["values"]
        assert cell["interval"] is None or cell["interval"][0] <= cell["interval"][1]
    for m in result["missing"]:
        assert m["reason"] and m["model"] in fid.MODELS
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(fid.FINDINGS) + 1  # header + one row per finding


def _recovery_json(seeds=(0, 1, 2)) -> dict:
    """recovery.py's layout: per (ratio, seed) a run with as-built and per-anneal means; a control per seed."""
    runs = []
    for seed in seeds:
        for ratio, built in ((0.3, 0.90), (0.5, 0.60)):
            rows = [{"anneal": "blend,kd", "mean": built + 0.05 + 0.002 * seed},
                    {"anneal": "none", "mean": built + 0.02 + 0.003 * seed}]
            runs.append({"ratio": ratio, "seed": seed, "as_built": {"mean": built}, "rows": rows})
    controls = [{"seed": s, "mean": 0.951 + 0.001 * s} for s in seeds]
    meta = {"recovery_steps": 1000, "lr": 5e-5, "rank_grid": [4, 8, 16], "items_per_domain": 128, "seeds": list(seeds)}
    return {"meta": meta, "dense": {"mean": 0.96}, "controls": controls, "runs": runs}


def test_recovery_json_decides_d2_and_d3_over_seeds(fid, tmp_path):
    (tmp_path / "recovery.json").write_text(json.dumps(_recovery_json()))
    rows = [{"method": "replace", "ratio": 0.3, "recovered_mean": 0.5}, {"method": "lora", "ratio": 0.3, "recovered_mean": 0.9}]
    (tmp_path / "replace.json").write_text(json.dumps({"meta": {"seed": 0}, "rows": rows}))
    result = fid.build(tmp_path)
    d2, d3 = _cell(result, "d2", "reference"), _cell(result, "d3", "reference")
    # recovery.json is preferred: 0.950-0.954 vs 0.951-0.953 over 3 seeds is a tie, so "about equal" holds
    # (replace.json alone, 0.5 vs 0.9, would refute it)
    assert d2["source"] == "recovery.json" and d2["verdict"] == "holds" and d2["interval"] is not None
    assert "1000 recovery steps" in d2["protocol"] and "seeds 0,1,2" in d2["protocol"]
    assert d3["verdict"] == "holds"  # blend+KD above none in every seed
    # an older single-ratio file is named as such; d2 then falls back to replace.json and d3 is missing
    (tmp_path / "recovery.json").write_text(json.dumps({"meta": {}, "as_built": {"mean": 0.6}, "rows": [{"anneal": "none", "mean": 0.9}]}))
    result = fid.build(tmp_path)
    assert _cell(result, "d2", "reference")["source"] == "replace.json"
    assert _cell(result, "d2", "reference")["verdict"] == "refuted"
    reason = next(m["reason"] for m in result["missing"] if m["finding"].startswith("d3:") and m["model"] == "reference")
    assert "older single-ratio recovery.json" in reason


def test_results_from_replaced_weights_are_missing_not_judged(fid, tmp_path):
    """A JSON whose stack records other bundled weights than the checkout's is listed as missing, never judged;
    one that records the current weights (or none, an older JSON) is read."""
    current = fid.bundled_weights()
    assert set(current) == set(fid.MODELS) and all(len(v) == 16 for v in current.values())
    stale = {**_quality(), "stack": {"bundled_weights": {"reference": "0" * 16}}}
    (tmp_path / "quality.json").write_text(json.dumps(stale))
    (tmp_path / "quality-longtail.json").write_text(json.dumps({**_quality(), "stack": {"bundled_weights": current}}))
    result = fid.build(tmp_path)
    assert _cell(result, "a", "reference") is None and _cell(result, "a", "longtail")["verdict"] == "holds"
    reasons = {(m["finding"].split(":")[0], m["model"]): m["reason"] for m in result["missing"]}
    assert "measured on other reference weights" in reasons["a", "reference"] and "rerun quality.py" in reasons["a", "reference"]
