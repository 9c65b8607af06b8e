"""Where results are written: never over or inside an input, atomically, and without leftovers.

Every output (checkpoint folder, profile, plan, report) is first checked against the command's
inputs and the file system, before any expensive work:
- it must not be an input, lie inside an input folder, or contain an input (replacing a folder
  deletes what is in it), nor be the current folder or one above it;
- an existing output is replaced only with `overwrite`, and only when it is what moetrim would write
  there (a moetrim checkpoint or an empty folder, a moetrim profile, a JSON or PNG report moetrim
  wrote (moetrim.reports), a task file as `moetrim tasks` writes it): `--overwrite` never deletes
  someone else's files; a folder of fine-tuning checkpoints is continued, never replaced, and only
  when moetrim made it (moetrim.train.checkpoints);
- the folder it goes into must be writable, and hold roughly the bytes it will take.

Writing goes to a hidden temporary beside the output, `.NAME.tmp-PID-XXXX`, renamed into place at
the end. SIGINT and SIGTERM unwind through `finally` blocks that remove it; a temporary left by a
killed process (SIGKILL, power loss) is found by the next run that writes the same output, from
its PID, and removed. A replaced output moves to `.NAME.old-PID-XXXX` for the instant of the swap
(signals held until it is done); if that process died in between, the next run puts the old output
back.

The outputs a command checked, and which of them are in place, are recorded (`finished_outputs`):
a signal that lands after the last rename finds the output complete, and the CLI says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Iterator, Sequence

from moetrim.errors import MoetrimError, UsageError

KINDS = ("checkpoint", "folder", "profile", "plan", "json", "image", "task file", "checkpoints")
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP so that `finally` blocks clean up as on Ctrl-C."""


_swapping = False  # inside _signals_held: a signal waits in _held until the swap is done
_held: list[int] = []


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signal.Signals(signum).name)


def raise_on_termination() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C (the CLI calls this once at start-up); any of them, and
    Ctrl-C, that lands while an output is being renamed into place is raised once that is done."""

    def handler(signum, frame):
        if _swapping:
            _held.append(signum)
            return
        raise _interrupt(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or not on this OS
            signal.signal(sig, handler)


# -- checks before work ---------------------------------------------------------------------
def _abs(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


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
    from moetrim import reports

    if kind == "image":
        return reports.is_report_png(path)
    if kind == "json":
        return reports.is_report_json(path)
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
    target = _abs(path)
    shown = f"{option} {path}"
    refuse_inputs(path, inputs, option)
    if _inside(Path.cwd().resolve(), target):
        raise UsageError(f"{shown} is the current folder or one above it; choose a new folder")
    folder = kind in ("checkpoint", "folder", "checkpoints")
    if kind == "checkpoints":
        from moetrim.train.checkpoints import MARKER, is_checkpoints_folder

        if (target.exists() or target.is_symlink()) and not (target.is_dir() and is_checkpoints_folder(target)):
            raise UsageError(f"{shown} exists and is not a checkpoints folder moetrim made (no {MARKER}); moetrim writes "
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
_installed: list[Path] = []  # outputs renamed into place since
_scratch: list[tuple[Path, list[Path]]] = []  # (scratch folder, the folders made for it) to remove at the end
SCRATCH = "moetrim-offload"


def begin_command() -> None:
    """Forget the outputs of an earlier command (the CLI calls this as each command starts)."""
    _declared.clear()
    _installed.clear()


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
    work = _temp_name(folder / SCRATCH, "tmp")
    work.mkdir()
    _scratch.append((work, made))
    return work


def end_command() -> None:
    """Remove the running command's scratch folders, and the folders made for them once empty."""
    while _scratch:
        work, made = _scratch.pop()
        _remove(work)
        for d in made:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break


def finished_outputs() -> tuple[list[Path], list[Path]]:
    """(complete, not written) among the outputs the running command checked."""
    done = [p for p in dict.fromkeys(_installed) if p in _declared and p.exists()]
    return done, sorted(p for p in _declared if p not in done)


def overlap(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `path` meets `other` on disk: "is", "is inside", "contains", or None (apart)."""
    a, b = _abs(path), _abs(other)
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
    from moetrim.reference import resolve_model_path

    folder = resolve_model_path(str(model_dir))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


# -- atomic writing -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep_stale(target: Path) -> list[Path]:
    """Remove temporaries of `target` whose process is gone; put back an output whose swap was cut."""
    target = Path(target)
    found = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return found
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        if m["what"] == "old" and not target.exists():
            os.replace(entry, target)  # the process died between moving the old output away and the new in
        else:
            _remove(entry)
        found.append(entry)
    return found


def _temp_name(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """No signal lands inside the block: blocked for this thread, and one another thread takes (its Python
    handler still runs here) is held by the handler and raised at the end."""
    global _swapping
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        old = None
    _swapping = True
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _swapping = False  # a signal unblocked just now was held by the handler, or is raised by it from here on
        if _held:
            signum = _held[0]
            _held.clear()
            raise _interrupt(signum)


def _install(tmp: Path, target: Path) -> None:
    """Move tmp to target, replacing what is there; no signal lands between the two renames."""
    with _signals_held():
        if target.is_dir() and not target.is_symlink():
            old = _temp_name(target, "old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            _installed.append(_abs(target))  # before the signals come back: a SIGTERM now finds it complete
            _remove(old)
        else:
            os.replace(tmp, target)
            _installed.append(_abs(target))


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, folder: bool) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = _temp_name(target, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise MoetrimError(f"internal error: nothing was written for {target}")
        _install(tmp, target)
    finally:
        _remove(tmp)


def atomic_dir(target: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield an empty hidden folder beside `target`; on success it becomes `target` (replacing it)."""
    return _atomic(target, folder=True)


def atomic_file(target: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
    """Yield a hidden path beside `target` to write; on success it is renamed onto `target`."""
    return _atomic(target, folder=False)


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_file(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed read or write (disk full, permission, ...)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    where = f" {exc.filename}" if exc.filename else ""
    hint = "; free some space and run again" if exc.errno == errno.ENOSPC else ""
    return f"could not write or read{where}: {reason}{hint}"


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with the metadata in sorted order: safetensors writes it from a
    hash map, so the same tensors would otherwise give different bytes from run to run. The header
    is rewritten in place to the same length (compact JSON, padded with spaces as safetensors pads)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:
            raise MoetrimError(f"internal error: re-ordered safetensors header of {path} is longer than the original")
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
