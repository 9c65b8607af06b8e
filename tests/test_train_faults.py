"""Fine-tuning faults (issue 26): OUT.checkpoints is moetrim's own folder, a diverging run stops and
writes nothing, and a resumed run says what it did."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moetrim.assets.tiny import save_tiny
from moetrim.cli import app
from moetrim.train.checkpoints import MARKER, claim

TINY = ["--max-steps", 1, "--routing-tokens", 0, "--quiet"]
CONDENSER = ["--method", "condenser", "--condensers", 1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-faults")
    save_tiny("qwen3_moe", root / "model")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"add {i} {i} =", "response": f" {2 * i}"}) + "\n")
    return root


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def _model_at_out_checkpoints(ws: Path, tmp: Path) -> tuple[list, Path]:
    shutil.copytree(ws / "model", tmp / "s.checkpoints")
    return [tmp / "s.checkpoints", "--data", ws / "sft.jsonl"], tmp / "s"


def _data_inside_out_checkpoints(ws: Path, tmp: Path) -> tuple[list, Path]:
    (tmp / "t.checkpoints").mkdir()
    shutil.copy(ws / "sft.jsonl", tmp / "t.checkpoints" / "units.jsonl")
    return [ws / "model", "--data", tmp / "t.checkpoints" / "units.jsonl"], tmp / "t"


def _user_files_in_out_checkpoints(ws: Path, tmp: Path) -> tuple[list, Path]:
    (tmp / "z.checkpoints" / "notes").mkdir(parents=True)
    (tmp / "z.checkpoints" / "notes" / "keep.txt").write_text("mine")
    return [ws / "model", "--data", ws / "sft.jsonl"], tmp / "z"


@pytest.mark.parametrize("method", [[], CONDENSER], ids=["full", "condenser"])
@pytest.mark.parametrize("setup", [_model_at_out_checkpoints, _data_inside_out_checkpoints, _user_files_in_out_checkpoints],
                         ids=["model", "data", "user-files"])
def test_a_run_without_checkpoints_leaves_out_checkpoints_alone(ws, tmp_path, setup, method):
    """The three data-loss cases of issue 26: whatever sits at OUT.checkpoints (the input model, the
    folder of the input data, someone's files) is still there, byte for byte, after a finished run."""
    args, out = setup(ws, tmp_path)
    before = tree(tmp_path)
    code, _, stderr = cli("finetune", *args, *method, *TINY, "--out", out)
    assert code == 0, stderr
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith(out.name + "/") or k == out.name for k in set(after) - set(before))


def test_checkpoints_are_written_to_a_folder_moetrim_made_and_only_that_is_removed(ws, tmp_path):
    out = tmp_path / "o"
    code, _, stderr = cli("finetune", ws / "model", "--data", ws / "sft.jsonl", "--checkpoint-every", 1, *TINY, "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # its checkpoints folder made and removed
    claim(tmp_path / "k.checkpoints")  # a moetrim folder that holds someone's file too
    (tmp_path / "k.checkpoints" / "notes.txt").write_text("mine")
    code, _, stderr = cli("finetune", ws / "model", "--data", ws / "sft.jsonl", "--checkpoint-every", 1, *TINY, "--out", tmp_path / "k")
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "k.checkpoints").iterdir()) == ["notes.txt"]  # not its marker, not a checkpoint


def test_resume_refuses_fewer_steps_and_reports_what_it_did(ws, tmp_path, monkeypatch):
    out = tmp_path / "o"
    common = ["finetune", ws / "model", "--data", ws / "sft.jsonl", "--checkpoint-every", 2, "--routing-tokens", 0, "--quiet"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # a run stopped while saving: its checkpoint stays to resume from
        m.setattr("moetrim.checkpoint.save_checkpoint", interrupted)
        code, _, stderr = cli(*common, "--max-steps", 2, "--out", out)
    assert code == 130 and "nothing was written" in stderr and not out.exists()
    assert sorted(p.name for p in (tmp_path / "o.checkpoints").iterdir()) == ["checkpoint-2", MARKER]
    code, _, stderr = cli(*common, "--resume", "--max-steps", 1, "--out", out)
    assert code == 2 and "checkpoint-2 is at step 2, past --max-steps 1" in stderr, stderr
    code, stdout, stderr = cli(*common, "--resume", "--max-steps", 3, "--out", out)
    assert code == 0, stderr
    report = json.loads((out / "finetune.json").read_text())
    assert (report["steps"], report["resumed_from_step"], report["steps_this_run"]) == (3, 2, 1)
    assert "from step 2 to 3 (1 step in this run)" in stdout
    assert not (tmp_path / "o.checkpoints").exists()


def test_a_diverging_run_stops_with_one_line_and_writes_nothing(ws, tmp_path):
    code, stdout, stderr = cli("finetune", ws / "model", "--data", ws / "sft.jsonl", "--lr", "1e30", "--max-steps", 4,
                               "--batch-size", 2, "--routing-tokens", 0, "--quiet", "--out", tmp_path / "o")
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1 and "training diverged: the loss is nan" in lines[0], stderr
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_after_the_last_step_are_refused(ws, monkeypatch):
    """A step that leaves a weight non-finite while its loss was finite (the last one): no model comes back."""
    import moetrim
    from moetrim.assets.tiny import tiny_model, tiny_tokenizer
    from moetrim.train import engine

    make = engine._trainer_class

    def poisoning():
        class Poisoning(make()):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                with torch.no_grad():
                    self.model.lm_head.weight[0, 0] = float("inf")
                return loss
        return Poisoning

    monkeypatch.setattr(engine, "_trainer_class", poisoning)
    records = [{"prompt": "add 1 1 =", "response": " 2"}] * 4
    with pytest.raises(moetrim.MoetrimError, match="lm_head.weight holds non-finite values after 1 steps"):
        moetrim.finetune(tiny_model("qwen3_moe"), tiny_tokenizer(), records, method="full", max_steps=1, progress=False)
