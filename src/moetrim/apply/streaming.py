"""Apply a plan from the checkpoint on disk, never holding the whole model: for models larger
than memory.

The model comes as a `DiskModel` (moetrim.checkpoint.disk: the meta model with its routers read,
anything else read one module at a time from the safetensors shards). `apply_streaming` applies a
plan one decoder layer at a time: read the layer, slice it with the same code the in-memory
`apply_plan` runs, hand its tensors to a shard writer, put it back on meta. Peak memory is one decoder layer plus one output shard, whatever the depth,
and the tensors written equal the in-memory path's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moetrim.apply.slicing import ApplyResult, apply_layer, finish_apply, prepare_apply, varwidth_record
from moetrim.checkpoint.disk import DiskModel
from moetrim.checkpoint.shards import module_name, named_decoder_layers, outside_layers
from moetrim.model.varwidth import VARWIDTH_KEY
from moetrim.plan import Plan
from moetrim.progress import progress_bar

STREAM_SHARD_BYTES = 1024**3  # the output shard held in memory while it fills


def _tied(model: nn.Module) -> set[str]:
    """Names save_pretrained leaves out because they share their tensor (lm_head tied to embeddings)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if not getattr(cfg, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    return {f"{module_name(model, head)}.weight"} if head is not None else set()


def apply_streaming(
    disk: DiskModel,
    plan: Plan,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    profile=None,
    source: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = STREAM_SHARD_BYTES,
    progress: bool = False,
) -> ApplyResult:
    """Apply `plan` to the checkpoint `disk` was opened on and save the result to out_dir, one decoder
    layer in memory at a time. Same checks, same tensors and same config as apply_plan + save.
    The DiskModel's model is compressed on the way (as apply_plan compresses a model): open a new
    DiskModel to apply another plan."""
    from moetrim.checkpoint import make_recipe, save_checkpoint
    from moetrim.checkpoint.formats import SHARD_BYTES, ShardWriter, write_moetrim_config

    model = disk.model
    job = prepare_apply(model, plan)
    fmt = "standard" if job.config is not None else "varwidth"
    result: list[ApplyResult] = []
    list_name, decoder = named_decoder_layers(model)
    by_index = {l.index: l for l in job.layers}
    tied = _tied(model)
    pieces = outside_layers(model, list_name)

    def to_disk_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if fmt != "standard":
            return state
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(model, state)

    def write(folder: Path) -> None:
        meta = {"format": "pt"}
        if fmt == "varwidth":  # the record goes into every shard: it is known before any layer is sliced
            setattr(model.config, VARWIDTH_KEY, varwidth_record(plan))
            meta.update(write_moetrim_config(model, folder))
        writer = ShardWriter(folder, min(shard_bytes, SHARD_BYTES), meta)
        with progress_bar("applying layer by layer", total=len(decoder) + len(pieces), enabled=progress) as advance:
            for name in pieces:
                state = {k: v for k, v in disk.loader.state(name).items() if k not in tied}
                if state:
                    writer.add(to_disk_names(state))
                advance(1)
            for i in range(len(decoder)):
                prefix = f"{list_name}.{i}"
                module = disk.loader.load(prefix)
                if i in by_index:
                    apply_layer(job, by_index[i])
                writer.add(to_disk_names({f"{prefix}.{k}": v for k, v in module.state_dict().items()}))
                disk.loader.release(prefix)
                advance(1)
        writer.finish()
        result.append(finish_apply(model, job))
        if fmt == "standard":
            model.config.moetrim = recipe  # finish_apply put the new config in place of the one save_checkpoint marked
            model.config.dtype = str(disk.dtype).split(".")[1]
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(folder)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(folder)

    recipe = make_recipe(plan, profile, source, fmt)
    save_checkpoint(model, out_dir, tokenizer=tokenizer, plan=plan, profile=profile, recipe=recipe, overwrite=overwrite,
                    write_weights=write)
    return result[0]
