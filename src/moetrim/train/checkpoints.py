"""Resumable checkpoints of a fine-tuning run, in a folder moetrim owns (`OUT.checkpoints`).

`finetune --checkpoint-every N` has the Trainer write `checkpoint-STEP` folders there, and
`--resume` continues from the latest. The folder is moetrim's only when moetrim created it, which
it does with a marker file inside (MARKER) from the first instant (made as a hidden temporary and
renamed): a folder someone else made, or an input that happens to carry that name, is never
written into and never removed. Once the run's output is saved, only what moetrim wrote there is
removed (the checkpoint folders and the marker), and the folder itself only when that empties it.

A checkpoint to resume from is read before training starts: its trainer_state.json, its
safetensors files and the Trainer's torch files (optimizer, scheduler, RNG states: zip archives,
loaded by the Trainer with weights_only) must be whole, or the run stops with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from moetrim.checkpoint.atomic import atomic_dir
from moetrim.checkpoint.outputs import CHECKPOINTS_MARKER as MARKER
from moetrim.checkpoint.outputs import is_checkpoints_folder
from moetrim.errors import MoetrimError, UsageError

TRAINER_STATE = "trainer_state.json"
STATE_FILE = "moetrim_state.safetensors"  # moetrim's own training state in each checkpoint (the engine writes it)
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_folder(out_dir: str | os.PathLike) -> Path:
    """Where `finetune --out OUT` keeps resumable checkpoints: OUT.checkpoints beside it."""
    out = Path(out_dir)
    return out.with_name(out.name + ".checkpoints")


def claim(folder: Path) -> None:
    """Create the folder with its marker in one rename (another process never sees it without the
    marker), or check that an existing one is moetrim's."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir() or not is_checkpoints_folder(folder):
            raise UsageError(f"{folder} exists and is not a checkpoints folder moetrim made (no {MARKER}); "
                             "moetrim writes checkpoints only into its own: move it away or choose another --out")
        return
    with atomic_dir(folder) as tmp:
        note = "resumable checkpoints of `moetrim finetune`; removed when the run has saved its output"
        (tmp / MARKER).write_text(json.dumps({"moetrim_checkpoints": 1, "note": note}, indent=2) + "\n")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint-STEP folder, by step."""
    if not Path(folder).is_dir():
        return []
    found = [(int(m[1]), p) for p in Path(folder).iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1][1] if found else None


def remove_checkpoints(folder: Path) -> None:
    """Remove what moetrim wrote into its checkpoints folder: the Trainer's checkpoint folders (and the
    temporaries it renames into them) and the marker; the folder itself only when that empties it."""
    folder = Path(folder)
    if not is_checkpoints_folder(folder):
        return
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink() and re.match(r"^(tmp-)?checkpoint-\d+$", p.name):
            shutil.rmtree(p, ignore_errors=True)
    (folder / MARKER).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is in there: not ours to remove


def _damaged(path: Path, reason: str) -> MoetrimError:
    return MoetrimError(f"--resume: {path} is truncated or damaged ({reason}); remove {path.parent} to resume from "
                        "the checkpoint before it, or run without --resume")


def resume_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was saved at, after checking that every file in it is whole."""
    from safetensors import safe_open
    from transformers import TrainerState


    checkpoint = Path(checkpoint)
    state_file = checkpoint / TRAINER_STATE
    for needed in (state_file, checkpoint / STATE_FILE):
        if not needed.is_file():
            raise UsageError(f"--resume: {checkpoint} is not a whole moetrim checkpoint (no {needed.name}); "
                             f"remove it to resume from the one before, or run without --resume")
    try:
        raw = json.loads(state_file.read_text(encoding="utf-8"))
        TrainerState(**raw)
    except (ValueError, TypeError, RecursionError) as exc:  # JSON errors are ValueErrors
        raise _damaged(state_file, (str(exc).splitlines() or [type(exc).__name__])[0]) from None
    step = raw.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _damaged(state_file, f"global_step {step!r} is not a step count")
    for f in sorted(checkpoint.iterdir()):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as exc:  # safetensors raises its own error types for a damaged file
                raise _damaged(f, (str(exc).splitlines() or [type(exc).__name__])[0]) from None
        elif f.suffix in (".pt", ".pth"):
            try:
                with zipfile.ZipFile(f):
                    pass
            except (zipfile.BadZipFile, OSError) as exc:
                raise _damaged(f, str(exc)) from None
    return step


def check_resume(folder: Path, steps: int, what: str = "") -> tuple[Path, int]:
    """The latest checkpoint in `folder` and its step; a run of fewer steps than it already did is refused
    (it would save the checkpoint's later state and call it fewer steps)."""
    found = latest(folder)
    if found is None:
        raise UsageError(f"--resume: {folder} holds no checkpoint to continue; run without --resume")
    step = resume_step(found)
    if steps and steps < step:
        raise UsageError(f"--resume: {found.name} is at step {step}, past {what or f'the {steps} steps of this run'}; give "
                         f"--max-steps {step} or more (the run's total), or run without --resume")
    return found, step
