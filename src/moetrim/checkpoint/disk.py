"""A checkpoint opened on disk, never loaded whole: the model on the meta device (shapes only) with
its routers read (a plan's fingerprint hashes them); anything else is read one module at a time
from the safetensors shards (moetrim.checkpoint.shards). Planning and applying from the files
(moetrim.apply.streaming) start here, for models larger than memory."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from moetrim.checkpoint.shards import ModuleLoader, module_name
from moetrim.errors import UsageError
from moetrim.model.view import MoELayer, find_moe_layers


class DiskModel:
    """A checkpoint's model on the meta device, its routers in memory, everything else on disk."""

    def __init__(self, path: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False):
        from moetrim.checkpoint.formats import format_name
        from moetrim.checkpoint.load_save import load_model, resolve_model_path

        self.path = resolve_model_path(path)
        self.model = load_model(self.path, dtype=dtype, meta=True, trust_remote_code=trust_remote_code)
        fmt = format_name(self.model)
        if fmt != "standard":
            raise UsageError(f"{path} is a {fmt} checkpoint written by moetrim; streaming works on the original model")
        self.dtype = next(self.model.parameters()).dtype
        self.loader = ModuleLoader(self.model, self.path, self.dtype)
        # no MoELayer views are kept: they would hold on to experts modules that applying replaces
        for layer in find_moe_layers(self.model):
            self.loader.load(module_name(self.model, layer.router))

    @contextlib.contextmanager
    def layer_weights(self, layer: MoELayer) -> Iterator[MoELayer]:
        """The layer's expert weights in memory for the duration (weight criteria read them)."""
        name = module_name(self.model, layer.experts)
        self.loader.load(name)
        try:
            yield layer
        finally:
            self.loader.release(name)
