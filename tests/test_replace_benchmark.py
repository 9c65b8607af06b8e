"""replace.py's configuration grids: every method that stores factors or merges gets freedom, chosen on calib loss."""

from __future__ import annotations

import pytest
from helpers import benchmark_module

from moetrim.errors import UsageError


@pytest.fixture(scope="module")
def rp():
    yield from benchmark_module("replace")


def test_each_baseline_gets_a_grid(rp):
    grid = {m: rp.config_grid(m, [8, 16]) for m in rp.METHODS}
    assert len(grid["replace"]) == 2 * len(rp.GROUPS) * len(rp.WHITEN)
    assert grid["d2"] == [{"whiten": w, "base_weighting": b} for w in rp.WHITEN for b in rp.D2_WEIGHTINGS] and len(grid["d2"]) > 1
    assert {c["base_weighting"] for c in grid["merge"]} == {"usage", "uniform", "fisher"}
    assert grid["naive"] == [{"rank": 8}, {"rank": 16}]
    assert grid["reap"] == grid["ream"] == [{}]  # nothing to choose
    assert rp.config_name({"whiten": False, "base_weighting": "usage"}) == "plain, usage-weighted"


def test_build_chosen_keeps_the_lowest_calib_loss_and_says_what_it_tried(rp, monkeypatch):
    built = []

    def fake_build(method, ratio, base, profile, rank, **cfg):
        if cfg.get("base_weighting") == "fisher" and cfg.get("whiten") is False:
            raise UsageError("no room")
        built.append(cfg)
        return {"cfg": cfg}, 0.5

    losses = {(True, "fisher"): 2.0, (True, "usage"): 1.5, (False, "usage"): 1.7}
    monkeypatch.setattr(rp, "build", fake_build)
    monkeypatch.setattr(rp, "calib_loss", lambda model, tok: losses[model["cfg"]["whiten"], model["cfg"]["base_weighting"]])
    model, removed, choice = rp.build_chosen("d2", 0.5, None, None, None, [16])
    assert model["cfg"] == {"whiten": True, "base_weighting": "usage"} and removed == 0.5
    assert len(built) == 3  # every configuration the budget reaches was built and scored
    assert choice["whiten_chosen"] is True and choice["weighting_chosen"] == "usage" and "rank_chosen" not in choice
    assert choice["config_grid"]["plain, fisher-weighted"].startswith("unreachable") and len(choice["config_grid"]) == 4
    monkeypatch.setattr(rp, "build", lambda *a, **k: (_ for _ in ()).throw(UsageError("too far")))
    with pytest.raises(UsageError, match="no configuration of merge reaches 50%"):
        rp.build_chosen("merge", 0.5, None, None, None, [16])
