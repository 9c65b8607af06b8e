"""Faults while writing: signals, killed processes, full disks, interrupted demos; and outputs that
are the same bytes from run to run."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moetrim
from moetrim.checkpoint import atomic, outputs
from moetrim.cli import app

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def plan_file(tiny_dirs, calib_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    assert cli("calibrate", tiny_dirs["qwen3_moe"], "--data", calib_text, "--seq-len", 32, "--out", d / "P.safetensors")[0] == 0
    assert cli("plan", tiny_dirs["qwen3_moe"], "--profile", d / "P.safetensors", "--out", d / "p.json")[0] == 0
    return d / "p.json"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sigterm_during_save_removes_the_temporary(tmp_path):
    """The real signal path: SIGTERM lands while a checkpoint is being written; the process exits
    143 with one line, and neither the output nor its temporary is left."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from moetrim.checkpoint.atomic import atomic_dir, raise_on_termination
        from moetrim.cli.common import handled
        import typer
        raise_on_termination()
        @handled
        def work():
            with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
                (tmp / 'model.safetensors').write_bytes(b'x' * 1000)
                os.kill(os.getpid(), signal.SIGTERM)
                (tmp / 'never').write_text('reached')
        try:
            work()
        except typer.Exit as e:
            sys.exit(e.exit_code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().startswith("terminated") and len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


_AFTER_RENAME = """
    import os, signal, sys
    import typer
    from moetrim.checkpoint import atomic
    from moetrim.checkpoint.atomic import atomic_dir, raise_on_termination, write_text
    from moetrim.checkpoint.outputs import check_output
    from moetrim.cli.common import handled
    raise_on_termination()
    real = os.replace
    def replace_then_term(src, dst):  # SIGTERM lands right after a rename: blocked until the swap is done, then raised
        real(src, dst)
        if not os.path.basename(str(dst)).startswith("."):
            os.kill(os.getpid(), signal.SIGTERM)
    atomic.os.replace = replace_then_term
    @handled
    def work():
        for name in NAMES:
            check_output(ROOT + "/" + name, kind="json")
        write_text(ROOT + "/" + NAMES[0], '{"moetrim_report": "eval"}')
        write_text(ROOT + "/" + NAMES[-1], '{"moetrim_report": "eval"}')
    try:
        work()
    except typer.Exit as e:
        sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("names, code, says", [
    (["r.json"], 0, "terminated (SIGTERM) after the output was complete: {root}/r.json is written in full"),
    (["a.json", "b.json"], 143, "terminated (SIGTERM): {root}/a.json is complete; nothing was written to {root}/b.json"),
])
def test_sigterm_after_the_final_rename_says_the_output_is_complete(tmp_path, names, code, says):
    """A signal that lands once the last output is in place: exit 0, saying so (143 still means nothing
    was written); with several outputs, the message names the complete ones."""
    script = f"ROOT, NAMES = {str(tmp_path)!r}, {names!r}\n" + textwrap.dedent(_AFTER_RENAME)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip() == says.format(root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == names[:1]


def test_ctrl_c_once_the_report_is_written_exits_0(tiny_dirs, tmp_path, monkeypatch):
    from moetrim.cli import evaluate as cli_eval

    real = cli_eval.write_report

    def then_interrupt(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_eval, "write_report", then_interrupt)
    code, _, stderr = cli("eval", tiny_dirs["qwen3_moe"], "--tasks", "math", "--n", 1, "--json", tmp_path / "r.json")
    assert code == 0 and stderr.strip() == f"interrupted after the output was complete: {tmp_path / 'r.json'} is written in full"
    assert json.loads((tmp_path / "r.json").read_text())["moetrim_report"] == "eval"


def test_sigkill_leftovers_are_swept_by_the_next_run(tiny_dirs, plan_file, tmp_path):
    """A temporary of a killed run (its PID is dead) is removed by the next run writing that output;
    one of a live process is left alone."""
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 4096)
    live = tmp_path / f".out.tmp-{os.getpid()}-feedbeef"
    live.mkdir()
    code, _, stderr = cli("apply", tiny_dirs["qwen3_moe"], "--plan", plan_file, "--out", out)
    assert code == 0, stderr
    assert hidden(tmp_path) == [live.name]
    assert moetrim.load(out) is not None


def test_cut_swap_is_rolled_back(tmp_path):
    """A process killed between moving the old output away and moving the new one in: the next run
    puts the old output back before it does anything else."""
    out = tmp_path / "ckpt"
    old = tmp_path / f".ckpt.old-{_dead_pid()}-00ff00ff"
    old.mkdir()
    (old / "config.json").write_text('{"moetrim": {}}')
    assert atomic.sweep_stale(out) == [old]
    assert (out / "config.json").read_text() == '{"moetrim": {}}' and not old.exists()


def test_failed_write_leaves_nothing_and_says_one_line(tiny_dirs, plan_file, tmp_path, monkeypatch):
    """A full disk in the middle of writing the weights: exit 1, one line naming the cause, no output
    and no temporary."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))

    monkeypatch.setattr("moetrim.checkpoint.formats.save_safetensors", full)  # where the variable-width weights are written
    code, _, stderr = cli("apply", tiny_dirs["qwen3_moe"], "--plan", plan_file, "--out", tmp_path / "out")
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "No space left on device" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_too_little_space_is_refused_before_work(tiny_dirs, plan_file, tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    code, _, stderr = cli("apply", tiny_dirs["qwen3_moe"], "--plan", plan_file, "--out", tmp_path / "out")
    assert code == 1 and "not enough free space" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_interrupted_demo_leaves_nothing_and_can_rerun(tiny_dirs, tmp_path, monkeypatch):
    """Ctrl-C during the demo's evaluation: the message is true (nothing was written), and the same
    command then runs."""
    from moetrim.evaluate import tasks_eval

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "demo"
    with monkeypatch.context() as m:
        m.setattr(tasks_eval, "evaluate_tasks", interrupt)
        code, _, stderr = cli("demo", "--model", tiny_dirs["qwen3_moe"], "--eval-items", 2, "--out", out)
    assert code == 130 and "nothing was written" in stderr
    assert list(tmp_path.iterdir()) == []
    code, _, stderr = cli("demo", "--model", tiny_dirs["qwen3_moe"], "--eval-items", 2, "--out", out)
    assert code == 0, stderr
    assert (out / "results.json").is_file() and (out / "compressed" / "config.json").is_file()
    assert hidden(tmp_path) == []


def test_outputs_are_the_same_bytes_run_to_run(tiny_dirs, calib_text, tmp_path):
    """Profiles, plans and checkpoints of both formats: the same inputs give byte-identical files
    (safetensors writes its metadata from a hash map; moetrim sorts it)."""
    d = tiny_dirs["qwen3_moe"]
    for run in ("a", "b"):
        assert cli("calibrate", d, "--data", calib_text, "--seq-len", 32, "--out", tmp_path / run / "P.safetensors")[0] == 0
        for alloc in ("global", "uniform"):
            assert cli("compress", d, "--data", calib_text, "--seq-len", 32, "--allocation", alloc, "--out", tmp_path / run / alloc)[0] == 0
    a, b = digest_tree(tmp_path / "a"), digest_tree(tmp_path / "b")
    assert a == b and len(a) > 10
