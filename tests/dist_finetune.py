"""Run by tests/test_finetune_dist.py under `torchrun --nproc_per_node 2`: every fine-tuning method on
the tiny model with the settings it is given, the trained weights and report of each written by rank 0.

    torchrun --nproc_per_node 2 tests/dist_finetune.py OUT_DIR BATCH_SIZE NAME=METHOD[,key:value...] ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_cases import run_case  # noqa: E402


def main() -> None:
    out, batch_size, cases = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    from safetensors.torch import save_file

    for case in cases:
        name = case.split("=", 1)[0]
        res = run_case(case, batch_size)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(res.report))


if __name__ == "__main__":
    main()
