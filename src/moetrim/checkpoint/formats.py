"""moetrim's own checkpoint formats: variable-width experts, replaced experts, rerouted routers.

Each gets a `model_type` plain `transformers` refuses (so it never loads random experts), a record in
config.json that says how to rebuild the modules, the same record in the weight files' metadata
(config.json is a file people edit), and strict loading onto a model built on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moetrim.checkpoint.atomic import save_safetensors
from moetrim.checkpoint.shards import INDEX_FILE, WeightFiles, open_weights
from moetrim.errors import MoetrimError
from moetrim.model.replaced import REPLACED_KEY, REPLACED_MODEL_TYPE
from moetrim.model.routing import ROUTED_MODEL_TYPE, ROUTING_KEY
from moetrim.model.varwidth import VARWIDTH_KEY

VARWIDTH_MODEL_TYPE = "moetrim_varwidth"
MODEL_TYPES = (VARWIDTH_MODEL_TYPE, ROUTED_MODEL_TYPE, REPLACED_MODEL_TYPE)
SHARD_BYTES = 5 * 1024**3


def is_varwidth(model: nn.Module) -> bool:
    return getattr(model.config, VARWIDTH_KEY, None) is not None


def format_name(model: nn.Module) -> str:
    """The format a model saves in (recorded in its recipe): varwidth, replaced, routed or standard."""
    if is_varwidth(model):
        return "varwidth"
    if is_replaced(model):
        return "replaced"
    return "routed" if is_rerouted(model) else "standard"


def is_rerouted(model: nn.Module) -> bool:
    """Whether the model routes with a fine-tuned bias or condensers (see moetrim.model.routing)."""
    return getattr(model.config, ROUTING_KEY, None) is not None


def is_replaced(model: nn.Module) -> bool:
    """Whether some experts are replaced by group bases and low-rank corrections (moetrim.model.replaced)."""
    return getattr(model.config, REPLACED_KEY, None) is not None


def _save_moetrim(model: nn.Module, out: Path) -> None:
    """config.json with a model_type plain transformers refuses, and the weights with their records."""
    _write_state(model, out, write_moetrim_config(model, out))


def write_moetrim_config(model: nn.Module, out: Path) -> dict[str, str]:
    """config.json (and generation_config.json) of a moetrim-format model; returns the metadata its
    weight files must carry."""
    out.mkdir(parents=True, exist_ok=True)
    d = model.config.to_dict()
    d["moetrim_base_model_type"] = d["model_type"]
    d["model_type"] = VARWIDTH_MODEL_TYPE if is_varwidth(model) else REPLACED_MODEL_TYPE if is_replaced(model) else ROUTED_MODEL_TYPE
    d["architectures"] = [type(model).__name__]
    dtype = next(model.parameters()).dtype
    d["dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out)
        except Exception:
            pass
    # The layer record goes into the weight files too: config.json is a file people edit, and a swap of
    # two widths there keeps every tensor's total size, so only this record can tell.
    meta = {"moetrim": d["model_type"].removeprefix("moetrim_")}
    for key in (VARWIDTH_KEY, REPLACED_KEY):
        if key in d:
            meta[key] = json.dumps(d[key], sort_keys=True)
    return meta


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, from its index (or the single file); a listed file that is
    missing is named (moetrim.checkpoint.shards.WeightFiles)."""
    return sorted(set(WeightFiles(path).where.values()))


def _check_record(path: Path, record, moe_layers: dict) -> None:
    """The layer record in config.json, as a person may have edited it: every field typed and in range."""
    where = f"{path}/config.json: {VARWIDTH_KEY}"
    if not isinstance(record, dict) or not isinstance(record.get("layers"), dict) or not record["layers"]:
        raise MoetrimError(f"{where} has no per-layer record; restore the config.json moetrim wrote")
    for key, spec in record["layers"].items():
        if not key.isdigit() or int(key) not in moe_layers:
            raise MoetrimError(f"{where} names layer {key!r}, which is not an MoE layer of this model ({sorted(moe_layers)})")
        if not isinstance(spec, dict) or not {"widths", "top_k", "num_experts"} <= set(spec):
            raise MoetrimError(f"{where} layer {key} needs widths, top_k and num_experts")
        widths, n, k = spec["widths"], spec["num_experts"], spec["top_k"]
        ok = isinstance(widths, list) and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
        if not ok or not isinstance(n, int) or len(widths) != n or not isinstance(k, int) or not 1 <= k <= n:
            raise MoetrimError(f"{where} layer {key}: widths must be {n} positive integers and 1 <= top_k <= num_experts")


def _weights_record(files: list[Path], key: str = VARWIDTH_KEY) -> dict | None:
    """The layer record `key` the weight files were written with (None for files from before it was stored)."""
    records = set()
    for f in files:
        with open_weights(f) as sf:
            records.add((sf.metadata() or {}).get(key))
    if len(records) != 1:
        raise MoetrimError(f"{files[0].parent}: its weight files were written for different layer layouts")
    text = records.pop()
    return None if text is None else json.loads(text)


def _load_moetrim(path: Path, raw: dict, dtype, trust_remote_code: bool, meta: bool = False) -> nn.Module:
    """A checkpoint in one of moetrim's own formats: variable-width or replaced experts, and/or rerouted routers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetrim.model.replaced import restore_replaced
    from moetrim.model.routing import after_load, restore_routing

    record = raw.get(VARWIDTH_KEY)
    routing = raw.get(ROUTING_KEY)
    replaced = raw.get(REPLACED_KEY)
    base_type = raw.get("moetrim_base_model_type")
    if raw["model_type"] == VARWIDTH_MODEL_TYPE and (not record or not base_type):
        raise MoetrimError(f"{path}/config.json says moetrim_varwidth but lacks its layer record")
    if raw["model_type"] == ROUTED_MODEL_TYPE and (not routing or not base_type):
        raise MoetrimError(f"{path}/config.json says {ROUTED_MODEL_TYPE} but lacks its routing record ({ROUTING_KEY})")
    if raw["model_type"] == REPLACED_MODEL_TYPE and (not replaced or not base_type):
        raise MoetrimError(f"{path}/config.json says {REPLACED_MODEL_TYPE} but lacks its layer record ({REPLACED_KEY})")
    d = dict(raw)
    d["model_type"] = base_type
    d.pop("moetrim_base_model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(base_type, str) or base_type not in CONFIG_MAPPING:
        raise MoetrimError(f"{path}/config.json: moetrim_base_model_type {base_type!r} is not a model type this transformers knows")
    try:
        config = AutoConfig.for_model(base_type).__class__.from_dict(d)
    except (ValueError, KeyError, TypeError) as exc:
        raise MoetrimError(f"{path}/config.json: cannot build a '{base_type}' config ({str(exc).splitlines()[0]})") from None
    if dtype == "auto" or dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if record:
        _load_varwidth_layers(path, model, record)
    if replaced:
        try:
            restore_replaced(model, replaced)
        except MoetrimError as exc:
            raise MoetrimError(f"{path}/config.json: {REPLACED_KEY}: {exc}") from None
    if routing:
        try:
            restore_routing(model, routing)
        except MoetrimError as exc:
            raise MoetrimError(f"{path}/config.json: {ROUTING_KEY}: {exc}") from None
    if meta:
        return model.to(dtype)
    files = _weight_files(path)
    if record:
        _check_written(path, record, _weights_record(files), "widths, expert count, top-k or layout")
    if replaced:
        _check_written(path, replaced, _weights_record(files, REPLACED_KEY), "kept experts, groups or rank")
    model = _fill_weights(path, model, files, dtype, config)
    if routing:
        after_load(model)
    return model


def _check_written(path: Path, record: dict, written: dict | None, fields: str) -> None:
    """The layer record of config.json against the one the weight files were written with: an edit that
    keeps every tensor's shape (two widths swapped, two experts moved between groups) shows only here."""
    if written is None or written == record:
        return
    keys = sorted(set(record["layers"]) | set(written.get("layers", {})), key=lambda k: (len(k), k))
    bad = next((f"layer {k}" for k in keys if record["layers"].get(k) != written.get("layers", {}).get(k)), "its layout")
    raise MoetrimError(f"{path}/config.json disagrees with its weight files at {bad} ({fields}); "
                       "it was edited after saving: restore the config.json moetrim wrote")


def _load_varwidth_layers(path: Path, model: nn.Module, record: dict) -> None:
    """Swap the experts of every recorded layer for variable-width ones of the recorded widths."""
    from moetrim.model.varwidth import LAYOUTS, VariableWidthExperts
    from moetrim.model.view import find_moe_layers, make_activation, resize_expert_tensors

    layers = {l.index: l for l in find_moe_layers(model)}
    _check_record(path, record, layers)
    layout = record.get("layout", "by_expert")  # version-1 records predate the width-sorted layout
    if layout not in LAYOUTS:
        raise MoetrimError(f"{path}/config.json: unknown variable-width layout {layout!r}; this moetrim reads {', '.join(LAYOUTS)}")
    for key, spec in record["layers"].items():
        layer = layers[int(key)]
        n = spec["num_experts"]
        with torch.device("meta"):
            new = VariableWidthExperts(
                spec["widths"], layer.hidden_size, make_activation(layer.experts), gated=layer.gated, has_bias=layer.has_bias,
                layout=layout,
            )
        name = next(c for c, m in layer.block.named_children() if m is layer.experts)
        setattr(layer.block, name, new)
        resize_expert_tensors(layer, None, n)
        router = layer.router
        router.top_k = spec["top_k"]


def _fill_weights(path: Path, model: nn.Module, files: list[Path], dtype, config) -> nn.Module:
    """Load every tensor of the files into a model built on meta; strict about names and shapes."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with open_weights(f) as sf:
            for k in sf.keys():
                state[k] = sf.get_tensor(k)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    tied = set(_tied_names(model))
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in state if k not in expected]
    bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise MoetrimError(f"{path}: weights do not match the recorded layout (missing {missing[:3]}, unexpected {unexpected[:3]}, mismatched {bad[:3]})")
    model.config._name_or_path = str(path)  # as from_pretrained sets it: what the model was loaded from
    model.name_or_path = str(path)
    # the router bias stays float32 whatever the weights' dtype (it shifts logits by small steps)
    state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("moetrim_bias") else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # Buffers that are not saved (rotary frequencies) are still on meta: recompute them on CPU.
    _materialise_buffers(model, config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise MoetrimError(f"{path}: no weights for {leftover[:3]}")
    return model


def _materialise_buffers(model: nn.Module, config) -> None:
    """Recreate non-persistent buffers (e.g. rotary inv_freq) by building their modules on CPU."""
    for name, module in model.named_modules():
        meta_bufs = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not meta_bufs:
            continue
        try:
            fresh = type(module)(config=config)
        except TypeError:
            try:
                fresh = type(module)(config)
            except Exception:
                continue
        for b in meta_bufs:
            setattr(module, b, getattr(fresh, b))


def _tied_names(model: nn.Module) -> list[str]:
    seen: dict[int, str] = {}
    dup = []
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:
            dup.append(name)
        else:
            seen[key] = name
    return dup


def _write_state(model: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """Safetensors shards plus an index, as transformers lays them out; tied duplicates once."""
    tied = set(_tied_names(model))
    writer = ShardWriter(out, SHARD_BYTES, {"format": "pt", **metadata})
    writer.add({k: v.detach() for k, v in model.state_dict().items() if k not in tied})
    writer.finish()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `shard_bytes` as they come (a streaming save
    holds one shard at a time), then names them as transformers does and writes the index."""

    def __init__(self, out: Path, shard_bytes: int, metadata: dict[str, str]):
        self.out, self.limit, self.metadata = Path(out), shard_bytes, metadata
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            nbytes = v.numel() * v.element_size()
            if self.buffer and self.size + nbytes > self.limit:
                self.flush()
            self.buffer[k] = v.detach().cpu().contiguous()
            self.size += nbytes
            self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        part = self.out / f".part-{len(self.parts):05d}.safetensors"
        save_safetensors(self.buffer, part, metadata=self.metadata)
        self.parts.append((part, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> list[Path]:
        """Rename the parts (model.safetensors, or model-0000i-of-0000n.safetensors) and write the index."""
        self.flush()
        if not self.parts:
            save_safetensors({}, self.out / "model.safetensors", metadata=self.metadata)
            self.parts.append((self.out / "model.safetensors", []))
        n = len(self.parts)
        weight_map, files = {}, []
        for i, (part, names) in enumerate(self.parts, 1):
            final = self.out / ("model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors")
            if part != final:
                part.rename(final)
            files.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return files


def _ensure_index(folder: Path) -> None:
    """Write model.safetensors.index.json for a single-file checkpoint too: with an index, every loader
    reads exactly the listed weight files and never globs the folder."""
    index, single = folder / INDEX_FILE, folder / "model.safetensors"
    if index.is_file() or not single.is_file():
        return
    with safe_open(str(single), framework="pt") as sf:
        names = list(sf.keys())
        total = 0
        for k in names:
            piece = sf.get_slice(k)
            total += _numel(piece.get_shape()) * _dtype_bytes(piece.get_dtype())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in sorted(names)}}, indent=2))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(dtype, 4)
