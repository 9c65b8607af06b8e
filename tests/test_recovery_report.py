"""recovery.py's summary over ratios and seeds: paired comparisons computed from the runs, not written in."""

from __future__ import annotations

import pytest
from helpers import benchmark_module

@pytest.fixture(scope="module")
def recovery():
    yield from benchmark_module("recovery")


def _result(seeds=(0, 1, 2)) -> dict:
    runs = []
    for s in seeds:
        for ratio, built in ((0.3, 0.90), (0.625, 0.60)):
            rows = [{"anneal": "blend,kd", "mean": built + 0.20 + 0.01 * s, "loss_curve": [{"step": 1, "loss": 1.0}]},
                    {"anneal": "none", "mean": built + 0.20 + 0.011 * s - 0.001 * (s == 1), "loss_curve": [{"step": 1, "loss": 1.1}]}]
            runs.append({"ratio": ratio, "seed": s, "rows": rows,
                         "as_built": {"mean": built + 0.002 * s, "rank_chosen": 16, "group_chosen": 8, "whiten_chosen": False}})
    controls = [{"seed": s, "mean": 0.96 + 0.001 * s, "loss_curve": [{"step": 1, "loss": 0.5}]} for s in seeds]
    meta = {"model": "reference", "ratios": [0.3, 0.625], "seeds": list(seeds), "recovery_steps": 1000, "lr": 5e-5,
            "anneals": ["blend,kd", "none"], "items_per_domain": 128, "seconds": 10.0, "torch_threads": 1}
    return {"meta": meta, "dense": {"mean": 0.961}, "controls": controls, "runs": runs}


def test_summary_pairs_each_ratio_over_seeds(recovery):
    result = _result()
    summary = {row["ratio"]: row for row in recovery.summarise(result)}
    low, high = summary[0.3], summary[0.625]
    assert low["vs_as_built"]["blend,kd"] == "a > b" and high["vs_as_built"]["none"] == "a > b"
    assert low["vs_none"] == {"blend,kd": "tie"}  # differences of 0, -0.001+..., not one sign beyond the interval
    assert high["vs_control"]["blend,kd"] == "a < b"  # 0.80-0.82 against 0.960-0.962
    assert low["vs_control"]["blend,kd"] == "a > b"  # 1.10-1.12 against the control
    m, h = low["settings"]["blend,kd"]
    assert m == pytest.approx(1.11) and h > 0


def test_markdown_names_the_chosen_configuration_and_the_command(recovery, tmp_path):
    result = _result()
    result["summary"] = recovery.summarise(result)
    text = recovery.markdown(result, tmp_path / "recovery.png", ["math"])
    assert "--ratios 0.3,0.625 --seeds 0,1,2" in text and "--anneals 'blend,kd;none'" in text
    assert "r16/g8/plain" in text
    assert text.count("\n| 30.0% |") == 1 and text.count("\n| 62.5% |") == 1
    one = _result(seeds=(0,))
    one["summary"] = recovery.summarise(one)
    assert "one seed" in recovery.markdown(one, tmp_path / "r.png", ["math"])
