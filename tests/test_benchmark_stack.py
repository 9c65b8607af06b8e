"""Benchmarks record their stack, and speed.py fails loudly when a target is missed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report
        import speed

        yield report, speed
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_json_records_versions_experts_implementation_and_machine(bench, tmp_path):
    report, _ = bench
    report.write_json(tmp_path / "r.json", {"rows": []}, experts_implementation="grouped_mm")
    stack = json.loads((tmp_path / "r.json").read_text())["stack"]
    assert {"torch", "transformers", "moetrim", "experts_implementation", "machine"} <= set(stack)
    assert stack["experts_implementation"] == "grouped_mm"
    assert stack["machine"]["cores"] >= 1 and stack["machine"]["cpu"]
    assert "gpu" in stack["machine"]


def test_every_benchmark_writes_through_write_json():
    """No benchmark writes its JSON another way (which would skip the stack)."""
    for script in BENCHMARKS.glob("*.py"):
        text = script.read_text()
        assert "json.dump(" not in text and ".write_text(json.dumps" not in text, script.name


def _checks(speed, b8_bound: float, v0: float) -> dict:
    rows = [
        {"model": "M", "variant": "dims-50%-global", "weight_bytes_ratio": 0.5, "weight_bytes_ratio_arithmetic": 0.5,
         "decode_vs_bound_v0": 0.95, "decode_b8_vs_bound_v0": b8_bound, "decode_vs_uniform_direct": 1.0,
         "decode_b8_vs_uniform_direct": 1.0, "decode_speedup": 1.5, "decode_b8_speedup": 1.2},
        {"model": "M", "variant": speed.REFERENCE, "prefill_speedup": 1.0, "decode_speedup": v0, "decode_b8_speedup": 1.0},
    ]
    return speed.targets(rows)


def test_speed_targets_missed_fail_with_a_list(bench, capsys):
    _, speed = bench
    assert speed.missed(_checks(speed, 0.95, 1.0)) == []
    assert speed.fail_on([], no_fail=False) == 0
    misses = speed.missed(_checks(speed, 0.8, 0.9))
    assert len(misses) == 1 and misses[0].startswith("M: ")
    assert "b8 global / bound 0.80" in misses[0] and "varwidth-0% slowest regime / dense 0.90" in misses[0]
    assert speed.fail_on(misses, no_fail=False) == 1
    err = capsys.readouterr().err
    assert "speed targets missed" in err and "b8 global / bound 0.80" in err
    assert speed.fail_on(misses, no_fail=True) == 0
