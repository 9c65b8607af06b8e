"""Checkpoint input and output: the floor every stage stands on. Reading checkpoints (never silently
re-initialising a weight), moetrim's own formats (variable-width, replaced and rerouted experts),
weights read one module at a time (shards, DiskModel) for models larger than memory, outputs written
atomically and never over an input, marked reports, and placement over devices. It imports only the
model runtime (moetrim.model) and the bundled names (moetrim.assets), never a stage above it.

load_save  load_model, load_tokenizer, save_checkpoint, make_recipe
formats    moetrim's own model types: how they are written and rebuilt
shards     a checkpoint's weights read one module at a time
disk       DiskModel: a checkpoint opened on the meta device, its routers read
atomic     writing whole or not at all: hidden temporaries renamed into place, signals held
outputs    where results may be written: checks before any work, the command's outputs
reports    the JSON and PNG reports moetrim marks as its own
placement  --device-map / --max-memory in, accelerate's placement out
"""

from moetrim.checkpoint.formats import MODEL_TYPES, VARWIDTH_MODEL_TYPE, format_name, is_replaced, is_rerouted, is_varwidth
from moetrim.checkpoint.load_save import (
    DTYPES,
    PROFILE_FILE,
    SIDE_DIR,
    load_model,
    load_tokenizer,
    make_recipe,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    save_checkpoint,
)

__all__ = [
    "DTYPES", "MODEL_TYPES", "PROFILE_FILE", "SIDE_DIR", "VARWIDTH_MODEL_TYPE", "format_name", "is_replaced", "is_rerouted",
    "is_varwidth", "load_model", "load_tokenizer", "make_recipe", "resolve_device", "resolve_dtype", "resolve_model_path",
    "save_checkpoint",
]
