"""Writing atomically and without leftovers: every file or folder moetrim writes appears whole or not at all.

Writing goes to a hidden temporary beside the output, `.NAME.tmp-PID-XXXX`, renamed into place at
the end. SIGINT and SIGTERM unwind through `finally` blocks that remove it (`raise_on_termination`
makes SIGTERM and SIGHUP raise like Ctrl-C); a temporary left by a killed process (SIGKILL, power
loss) is found by the next run that writes the same output, from its PID, and removed. A replaced
output moves to `.NAME.old-PID-XXXX` for the instant of the swap (signals held until it is done); if
that process died in between, the next run puts the old output back. Every output renamed into
place is recorded in `installed` (moetrim.checkpoint.outputs says which of a command's outputs are
complete from it).
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
from typing import Iterator

from moetrim.errors import MoetrimError

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
installed: list[Path] = []  # outputs renamed into place (moetrim.checkpoint.outputs clears it as a command starts)


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


def real_path(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))



# -- atomic writing -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: Path) -> None:
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
            remove_path(entry)
        found.append(entry)
    return found


def temp_name(target: Path, what: str) -> Path:
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
            old = temp_name(target, "old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            installed.append(real_path(target))  # before the signals come back: a SIGTERM now finds it complete
            remove_path(old)
        else:
            os.replace(tmp, target)
            installed.append(real_path(target))


@contextlib.contextmanager
def _atomic(target: str | os.PathLike, folder: bool) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    tmp = temp_name(target, "tmp")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise MoetrimError(f"internal error: nothing was written for {target}")
        _install(tmp, target)
    finally:
        remove_path(tmp)


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
