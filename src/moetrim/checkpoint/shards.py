"""A checkpoint's weights read one module at a time: the way to work on models larger than memory.

A model is built on the meta device from its config (no memory), and `ModuleLoader` fills one
submodule (a decoder layer, a router) from the safetensors files, converting on-disk names and
layouts exactly as `transformers`' own loader does (per-expert tensors fused into `gate_up_proj`
etc., through the family's registered conversion mapping); `release` puts it back on meta. Only
the tensors of that module are read: safetensors maps the files and reads the slices asked for.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from moetrim.errors import MoetrimError

INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def open_weights(path: str | Path) -> Iterator:
    """`safe_open` of a weight file; a damaged one (truncated, or not safetensors at all) is one
    MoetrimError that names it, instead of safetensors' own error type."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MoetrimError(f"cannot load {path}: it is truncated or not a safetensors file ({reason}); "
                           "copy or save it again") from None
    with handle as sf:
        yield sf


class WeightFiles:
    """Which file holds which tensor, from the index (or the single file); tensors read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise MoetrimError(f"{index} is not a safetensors index (no weight_map)") from None
            self.where = {k: self.folder / v for k, v in weight_map.items()}
        elif (self.folder / "model.safetensors").is_file():
            with open_weights(self.folder / "model.safetensors") as sf:
                self.where = {k: self.folder / "model.safetensors" for k in sf.keys()}
        else:
            raise MoetrimError(f"{self.folder} has no model.safetensors nor {INDEX_FILE}")
        missing = sorted({p.name for p in self.where.values() if not p.is_file()})
        if missing:
            raise MoetrimError(f"{self.folder}: weight file {missing[0]} named by {INDEX_FILE} is missing"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the checkpoint is incomplete")

    def keys(self) -> list[str]:
        return list(self.where)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as owned copies. safetensors hands out tensors over its memory map, which
        keeps every page read resident (and counted in the process's memory) as long as any of them
        lives; one owned copy per tensor, with the map closed right after, holds each byte once."""
        out: dict[str, torch.Tensor] = {}
        for n in names:
            f = self.where[n]
            try:
                with safe_open(str(f), framework="pt") as sf:
                    t = sf.get_tensor(n)
                out[n] = t.clone()
                del t
            except Exception as exc:  # safetensors raises its own error types for a damaged file
                if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                    raise
                raise MoetrimError(f"cannot read {f}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
        return out


def _conversions(model: nn.Module) -> tuple[list, list]:
    """The family's renamings and converters, as transformers applies them when loading."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        mapping = get_model_conversion_mapping(model, add_legacy=True)
    except (ImportError, TypeError):  # a transformers without conversion mappings reads names as they are
        return [], []
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    return renamings, converters


class ModuleLoader:
    """Fill submodules of a meta-device model from its checkpoint, one at a time."""

    def __init__(self, model: nn.Module, folder: str | Path, dtype: torch.dtype):
        map_large_allocations()
        self.model = model
        self.files = WeightFiles(folder)
        self.dtype = dtype
        self.renamings, self.converters = _conversions(model)
        from transformers.core_model_loading import apply_converters, apply_renamings

        self._converters_by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        expected = set(model.state_dict().keys())
        self.target: dict[str, tuple[str, str | None]] = {}  # disk key -> (model key, converter pattern)
        for key in self.files.keys():
            renamed = apply_renamings(key, self.renamings)
            target, pattern = apply_converters(renamed, self.converters)
            if target not in expected and pattern is None:
                # transformers also adds or drops the base-model prefix ("model.") to match the model
                prefix = getattr(model, "base_model_prefix", "model")
                if f"{prefix}.{target}" in expected:
                    target = f"{prefix}.{target}"
                elif target.startswith(f"{prefix}.") and target[len(prefix) + 1:] in expected:
                    target = target[len(prefix) + 1:]
            self.target[key] = (target, pattern)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The model's tensors under `prefix` (model names), converted from the files."""
        from transformers.core_model_loading import dot_natural_key

        lead = prefix + "." if prefix else ""
        # natural order (expert 2 before expert 10), as transformers stacks per-expert tensors
        keys = sorted((k for k, (t, _) in self.target.items() if t.startswith(lead)), key=dot_natural_key)
        raw = self.files.read(keys)
        out: dict[str, torch.Tensor] = {}
        groups: dict[str, object] = {}
        for k in keys:
            target, pattern = self.target[k]
            if pattern is None:
                out[target] = raw.pop(k)
                continue
            conv = groups.get(target)
            if conv is None:
                conv = groups[target] = copy.deepcopy(self._converters_by_pattern[pattern])
            conv.add_tensor(target, k, pattern, raw.pop(k))
        for target, conv in groups.items():
            for name, t in conv.convert(target, model=self.model, config=self.model.config).items():
                out[name] = t[0] if isinstance(t, list) else t
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in out.items()}

    def load(self, prefix: str) -> nn.Module:
        """Materialise the submodule `prefix` (and everything in it) with its checkpoint tensors."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        lead = prefix + "." if prefix else ""
        state = {k[len(lead):]: v for k, v in self.state(prefix).items()}
        expected = module.state_dict()
        missing = [k for k in expected if k not in state and expected[k].is_meta]
        unexpected = [k for k in state if k not in expected]
        bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or bad:
            raise MoetrimError(f"{self.files.folder}: the weights of {prefix or 'the model'} do not match its config "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]}, mismatched {bad[:3]})")
        module.load_state_dict(state, strict=False, assign=True)
        return module

    def release(self, prefix: str) -> None:
        """Put the submodule's tensors back on the meta device (frees their memory)."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        module.to("meta")
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps the many few-MB blocks a layer is read in
    (per-expert tensors) in its heap after they are freed, so without this a process that loads
    layer after layer grows with depth although it holds one layer at a time."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def map_large_allocations() -> None:
    """Serve every allocation of 1 MiB or more with its own memory map, returned to the OS when freed.
    glibc otherwise raises that threshold to the largest block freed so far (a per-expert tensor),
    after which such blocks come from the heap and fragment it layer after layer."""
    libc = _glibc()
    if libc:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also turns off glibc's dynamic raising)


def _glibc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
            _LIBC = False
    return _LIBC


_LIBC = None


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The name `module` has inside `model` (what the loader takes as a prefix)."""
    return next(n for n, m in model.named_modules() if m is module)


def named_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers as moetrim.model.view finds them, and their module name."""
    from moetrim.model.view import decoder_layers

    layers = decoder_layers(model)
    return module_name(model, layers), layers


def outside_layers(model: nn.Module, layers_name: str) -> list[str]:
    """Names of the top-level pieces that are not decoder layers (embeddings, final norm, head)."""
    names = []
    for name, m in model.named_modules():
        if name == layers_name or name.startswith(layers_name + ".") or not name:
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            names.append(name)
    return names
