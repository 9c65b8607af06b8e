#!/usr/bin/env python
"""Check moetrim's `aimer` criterion against the AIMER authors' own scoring code, on a bundled model.

Their scoring runs on the CPU with our transformers version (it reads weights only), so it can be run
side by side; it is not vendored (their code stays theirs), so give a clone of ZongfangLiu/AIMER:

    git clone https://github.com/ZongfangLiu/AIMER /tmp/AIMER
    python scripts/check_aimer_against_authors.py /tmp/AIMER [--model longtail] [--ratio 0.5]

Per MoE layer it prints the largest difference between their score and 1 - ours, and whether both keep
the same experts at the ratio (they prune the highest scores; we keep the highest 1 - score). Exit 1
when a layer disagrees.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clone", type=Path, help="a clone of github.com/ZongfangLiu/AIMER")
    ap.add_argument("--model", default="longtail", help="bundled model (reference or longtail)")
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args(argv)
    src = args.clone / "src"
    if not (src / "calib_free_prune.py").is_file():
        ap.error(f"{args.clone} has no src/calib_free_prune.py: give a clone of ZongfangLiu/AIMER")
    with tempfile.TemporaryDirectory() as tmp:  # their module imports its helpers as `reap.model_util`
        (Path(tmp) / "reap").mkdir()
        shutil.copy(src / "model_util.py", Path(tmp) / "reap" / "model_util.py")
        (Path(tmp) / "reap" / "__init__.py").write_text("")
        sys.path[:0] = [tmp, str(src)]
        import calib_free_prune as theirs

        import moetrim
        from moetrim import criteria
        from moetrim.model.view import find_moe_layers

        model, _ = moetrim.reference_model(args.model)
        model.float()
        bad = 0
        for layer in find_moe_layers(model):
            their_scores, their_order = theirs._aimer_scores_and_rank(layer.block, metric_device="cpu")
            ours = criteria.score("aimer", "expert", None, layer)
            n_prune = int(round(args.ratio * layer.num_experts))
            same = set(their_order.tolist()[n_prune:]) == set(torch.sort(ours, descending=True, stable=True).indices[: layer.num_experts - n_prune].tolist())
            diff = float(((1 - ours) - their_scores.double()).abs().max())
            print(f"layer {layer.index}: max |theirs - (1 - ours)| = {diff:.2e}; same experts kept at {args.ratio:.0%}: {same}")
            bad += not same or diff > 1e-5
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
