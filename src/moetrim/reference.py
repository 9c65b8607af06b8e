"""The bundled reference MoE: a small Qwen2-MoE trained on moetrim's task suite.

It is a plain ``transformers`` checkpoint (``scripts/train_reference.py`` produces it), so anything that
works on it works the same way on a downloaded Qwen-MoE; it exists because no pretrained MoE can be
downloaded where moetrim is developed and tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

REFERENCE_NAME = "reference"
REFERENCE_DIR: Path = Path(__file__).resolve().parent / "assets" / "reference"


def resolve_model_path(name_or_path: str) -> Path:
    """Map the name ``"reference"`` to the bundled checkpoint; anything else is taken as a path."""
    if str(name_or_path) == REFERENCE_NAME:
        return REFERENCE_DIR
    return Path(name_or_path)


def reference_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load the reference model (eval mode) and its tokenizer with the stock ``Auto*`` classes.

    Loading is strict: a checkpoint whose weights do not exactly fill the architecture raises
    ``RuntimeError`` rather than silently running with freshly initialised tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (REFERENCE_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"reference checkpoint not found in {REFERENCE_DIR}; run scripts/train_reference.py to create it"
        )
    model, info = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=dtype, output_loading_info=True)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise RuntimeError(f"reference checkpoint in {REFERENCE_DIR} does not match its architecture: {problems}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    return model, tokenizer
