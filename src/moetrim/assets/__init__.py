"""The bundled reference MoEs: small models trained on moetrim's task suite, loadable by name.

* ``reference``: a Qwen2-MoE (16 routed experts, top-2, a shared expert, word-level tokenizer), the
  first one, trained on four domains;
* ``reference-longtail``: a Qwen3-MoE (32 fine-grained experts per layer, top-4, no shared expert,
  byte-level BPE tokenizer), trained on nine skills with a long tail of rare ones.

Each is a plain ``transformers`` checkpoint (``scripts/train_reference.py`` produces them), so anything
that works on one works the same way on a downloaded MoE; they exist because no pretrained MoE can be
downloaded where moetrim is developed and tested. A model's ``training.json`` records the skills it
was trained on (what ``--tasks all`` means for it) and its fine-tuning domain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moetrim.errors import MoetrimError, UsageError

ASSETS: Path = Path(__file__).resolve().parent  # this package: its folders are the bundled models
REFERENCE_NAME = "reference"
REFERENCE_DIR: Path = ASSETS / "reference"
# Bundled model name -> folder. On the command line the first is "reference", the others "reference-NAME".
BUNDLED: dict[str, Path] = {"reference": REFERENCE_DIR, "longtail": ASSETS / "longtail"}
_PREFIX = "reference-"


def bundled_names() -> list[str]:
    """How the command line names each bundled model: ``reference``, ``reference-longtail``."""
    return [name if name == REFERENCE_NAME else _PREFIX + name for name in BUNDLED]


def bundled_name(name_or_path: str) -> str | None:
    """The bundled model a model argument names (``"reference"``, ``"reference-longtail"`` or ``"longtail"``
    give ``"reference"`` / ``"longtail"``), or None for a path. An unknown ``reference-NAME`` that is not
    an existing folder is a `UsageError` listing the bundled names."""
    text = str(name_or_path)
    if text == REFERENCE_NAME:
        return REFERENCE_NAME
    if text.startswith(_PREFIX):
        name = text[len(_PREFIX):]
        if name in BUNDLED:
            return name
        if Path(text).exists():
            return None
        raise UsageError(f"no bundled model named {text!r}; bundled models: {', '.join(bundled_names())}")
    return None


def resolve_model_path(name_or_path: str) -> Path:
    """Map a bundled model's name to its folder (``"reference"``, ``"reference-longtail"``); anything
    else is taken as a path. A bundled model whose weights this build lacks is a one-line error."""
    name = bundled_name(name_or_path)
    if name is None:
        return Path(name_or_path)
    folder = BUNDLED[name]
    if not (folder / "model.safetensors").is_file() and name != REFERENCE_NAME:
        # The first model's folder is checked by its loaders (the demo falls back to a tiny model without it).
        raise MoetrimError(f"bundled model {name_or_path!r} has no trained weights in this build; "
                           f"create them with: python scripts/train_reference.py --model {name}")
    return folder


def training_record(path: str | Path) -> dict | None:
    """A model folder's ``training.json`` (written by ``scripts/train_reference.py``), or None."""
    record = Path(path) / "training.json"
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def trained_domains(path: str | Path) -> list[str] | None:
    """The task domains a model was trained on, as its ``training.json`` records them (None: not recorded).

    ``skills`` for models trained by today's script; the domains of ``hyperparameters.domain_weights``
    for the first model's record."""
    from moetrim.data.tasks import TASK_DOMAINS

    record = training_record(path)
    if not record:
        return None
    names = record.get("skills") or list(record.get("hyperparameters", {}).get("domain_weights", {}))
    names = [d for d in TASK_DOMAINS if d in names]  # the suite's order; unknown names are dropped
    return names or None


def finetune_domain(path: str | Path) -> str | None:
    """The domain a model's ``training.json`` names as its fine-tuning domain (never trained on)."""
    record = training_record(path) or {}
    return record.get("finetune_domain")


def reference_model(name: str | torch.dtype = REFERENCE_NAME, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load a bundled reference model (eval mode) and its tokenizer with the stock ``Auto*`` classes.

    ``name`` is ``"reference"`` (the default) or ``"longtail"`` (also ``"reference-longtail"``). Loading
    is strict: a checkpoint whose weights do not exactly fill the architecture raises ``RuntimeError``
    rather than silently running with freshly initialised tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name, torch.dtype):  # the old signature: reference_model(dtype, device)
        name, dtype, device = REFERENCE_NAME, name, dtype if isinstance(dtype, (str, torch.device)) else device
    key = name if name in BUNDLED else bundled_name(name)
    if key is None or key not in BUNDLED:
        raise ValueError(f"no bundled model named {name!r}; bundled models: {', '.join(BUNDLED)}")
    folder = BUNDLED[key]
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"bundled model {key!r} has no trained weights in {folder}; run scripts/train_reference.py --model {key} to create them"
        )
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RuntimeError(f"reference checkpoint in {folder} does not match its architecture: {problems}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
