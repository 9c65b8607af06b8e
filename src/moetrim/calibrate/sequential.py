"""Layer-by-layer calibration for models larger than memory (as llm-compressor's sequential pipeline).

The model is built on the meta device. Embeddings and the other small pieces outside the decoder
layers are read from the checkpoint; one forward with every decoder layer replaced by a pass-through
records what each layer is called with (hidden states of the first, and the masks and rotary
embeddings of every layer). Then, one decoder layer at a time: read its weights from the safetensors
shards, run every calibration batch through it (recording the MoE statistics), keep its outputs as
the next layer's inputs, and put it back on meta. Peak memory is one decoder layer plus the
calibration activations, whatever the depth.

Forward-only: the statistics equal the whole-model forward pass. Fisher needs the loss of the whole
model, so it cannot be computed one layer at a time (use a device map with offload instead).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from moetrim.calibrate.instrument import LayerRecorder, instrumented
from moetrim.calibrate.profile import Profile
from moetrim.calibrate.run import default_seq_len, profile_meta, select_chunks
from moetrim.checkpoint.shards import ModuleLoader, module_name, named_decoder_layers, outside_layers
from moetrim.data.text import DataSource, batches
from moetrim.errors import MoetrimError, UsageError
from moetrim.model.view import find_moe_layers, require_uniform_widths
from moetrim.progress import progress_bar


class _Stop(Exception):
    """Raised by the pass-through of the last layer: nothing after the decoder layers is needed."""


class _PassThrough(nn.Module):
    """Stands in for a decoder layer during the capture forward: records its call, returns its input."""

    def __init__(self, layer: nn.Module, calls: list, last: bool):
        super().__init__()
        self.calls = calls
        self.last = last
        for attr in ("attention_type", "layer_idx", "layer_type"):  # some models read these off the layer
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", "model"), model)


def calibrate_sequential(
    path: str | os.PathLike,
    data: DataSource,
    *,
    tokenizer=None,
    dtype: str | torch.dtype | None = "auto",
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    whiten: bool = False,
    dense_outputs: bool = False,
    progress: bool = False,
    trust_remote_code: bool = False,
) -> Profile:
    """Forward-only calibration of the checkpoint at `path`, one decoder layer in memory at a time.

    Takes the same data options as `calibrate` and gives the same profile as
    `calibrate(model, data, fisher=False)` on the whole model."""
    from moetrim.checkpoint import load_model, resolve_model_path
    from moetrim.checkpoint.formats import _materialise_buffers, format_name

    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2 (a sequence needs two tokens to have a loss), got {max_tokens}")
    model = load_model(path, dtype=dtype, meta=True, trust_remote_code=trust_remote_code)
    if format_name(model) != "standard":
        raise UsageError(f"{path} is a {format_name(model)} checkpoint written by moetrim: calibrate the original model")
    layers = find_moe_layers(model)
    require_uniform_widths(layers, "calibrate")
    model_dtype = next(model.parameters()).dtype
    loader = ModuleLoader(model, resolve_model_path(path), model_dtype)
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    chunks = select_chunks(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
    batch_list = batches(chunks, batch_size)
    list_name, decoder = named_decoder_layers(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    for name in outside_layers(model, list_name):
        if name != head_name:
            loader.load(name)
    _materialise_buffers(model, model.config)
    model.eval()

    originals = list(decoder)
    calls: list[list[tuple[torch.Tensor, tuple, dict[str, Any]]]] = [[] for _ in originals]
    for i, layer in enumerate(originals):
        decoder[i] = _PassThrough(layer, calls[i], last=i == len(originals) - 1)
    try:
        with torch.no_grad():
            for batch in batch_list:
                try:
                    _base(model)(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, layer in enumerate(originals):
            decoder[i] = layer
    if any(len(c) != len(batch_list) for c in calls):
        raise MoetrimError(f"{type(model).__name__} does not call every decoder layer once per forward; "
                           "calibrate it whole (without --sequential)")
    hidden = [c[0] for c in calls[0]]

    by_index = {l.index: l for l in layers}
    recorders: dict[int, LayerRecorder] = {}
    cpu = torch.device("cpu")
    total = len(originals) * len(batch_list)
    with progress_bar("calibrating layer by layer", total=total, enabled=progress) as advance:
        for i in range(len(originals)):
            prefix = f"{list_name}.{i}"
            loader.load(prefix)
            moe = by_index.get(i)
            todo = []
            if moe is not None:
                recorders[i] = LayerRecorder(moe, cpu, False, "sequence", False, whiten, dense_outputs)
                todo = [moe]
            with torch.no_grad(), instrumented(todo, [recorders[i]] if todo else []):
                for b, (_, args, kwargs) in enumerate(calls[i]):
                    if moe is not None:
                        recorders[i].start_batch(hidden[b].shape[0], hidden[b].shape[1], cpu)
                    out = decoder[i](hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, (tuple, list)) else out
                    if moe is not None:
                        recorders[i].finish_batch()
                    advance(1)
            loader.release(prefix)
            if moe is not None:  # the router stays: the profile's fingerprint hashes every router
                loader.load(module_name(model, moe.router))
    stats: dict[str, torch.Tensor] = {}
    for i in sorted(recorders):
        stats.update({k: v.cpu() for k, v in recorders[i].tensors().items()})
    n_tokens = sum(b.numel() for b in batch_list)
    meta = profile_meta(model, layers, chunks, n_tokens, seq_len, fisher=False, fisher_mode="sequence",
                        grad_magnitude=False, whiten=whiten, dense_outputs=dense_outputs)
    meta["sequential"] = "true"
    return Profile(stats, meta).validate("calibration")
