"""Loading checkpoints (never silently re-initialising a weight) and saving them atomically.

Standard checkpoints are written by `save_pretrained` and load in plain `transformers`. Variable-
width checkpoints get `model_type: "moetrim_varwidth"` in config.json, so plain `transformers`
refuses them loudly instead of loading random experts; `moetrim.load` rebuilds them. Replaced-experts
(`moetrim_replaced`) and rerouted (`moetrim_routed`) checkpoints work the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moetrim.checkpoint.atomic import atomic_dir
from moetrim.checkpoint.outputs import check_output
from moetrim.errors import MoetrimError, UsageError
from moetrim.checkpoint.formats import (  # noqa: F401  (VARWIDTH_MODEL_TYPE, is_*: handed on by moetrim.checkpoint)
    MODEL_TYPES,
    SHARD_BYTES,
    VARWIDTH_MODEL_TYPE,
    _ensure_index,
    _load_moetrim,
    _save_moetrim,
    format_name,
    is_replaced,
    is_rerouted,
    is_varwidth,
)

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Everything in a checkpoint folder that is not model weights lives here: loaders that glob the top
# level for *.safetensors (vLLM does, when there is no index) must find model weights only.
SIDE_DIR = "moetrim"
PROFILE_FILE = f"{SIDE_DIR}/profile.safetensors"


def resolve_dtype(name: str | torch.dtype | None):
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{name}'; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> str:
    name = name or "cpu"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown --device '{name}'; choose cpu, cuda or auto")
    return name


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """'reference' names the bundled reference model; anything else is a directory."""
    from moetrim.assets import resolve_model_path as resolve

    return resolve(str(name_or_path))


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise UsageError(f"model directory not found: {path}")
    if not cfg.is_file():
        raise UsageError(f"{path} has no config.json: give a model directory as saved by save_pretrained")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{cfg} is not valid JSON: {exc.msg}") from None


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    meta: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> nn.Module:
    """Load an original or compressed checkpoint; fail loudly on any missing or mismatched weight.

    meta=True builds the model on the meta device from its config (shapes and dtypes, no weights
    read): enough to inspect a checkpoint of any size.
    device_map ('auto', 'balanced', 'sequential' or {module name: device}) spreads the model over
    devices with accelerate, within max_memory ({0: '20GiB', 'cpu': '60GiB'}); parts placed on 'disk'
    are offloaded to offload_folder. Standard checkpoints are placed while loading; moetrim's own
    formats are read into CPU memory first, then dispatched."""
    path = resolve_model_path(path)
    raw = _read_config(path)
    dtype = resolve_dtype(dtype)
    if device_map is not None and not meta:
        from moetrim.checkpoint.placement import check_placement

        check_placement(device_map, max_memory, offload_folder, device)
        return _load_placed(path, raw, dtype, trust_remote_code, device_map, max_memory, offload_folder)
    device = resolve_device(device)
    if raw.get("model_type") in MODEL_TYPES:
        model = _load_moetrim(path, raw, dtype, trust_remote_code, meta=meta)
        if meta:
            return model
    elif meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise MoetrimError(f"cannot read the config of {path}: {str(exc).splitlines()[0]}") from None
        if dtype in (None, "auto"):
            dtype = getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code).to(dtype)
        return model
    else:
        model = _from_pretrained(path, dtype, trust_remote_code)
    for p in model.parameters():  # memory-mapped tensors can be unaligned; owning copies are bit-exact
        p.data = p.data.clone()
    model = model.to(device)
    model.eval()
    return model


def _from_pretrained(path: Path, dtype, trust_remote_code: bool, **placement) -> nn.Module:
    """A standard checkpoint through from_pretrained (placed when `placement` holds a device_map),
    refusing any weight transformers would re-initialise."""
    from transformers import AutoModelForCausalLM

    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise UsageError(f"{path} holds pickle weights ({pickles[0]}); moetrim reads safetensors only and unpickles nothing "
                             "it is given: convert them with transformers' save_pretrained (safetensors is its default)")
        raise UsageError(f"{path} has no *.safetensors weights")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code, use_safetensors=True, **placement
        )
    except MemoryError:
        raise
    except Exception as exc:  # transformers and safetensors raise many kinds for a broken checkpoint
        if type(exc).__name__ == "OutOfMemoryError":
            raise
        first = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        if "ignore_mismatched_sizes" in first:
            first = "some weights have other shapes than config.json builds (was config.json edited?)"
        raise MoetrimError(f"cannot load {path}: {first}") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}" for k, v in problems.items())
        raise MoetrimError(f"{path} does not match its config ({detail}); refusing to use re-initialised weights")
    return model


def _load_placed(path: Path, raw: dict, dtype, trust_remote_code: bool, device_map, max_memory, offload_folder) -> nn.Module:
    """load_model with a device map: accelerate places every part (see moetrim.checkpoint.placement)."""
    from moetrim.checkpoint.placement import dispatch

    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    if raw.get("model_type") in MODEL_TYPES:
        model = _load_moetrim(path, raw, dtype, trust_remote_code)
        for p in model.parameters():  # owning copies, as load_model makes (dispatch may offload them)
            p.data = p.data.clone()
        model = dispatch(model, device_map, max_memory, offload_folder)
    else:
        extra = {"device_map": device_map, "max_memory": max_memory, "offload_folder": None if offload_folder is None else str(offload_folder)}
        model = _from_pretrained(path, dtype, trust_remote_code, **{k: v for k, v in extra.items() if v is not None})
    model.eval()
    return model


def load_tokenizer(path: str | os.PathLike, *, required: bool = True, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    # AutoTokenizer happily builds an empty tokenizer from config.json alone: look for real files.
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
    problem = None
    if not any((path / f).is_file() for f in files):
        problem = "no tokenizer files (tokenizer.json, vocab.json, tokenizer.model)"
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if len(tok) > 1:
                return tok
            problem = "an empty vocabulary"
        except Exception as exc:  # transformers raises many kinds for a broken tokenizer
            problem = f"a tokenizer that does not load ({type(exc).__name__})"
    if required:
        raise UsageError(f"{path} has {problem}; save the model's tokenizer beside it")
    return None


# -- variable-width format -------------------------------------------------------------------
def make_recipe(plan, profile, source: str | None, fmt: str) -> dict[str, Any]:
    """The record of how a checkpoint was made, stored in its config.json under 'moetrim'."""
    from moetrim import __version__

    return {
        "moetrim_version": __version__,
        "source": None if source is None else str(source),
        "format": fmt,
        "granularity": plan.granularity,
        "criterion": plan.criterion,
        "ratio": plan.ratio,
        "allocation": plan.allocation,
        "removed_fraction": round(plan.removed_fraction, 6),
        "profile": None if profile is None else {k: profile.meta.get(k) for k in ("tokens", "data_digest", "fisher_mode")},
    }


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    plan=None,
    profile=None,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    write_weights: Callable[[Path], None] | None = None,
) -> Path:
    """Write the compressed model into out_dir atomically: a temp folder beside it, then a rename.
    An interrupted save leaves no half-written checkpoint at out_dir. The folder the model was
    loaded from (and anything around it) is never written: `out_dir` may not be it, be inside it or
    contain it. write_weights(folder), when given, writes the weights and config.json instead of the
    model's own (the streaming apply writes them layer by layer)."""
    out = Path(out_dir)
    source = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    sources = [source] if source and Path(source).is_dir() else []
    check_output(out, kind="checkpoint", inputs=sources, overwrite=overwrite, option="out_dir", declare=False)
    if recipe is None and plan is not None:
        recipe = make_recipe(plan, profile, source=None, fmt=format_name(model))
    with atomic_dir(out) as tmp:
        if recipe is not None:
            model.config.moetrim = recipe
        if write_weights is not None:
            write_weights(tmp)
        elif is_varwidth(model) or is_rerouted(model) or is_replaced(model):
            _save_moetrim(model, tmp)
        else:  # sharded as moetrim's own formats are (transformers' default is one file up to 50 GB)
            model.save_pretrained(tmp, max_shard_size=SHARD_BYTES)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / "plan.json")
        if profile is not None:
            (tmp / SIDE_DIR).mkdir(exist_ok=True)
            profile.save(tmp / PROFILE_FILE)
        _ensure_index(tmp)
        for name, text in (extra_files or {}).items():  # reports that belong with the weights
            (tmp / name).write_text(text)
    return out
