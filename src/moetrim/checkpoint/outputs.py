"""Where results are written: never over or inside an input, nor over someone else's files.

Every output (checkpoint folder, profile, plan, report) is first checked against the command's
inputs and the file system, before any expensive work:
- it must not be an input, lie inside an input folder, or contain an input (replacing a folder
  deletes what is in it), nor be the current folder or one above it;
- an existing output is replaced only with `overwrite`, and only when it is what moetrim would write
  there (a moetrim checkpoint or an empty folder, a moetrim profile, a JSON or PNG report moetrim
  wrote (moetrim.checkpoint.reports), a task file as `moetrim tasks` writes it): `--overwrite` never deletes
  someone else's files; a folder of fine-tuning checkpoints is continued, never replaced, and only
  when moetrim made it (moetrim.train.checkpoints);
- the folder it goes into must be writable, and hold roughly the bytes it will take.

Writing itself is atomic (moetrim.checkpoint.atomic): a hidden temporary renamed into place, never
a half-written output, whatever signal lands.

The outputs a command checked, and which of them are in place, are recorded (`finished_outputs`):
a signal that lands after the last rename finds the output complete, and the CLI says so.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Sequence

from moetrim.checkpoint.atomic import installed, real_path, remove_path, sweep_stale, temp_name
from moetrim.checkpoint.reports import is_report_json, is_report_png
from moetrim.errors import MoetrimError, UsageError

KINDS = ("checkpoint", "folder", "profile", "plan", "json", "image", "task file", "checkpoints")
CHECKPOINTS_MARKER = "moetrim_checkpoints.json"  # inside a folder of resumable fine-tuning checkpoints (moetrim.train.checkpoints)


# -- checks before work ---------------------------------------------------------------------
def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _is_moetrim_checkpoint(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return (folder / "results.json").is_file() and (folder / "compressed").is_dir()  # a demo folder
    return isinstance(cfg, dict) and "moetrim" in cfg


def _is_kind(path: Path, kind: str) -> bool:
    """Whether an existing file is what an output of `kind` holds (so replacing it loses nothing else)."""
    if kind == "image":
        return is_report_png(path)
    if kind == "json":
        return is_report_json(path)
    if kind == "task file":
        return _is_task_file(path)
    if kind == "profile":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return "moetrim_profile" in (f.metadata() or {})
        except Exception:  # any unreadable or foreign file
            return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "schema_version" in data and "layers" in data


def _is_task_file(path: Path) -> bool:
    """A .jsonl of prompt/response records, or a .txt whose every paragraph is a "Q: ...\nA: ..." item."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError):
            return False
        return all(isinstance(r, dict) and set(r) == {"prompt", "response"} for r in records)
    return all(p.strip().startswith("Q: ") and "\nA:" in p for p in text.split("\n\n") if p.strip())


def is_checkpoints_folder(folder: Path) -> bool:
    """Whether `folder` is one moetrim made for checkpoints (it holds CHECKPOINTS_MARKER as moetrim writes it)."""
    try:
        record = json.loads((Path(folder) / CHECKPOINTS_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "moetrim_checkpoints" in record


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(
    path: str | os.PathLike,
    *,
    kind: str,
    inputs: Sequence[str | os.PathLike | None] = (),
    overwrite: bool = False,
    need_bytes: int = 0,
    option: str = "--out",
    declare: bool = True,
) -> Path:
    """Refuse (UsageError, before any work) an output that would touch an input or someone else's
    files; remove what killed earlier runs left beside it. Returns the path as given. `declare`
    records it as one of the command's outputs (finished_outputs); a re-check inside a library call
    (save_checkpoint) does not."""
    assert kind in KINDS, kind
    target = real_path(path)
    shown = f"{option} {path}"
    refuse_inputs(path, inputs, option)
    if _inside(Path.cwd().resolve(), target):
        raise UsageError(f"{shown} is the current folder or one above it; choose a new folder")
    folder = kind in ("checkpoint", "folder", "checkpoints")
    if kind == "checkpoints":
        if (target.exists() or target.is_symlink()) and not (target.is_dir() and is_checkpoints_folder(target)):
            raise UsageError(f"{shown} exists and is not a checkpoints folder moetrim made (no {CHECKPOINTS_MARKER}); moetrim writes "
                             "checkpoints only into its own: move it away or choose another --out")
    elif target.exists() or target.is_symlink():
        if not overwrite:
            raise UsageError(f"{path} already exists; choose another {option} or pass --overwrite")
        if folder and not target.is_dir():
            raise UsageError(f"{shown} is a file; this output is a folder: choose a folder path")
        if not folder and not target.is_file():
            raise UsageError(f"{shown} is not a regular file; give a file path")
        if folder and any(target.iterdir()) and not _is_moetrim_checkpoint(target):
            raise UsageError(f"{path} is not a moetrim output; --overwrite replaces only what moetrim wrote: "
                             f"choose another {option} or remove it yourself")
        if not folder and not _is_kind(target, kind):
            label = {"json": "JSON report", "image": "PNG report"}.get(kind, kind)
            raise UsageError(f"{path} is not a moetrim {label}; --overwrite replaces only what moetrim wrote: "
                             f"choose another {option} or remove it yourself")
    base = _existing_ancestor(target.parent)
    if not base.is_dir():
        raise UsageError(f"cannot create {shown}: {base} is a file, not a folder")
    _probe_writable(base, shown)
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise MoetrimError(f"not enough free space for {shown}: about {need_bytes / 2**20:,.0f} MiB needed, "
                               f"{free / 2**20:,.0f} MiB free in {base}")
    if target.parent.is_dir():
        sweep_stale(target)
    if declare and kind != "checkpoints":
        _declared.add(target)
    return Path(path)


_declared: set[Path] = set()  # outputs the running command checked
_scratch: list[tuple[Path, list[Path]]] = []  # (scratch folder, the folders made for it) to remove at the end
SCRATCH = "moetrim-offload"


def begin_command() -> None:
    """Forget the outputs of an earlier command (the CLI calls this as each command starts)."""
    _declared.clear()
    installed.clear()


def scratch_dir(folder: str | os.PathLike) -> Path:
    """A hidden folder inside `folder` for files that live only as long as the command (weights that
    accelerate offloads to disk), removed by end_command with the folders made for it; one left by a
    killed process is removed by the next run given the same folder."""
    folder = Path(folder)
    made = []
    p = folder
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale(folder / SCRATCH)
    work = temp_name(folder / SCRATCH, "tmp")
    work.mkdir()
    _scratch.append((work, made))
    return work


def end_command() -> None:
    """Remove the running command's scratch folders, and the folders made for them once empty."""
    while _scratch:
        work, made = _scratch.pop()
        remove_path(work)
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break


def finished_outputs() -> tuple[list[Path], list[Path]]:
    """(complete, not written) among the outputs the running command checked."""
    done = [p for p in dict.fromkeys(installed) if p in _declared and p.exists()]
    return done, sorted(p for p in _declared if p not in done)


def overlap(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `path` meets `other` on disk: "is", "is inside", "contains", or None (apart)."""
    a, b = real_path(path), real_path(other)
    if a == b:
        return "is"
    return "is inside" if _inside(a, b) else "contains" if _inside(b, a) else None


def refuse_inputs(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None], option: str = "--out") -> None:
    """UsageError when `path` is an input, lies inside an input folder, or contains an input."""
    for given in inputs:
        how = None if given is None else overlap(path, given)
        if how == "contains":
            raise UsageError(f"{option} {path} contains the input {given}; writing there would replace it: choose a new path")
        if how:
            raise UsageError(f"{option} {path} {how} the input {given}; moetrim never writes to its inputs: choose a path outside it")


def _probe_writable(folder: Path, shown: str) -> None:
    """Create and remove a file: os.access says yes to root on a read-only file system."""
    probe = folder / f".moetrim-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UsageError(f"cannot write {shown}: {folder} is not writable ({reason})") from None


def bytes_of_weights(model_dir: str | os.PathLike) -> int:
    """Bytes of a checkpoint's weight files (an upper bound on what compressing it writes)."""
    from moetrim.assets import resolve_model_path

    folder = resolve_model_path(str(model_dir))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0
