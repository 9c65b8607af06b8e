"""Models spread over devices: the user's --device-map / --max-memory in, accelerate's placement out.

Placement itself is accelerate's (through `from_pretrained(device_map=...)`, or `dispatch_model` for
moetrim's own formats). This module only checks what the user typed, and answers the questions the
rest of moetrim asks of a placed model: on which device does this module compute, and how are its
weights brought in when accelerate keeps them offloaded (on the meta device until its hook runs).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn

from moetrim.errors import UsageError

DeviceMap = Union[str, dict]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|disk|mps|(cuda|xpu|npu|mlu|hpu)(:\d+)?)$")


def _check_device(value, where: str):
    """A device a map entry may name: a GPU index, 'cpu', 'disk' or a device string; one line otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{where}: device {value!r} is not a GPU index, 'cpu', 'disk' or a device such as 'cuda:0'")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{where}: device {value} is negative")
        index = value
    else:
        if not _DEVICE.match(value):
            raise UsageError(f"{where}: unknown device '{value}'; use a GPU index, 'cpu', 'disk' or e.g. 'cuda:0'")
        if not value.startswith("cuda"):
            return value
        index = int(value.split(":")[1]) if ":" in value else 0
    if not torch.cuda.is_available():
        raise UsageError(f"{where}: device {value!r} is a GPU but no CUDA device is available")
    if index >= torch.cuda.device_count():
        raise UsageError(f"{where}: GPU {index} does not exist (this machine has {torch.cuda.device_count()})")
    return value


def parse_device_map(text: str | None) -> DeviceMap | None:
    """--device-map: auto, balanced, balanced_low_0, sequential, or a JSON file {module name: device}."""
    if text is None:
        return None
    if text in STRATEGIES:
        return text
    path = Path(text)
    if not path.is_file():
        raise UsageError(f"--device-map '{text}' is neither {', '.join(STRATEGIES)} nor a JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--device-map {path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) for k in raw):
        raise UsageError(f"--device-map {path} must hold a JSON object {{module name: device}}, e.g. {{\"model.layers.0\": 0}}")
    return {k: _check_device(v, f"--device-map {path} ('{k}')") for k, v in raw.items()}


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory '0=20GiB,1=20GiB,cpu=60GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '60GiB'}."""
    if text is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for part in text.split(","):
        key, sep, size = (s.strip() for s in part.partition("="))
        if not sep or not key or not size:
            raise UsageError(f"--max-memory takes DEVICE=SIZE pairs separated by commas (e.g. 0=20GiB,cpu=60GiB), got '{part}'")
        dev = int(key) if key.isdigit() else key
        _check_device(dev, "--max-memory")
        try:
            ok = convert_file_size_to_int(size) > 0
        except (ValueError, TypeError, OverflowError):  # 1e999GiB is an infinite float
            ok = False
        if not ok:
            raise UsageError(f"--max-memory: '{size}' is not a size (write e.g. 20GiB, 500MB or a number of bytes)")
        out[dev] = int(size) if size.isdigit() else size
    return out


def check_placement(device_map: DeviceMap | None, max_memory: dict | None, offload_folder, device: str | None) -> None:
    """Refuse combinations that cannot mean what the user wants, before anything loads."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError("--max-memory and --offload-folder go with --device-map (e.g. --device-map auto)")
        return
    if device not in (None, "cpu"):
        raise UsageError("give --device or --device-map, not both: --device-map places every part of the model itself")
    if isinstance(device_map, dict):
        if max_memory is not None:
            raise UsageError("--max-memory goes with --device-map auto or balanced; a map file already says where each part goes")
        if "disk" in device_map.values() and offload_folder is None:
            raise UsageError("--device-map puts parts on 'disk': give --offload-folder DIR for their weights")


def dispatch(model: nn.Module, device_map: DeviceMap, max_memory: dict | None, offload_folder) -> nn.Module:
    """Place an already-loaded model (moetrim's own formats load on CPU first) with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = max_memory
        if device_map != "sequential":
            memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise UsageError("--max-memory leaves parts of the model for 'disk': give --offload-folder DIR")
    model = dispatch_model(model, device_map=device_map, offload_dir=None if offload_folder is None else str(offload_folder))
    model.hf_device_map = dict(device_map)
    return model


def is_placed(model: nn.Module) -> bool:
    """Whether accelerate placed the model (its parts may then live on several devices, or offloaded)."""
    return bool(getattr(model, "hf_device_map", None)) and any(hasattr(m, "_hf_hook") for m in model.modules())


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device (its weights may sit on meta,
    offloaded), else the device of its first weight or buffer that is not on meta, else CPU."""
    for hook in _hooks(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(emb if emb is not None else model)


def offloaded(module: nn.Module) -> bool:
    return any(getattr(h, "offload", False) for h in _hooks(module))


def run_with_hook(module: nn.Module, fn, *args):
    """Call fn(*args) as `module`'s own forward would run under accelerate: its offloaded weights
    brought in first (and dropped after), the arguments moved to its execution device. Used where a
    stand-in computes from another module's weights (calibration's ProfilingExperts)."""
    hooks = _hooks(module)
    if not hooks:
        return fn(*args)
    top = getattr(module, "_hf_hook")
    args, _ = top.pre_forward(module, *args)
    return top.post_forward(module, fn(*args))


@contextlib.contextmanager
def onloaded(modules: list[nn.Module]) -> Iterator[None]:
    """Offloaded weights of `modules` brought in for the block (to read them: fingerprints, shapes)."""
    done = []
    try:
        for m in modules:
            for sub in m.modules():
                if offloaded(sub):
                    sub._hf_hook.pre_forward(sub)
                    done.append(sub)
        yield
    finally:
        for sub in done:
            sub._hf_hook.post_forward(sub, None)
