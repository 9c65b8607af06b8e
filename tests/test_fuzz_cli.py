"""Bad inputs and faults, command by command: every case must end in one line on stderr with the
right exit code, no traceback, nothing written anywhere, and every input byte as it was.

Each case runs in a fresh copy of one workspace (a tiny model, its profile and plan, a variable-width
and a standard checkpoint, calibration text), snapshotted by content before and after the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from moetrim.assets.tiny import save_tiny
from moetrim.cli import app

runner = CliRunner()


def cli(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    return r.exit_code, r.stdout, r.stderr


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden ones too) with a hash of its bytes (folders: 'dir')."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        snap[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


@pytest.fixture(scope="module")
def base(tmp_path_factory, calib_text):
    """The workspace every case copies: m (tiny qwen3-moe), P.safetensors (its Fisher profile),
    F.safetensors (forward only), p.json (global dims plan), vw (variable-width checkpoint),
    std (standard checkpoint), rep (replaced experts), rt (rerouted: condensers), calib.txt,
    sft.jsonl (fine-tuning records), other (a tiny mixtral) and its profile Q.safetensors."""
    ws = tmp_path_factory.mktemp("fuzz-base")
    save_tiny("qwen3_moe", ws / "m")
    save_tiny("mixtral", ws / "other")
    shutil.copy(calib_text, ws / "calib.txt")
    assert cli("calibrate", ws / "m", "--data", ws / "calib.txt", "--seq-len", 32, "--out", ws / "P.safetensors")[0] == 0
    assert cli("calibrate", ws / "m", "--data", ws / "calib.txt", "--seq-len", 32, "--no-fisher", "--out", ws / "F.safetensors")[0] == 0
    assert cli("calibrate", ws / "other", "--data", ws / "calib.txt", "--seq-len", 32, "--out", ws / "Q.safetensors")[0] == 0
    assert cli("plan", ws / "m", "--profile", ws / "P.safetensors", "--out", ws / "p.json")[0] == 0
    assert cli("apply", ws / "m", "--plan", ws / "p.json", "--out", ws / "vw")[0] == 0
    assert cli("compress", ws / "m", "--data", ws / "calib.txt", "--seq-len", 32, "--allocation", "uniform", "--out", ws / "std")[0] == 0
    assert cli("compress", ws / "m", "--data", ws / "calib.txt", "--seq-len", 32, "--granularity", "replace", "--ratio", 0.05,
               "--rank", 2, "--out", ws / "rep")[0] == 0
    _sft(ws)
    assert cli("finetune", ws / "m", "--data", ws / "sft.jsonl", "--method", "condenser", "--condensers", 1, "--max-steps", 1,
               "--routing-tokens", 0, "--quiet", "--out", ws / "rt")[0] == 0
    return ws


# -- making bad inputs ----------------------------------------------------------------------
def _edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    d = fn(d) or d
    path.write_text(json.dumps(d))


def _edit_profile(path: Path, fn) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, stats = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    fn(stats, meta)
    save_file(stats, str(path), metadata=meta)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _mixed_plan(ws: Path, edit=None) -> None:
    """mx.json: an auto plan with a trimmed layer and a layer of novices (tests/helpers.mixed_auto_plan), edited by `edit`."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import mixed_auto_plan

    from moetrim.calibrate import load_profile
    from moetrim.checkpoint import load_model

    plan = mixed_auto_plan(load_model(ws / "m"), load_profile(ws / "P.safetensors"))[0]
    plan.save(ws / "mx.json")
    if edit is not None:
        _edit_json(ws / "mx.json", edit)


def _edit_plan_layer(fn):
    def edit(d):
        fn(d["layers"][0])
    return lambda ws: _edit_json(ws / "p.json", edit)


def _set(stats_key: str, value):
    def edit(stats, meta):
        t = stats[stats_key].clone()
        t.view(-1)[0] = value
        stats[stats_key] = t
    return edit


def _dense_model(ws: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from moetrim.assets.tiny import tiny_tokenizer

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(ws / "dense")
    tiny_tokenizer().save_pretrained(ws / "dense")


def _pickle_model(ws: Path) -> None:
    import datetime

    (ws / "m" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2), "when": datetime.date(2020, 1, 1)}, ws / "m" / "pytorch_model.bin")


def _swap_widths(d):
    w = d["moetrim_varwidth"]["layers"]["0"]["widths"]
    i = next(i for i in range(1, len(w)) if w[i] != w[0])
    w[0], w[i] = w[i], w[0]


def _sft(ws: Path, text: str | None = None) -> None:
    """A fine-tuning file: two prompt/response records, or the given text."""
    rows = [json.dumps({"prompt": f"add {i} {i} =", "response": f" {2 * i}\n"}) for i in range(2)]
    (ws / "sft.jsonl").write_text(text if text is not None else "\n".join(rows) + "\n")


def _mkdir_with(path: Path, name: str = "keep.txt") -> None:
    path.mkdir()
    (path / name).write_text("mine")


def _copy(src: str, dst: str):
    return lambda ws: shutil.copytree(ws / src, ws / dst)


GOOD_RECORD = json.dumps({"prompt": "add 1 1 =", "response": " 2"}) + "\n"
NOT_UTF8 = GOOD_RECORD.encode() + b'{"prompt": "caf\xe9 =", "response": " 1"}\n'
SURROGATE = GOOD_RECORD + '{"prompt": "a \\ud800 b =", "response": " 1"}\n'  # a JSON escape of half a surrogate pair
DEEP = GOOD_RECORD + "[" * 100_000 + "]" * 100_000 + "\n"
WRONG_TYPE = GOOD_RECORD + json.dumps({"prompt": 3, "response": " 1"}) + "\n"


def _data(name: str, content: bytes | str):
    """A data file at ws/name (its folder made if needed)."""
    def make(ws: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def _resume_state(step: int = 5, damage=None):
    """o.checkpoints as `finetune --checkpoint-every` leaves it (its marker, a checkpoint-STEP folder with
    trainer_state.json, the model state and a Trainer optimizer file), then `damage(checkpoint folder)`."""
    def make(ws: Path) -> None:
        from moetrim.train.checkpoints import claim

        claim(ws / "o.checkpoints")
        ck = ws / "o.checkpoints" / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"x": torch.zeros(4)}, str(ck / "moetrim_state.safetensors"))
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
        if damage is not None:
            damage(ck)
    return make


def _foreign_png(ws: Path) -> None:
    from PIL import Image

    Image.new("RGB", (2, 2)).save(ws / "r.png")


def _unknown_granularity_plan(ws: Path) -> None:
    d = json.loads((ws / "rep" / "plan.json").read_text())
    d["granularity"] = "foo"
    (ws / "rp.json").write_text(json.dumps(d))


M, P, PLAN = "{m}", "{P}", "{p}"
CAL = ["--data", "{ws}/calib.txt", "--seq-len", "32"]
FT = ["finetune", M, "--max-steps", 1, "--routing-tokens", 0, "--quiet"]  # tiny settings: a run that is not refused ends fast
SFT = ["--data", "{ws}/sft.jsonl"]
BAD = ["--data", "{ws}/bad.jsonl"]
RESUME = [*FT[:2], *SFT, "--resume", "--max-steps", 9, "--routing-tokens", 0, "--out", "{ws}/o"]
REPLACE = ["--granularity", "replace", "--ratio", 0.05, "--rank", 2]

# (id, setup(ws) or None, args (with {ws}, {m}, {P}, {p} filled in), exit code, text the one line must hold, cwd)
CASES = [
    # -- the input model and what is around it is never written --------------------------------
    ("apply-out-is-model", None, ["apply", M, "--plan", PLAN, "--out", M, "--overwrite"], 2, "is the input", None),
    ("apply-out-parent-of-model", None, ["apply", M, "--plan", PLAN, "--out", "{ws}", "--overwrite"], 2, "contains the input", None),
    ("apply-out-inside-model", None, ["apply", M, "--plan", PLAN, "--out", "{m}/sub"], 2, "is inside the input", None),
    ("apply-out-dot", None, ["apply", M, "--plan", PLAN, "--out", ".", "--overwrite"], 2, "contains the input", "{ws}"),
    ("apply-out-cwd-elsewhere", lambda ws: (ws / "empty").mkdir(), ["apply", M, "--plan", PLAN, "--out", ".", "--overwrite"], 2,
     "current folder", "{ws}/empty"),
    ("apply-out-is-plan", None, ["apply", M, "--plan", PLAN, "--out", PLAN, "--overwrite"], 2, "is the input", None),
    ("apply-out-foreign-dir", lambda ws: _mkdir_with(ws / "mine"), ["apply", M, "--plan", PLAN, "--out", "{ws}/mine", "--overwrite"], 2,
     "not a moetrim output", None),
    ("apply-out-is-file", None, ["apply", M, "--plan", PLAN, "--out", "{ws}/calib.txt", "--overwrite"], 2, "is a file", None),
    ("apply-out-exists", None, ["apply", M, "--plan", PLAN, "--out", "{ws}/vw"], 2, "already exists", None),
    ("apply-out-under-file", None, ["apply", M, "--plan", PLAN, "--out", "{ws}/calib.txt/x"], 2, "is a file, not a folder", None),
    ("apply-out-read-only-fs", None, ["apply", M, "--plan", PLAN, "--out", "/proc/moetrim-out"], 2, "not writable", None),
    ("plan-out-model-config", None, ["plan", M, "--profile", P, "--out", "{m}/config.json", "--overwrite"], 2, "is inside the input", None),
    ("plan-out-is-profile", None, ["plan", M, "--profile", P, "--out", P, "--overwrite"], 2, "is the input", None),
    ("plan-out-foreign-json", lambda ws: (ws / "notes.json").write_text("[1]"),
     ["plan", M, "--profile", P, "--out", "{ws}/notes.json", "--overwrite"], 2, "not a moetrim plan", None),
    ("calibrate-out-model-weights", None, ["calibrate", M, *CAL, "--out", "{m}/model.safetensors", "--overwrite"], 2, "is inside the input", None),
    ("calibrate-out-existing-dir", None, ["calibrate", M, *CAL, "--out", "{ws}/vw", "--overwrite"], 2, "not a regular file", None),
    ("calibrate-out-is-data", None, ["calibrate", M, *CAL, "--out", "{ws}/calib.txt", "--overwrite"], 2, "is the input", None),
    ("calibrate-out-foreign-file", lambda ws: (ws / "x.safetensors").write_bytes(b"12345678"),
     ["calibrate", M, *CAL, "--out", "{ws}/x.safetensors", "--overwrite"], 2, "not a moetrim profile", None),
    ("compress-out-is-model", None, ["compress", M, *CAL, "--out", M, "--overwrite"], 2, "is the input", None),
    ("merge-out-is-input", None, ["merge", P, "{ws}/P2.safetensors", "--out", P, "--overwrite"], 2, "is the input", None),
    ("eval-json-in-model", None, ["eval", M, "--n", 1, "--json", "{m}/config.json"], 2, "is inside the input", None),
    ("demo-out-is-model", None, ["demo", "--model", M, "--out", M], 2, "is the input", None),
    ("demo-out-nonempty", lambda ws: _mkdir_with(ws / "d"), ["demo", "--model", M, "--out", "{ws}/d"], 2, "not empty", None),
    # -- plans that cannot be what was asked ------------------------------------------------------
    ("plan-protect-too-many", None, ["plan", M, "--profile", P, "--protect", 150, "--out", "{ws}/q.json"], 2, "--protect 150", None),
    ("plan-protect-over-layer", None, ["plan", M, "--profile", P, "--protect", 1000000, "--out", "{ws}/q.json"], 2, "dims of a layer", None),
    ("plan-protect-uniform", None, ["plan", M, "--profile", P, "--protect", 200, "--allocation", "uniform", "--ratio", 0.75,
                                    "--out", "{ws}/q.json"], 2, "--protect", None),
    ("plan-min-width-full", None, ["plan", M, "--profile", P, "--min-width", 32, "--out", "{ws}/q.json"], 2, "--min-width 32", None),
    ("plan-min-width-over", None, ["plan", M, "--profile", P, "--min-width", 64, "--out", "{ws}/q.json"], 2, "--min-width must be", None),
    ("plan-round-to-over", None, ["plan", M, "--profile", P, "--round-to", 1000, "--allocation", "uniform", "--out", "{ws}/q.json"], 2,
     "--round-to must be", None),
    ("plan-round-to-full", None, ["plan", M, "--profile", P, "--round-to", 32, "--ratio", 0.25, "--out", "{ws}/q.json"], 2,
     "--round-to 32", None),
    ("plan-experts-too-far", None, ["plan", M, "--profile", P, "--granularity", "experts", "--ratio", 0.99, "--out", "{ws}/q.json"], 2,
     "whole experts", None),
    ("plan-experts-min-width", None, ["plan", M, "--profile", P, "--granularity", "experts", "--min-width", 4, "--out", "{ws}/q.json"], 2,
     "applies to --granularity dims", None),
    ("plan-exponents-nan", None, ["plan", M, "--profile", P, "--granularity", "experts", "--criterion", "unified", "--exponents", "nan,1,1",
                                  "--out", "{ws}/q.json"], 2, "--exponents", None),
    ("plan-exponents-fraction", None, ["plan", M, "--profile", P, "--granularity", "experts", "--criterion", "unified",
                                       "--exponents", "0,1.5,1", "--out", "{ws}/q.json"], 2, "--exponents", None),
    ("plan-exponents-not-unified", None, ["plan", M, "--profile", P, "--granularity", "experts", "--exponents", "0,1,1",
                                          "--out", "{ws}/q.json"], 2, "--criterion unified", None),
    ("plan-ratio-one", None, ["plan", M, "--profile", P, "--ratio", 1, "--out", "{ws}/q.json"], 2, "--ratio must be", None),
    ("plan-ratio-nan", None, ["plan", M, "--profile", P, "--ratio", "nan", "--out", "{ws}/q.json"], 2, "--ratio must be", None),
    ("plan-ratio-text", None, ["plan", M, "--profile", P, "--ratio", "half", "--out", "{ws}/q.json"], 2, "Invalid value for '--ratio'", None),
    ("plan-unknown-flag", None, ["plan", M, "--profile", P, "--bogus"], 2, "No such option", None),
    ("plan-unknown-criterion", None, ["plan", M, "--profile", P, "--criterion", "bogus", "--out", "{ws}/q.json"], 2, "unknown dim criterion", None),
    ("plan-dims-criterion-for-experts", None, ["plan", M, "--profile", P, "--granularity", "experts", "--criterion", "fisher",
                                               "--out", "{ws}/q.json"], 2, "unknown expert criterion", None),
    ("plan-unknown-allocation", None, ["plan", M, "--profile", P, "--allocation", "even", "--out", "{ws}/q.json"], 2, "--allocation", None),
    ("plan-no-profile", None, ["plan", M, "--out", "{ws}/q.json"], 2, "needs a calibration profile", None),
    ("plan-forward-only-profile", None, ["plan", M, "--profile", "{ws}/F.safetensors", "--out", "{ws}/q.json"], 2, "--no-fisher", None),
    ("plan-compressed-model", None, ["plan", "{ws}/vw", "--criterion", "magnitude", "--out", "{ws}/q.json"], 2, "already compressed", None),
    # -- profiles that are empty, broken, foreign ---------------------------------------------------
    ("profile-nan", lambda ws: _edit_profile(ws / "P.safetensors", _set("layers.0.fisher", float("nan"))),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "non-finite", None),
    ("profile-inf", lambda ws: _edit_profile(ws / "P.safetensors", _set("layers.1.act_abs_sum", float("inf"))),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "non-finite", None),
    ("profile-all-nan", lambda ws: _edit_profile(ws / "P.safetensors", lambda s, m: s.update({"layers.0.fisher": s["layers.0.fisher"] * float("nan")})),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "non-finite", None),
    ("profile-wrong-shape", lambda ws: _edit_profile(ws / "P.safetensors", lambda s, m: s.update({"layers.0.fisher": torch.zeros(8, 16, dtype=torch.float64)})),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "shape", None),
    ("profile-wrong-width-everywhere",
     lambda ws: _edit_profile(ws / "P.safetensors", lambda s, m: s.update({k: v[:, :16].clone() for k, v in s.items() if k.startswith("layers.0.") and v.ndim == 2})),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "width 32", None),
    ("profile-zero-tokens", lambda ws: _edit_profile(ws / "P.safetensors", lambda s, m: m.update(tokens="0")),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "no calibration tokens", None),
    ("profile-random-bytes", lambda ws: _random_bytes(ws / "P.safetensors"), ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2,
     "not a safetensors profile", None),
    ("profile-truncated", lambda ws: _truncate(ws / "P.safetensors"), ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2,
     "not a safetensors profile", None),
    ("profile-of-other-model", None, ["plan", M, "--profile", "{ws}/Q.safetensors", "--out", "{ws}/q.json"], 2, "another model", None),
    ("profile-missing", None, ["plan", M, "--profile", "{ws}/nope.safetensors", "--out", "{ws}/q.json"], 2, "profile not found", None),
    ("profile-missing-stat", lambda ws: _edit_profile(ws / "P.safetensors", lambda s, m: s.pop("layers.0.moments")),
     ["plan", M, "--profile", P, "--out", "{ws}/q.json"], 2, "lacks moments", None),
    ("merge-one", None, ["merge", P, "--out", "{ws}/R.safetensors"], 2, "at least two", None),
    ("merge-wrong-shape", lambda ws: _edit_profile(ws / "P2.safetensors", lambda s, m: s.update({k: v[:, :16].clone() for k, v in s.items() if k.startswith("layers.0.") and v.ndim == 2})),
     ["merge", P, "{ws}/P2.safetensors", "--out", "{ws}/R.safetensors"], 2, "shape", None),
    ("merge-corrupt", lambda ws: _random_bytes(ws / "P2.safetensors"), ["merge", P, "{ws}/P2.safetensors", "--out", "{ws}/R.safetensors"], 2,
     "not a safetensors profile", None),
    ("merge-other-model", None, ["merge", P, "{ws}/Q.safetensors", "--out", "{ws}/R.safetensors"], 2, "different models", None),
    ("merge-forward-and-fisher", None, ["merge", P, "{ws}/F.safetensors", "--out", "{ws}/R.safetensors"], 2, "different statistics", None),
    # -- calibration inputs -----------------------------------------------------------------------
    ("calibrate-max-tokens-0", None, ["calibrate", M, *CAL, "--max-tokens", 0, "--out", "{ws}/R.safetensors"], 2, "--max-tokens", None),
    ("calibrate-max-tokens-1", None, ["calibrate", M, *CAL, "--max-tokens", 1, "--out", "{ws}/R.safetensors"], 2, "--max-tokens", None),
    ("compress-max-tokens-0", None, ["compress", M, *CAL, "--max-tokens", 0, "--out", "{ws}/o"], 2, "--max-tokens", None),
    ("calibrate-seq-len-1", None, ["calibrate", M, "--data", "{ws}/calib.txt", "--seq-len", 1, "--out", "{ws}/R.safetensors"], 2, "--seq-len", None),
    ("calibrate-batch-0", None, ["calibrate", M, *CAL, "--batch-size", 0, "--out", "{ws}/R.safetensors"], 2, "--batch-size", None),
    ("calibrate-fisher-mode", None, ["calibrate", M, *CAL, "--fisher-mode", "token", "--out", "{ws}/R.safetensors"], 2, "fisher mode", None),
    ("calibrate-dtype", None, ["calibrate", M, *CAL, "--dtype", "int8", "--out", "{ws}/R.safetensors"], 2, "--dtype", None),
    ("calibrate-device", None, ["calibrate", M, *CAL, "--device", "tpu", "--out", "{ws}/R.safetensors"], 2, "--device", None),
    ("calibrate-empty-data", lambda ws: (ws / "empty.txt").write_text("\n\n"),
     ["calibrate", M, "--data", "{ws}/empty.txt", "--out", "{ws}/R.safetensors"], 2, "empty", None),
    ("calibrate-binary-data", lambda ws: (ws / "bin.txt").write_bytes(b"\xff\xfe" + os.urandom(64)),
     ["calibrate", M, "--data", "{ws}/bin.txt", "--out", "{ws}/R.safetensors"], 2, "not UTF-8", None),
    ("calibrate-bad-jsonl", lambda ws: (ws / "d.jsonl").write_text('{"text": "a b"}\n{oops\n'),
     ["calibrate", M, "--data", "{ws}/d.jsonl", "--out", "{ws}/R.safetensors"], 2, "not valid JSON", None),
    ("calibrate-jsonl-no-text", lambda ws: (ws / "d.jsonl").write_text('{"prompt": "a b"}\n'),
     ["calibrate", M, "--data", "{ws}/d.jsonl", "--out", "{ws}/R.safetensors"], 2, "'text'", None),
    ("calibrate-missing-data", None, ["calibrate", M, "--data", "{ws}/nope.txt", "--out", "{ws}/R.safetensors"], 2, "data file not found", None),
    ("calibrate-compressed-model", None, ["calibrate", "{ws}/vw", *CAL, "--out", "{ws}/R.safetensors"], 2, "already compressed", None),
    ("compress-compressed-model", None, ["compress", "{ws}/vw", *CAL, "--out", "{ws}/o"], 2, "already compressed", None),
    # -- models that are missing, broken, or not what they claim ------------------------------------
    ("model-missing", None, ["calibrate", "{ws}/nope", *CAL, "--out", "{ws}/R.safetensors"], 2, "model directory not found", None),
    ("model-no-config", lambda ws: (ws / "m" / "config.json").unlink(), ["inspect", M], 2, "no config.json", None),
    ("model-config-not-json", lambda ws: (ws / "m" / "config.json").write_text("{"), ["inspect", M], 2, "not valid JSON", None),
    ("model-truncated-weights", lambda ws: _truncate(ws / "m" / "model.safetensors"),
     ["calibrate", M, *CAL, "--out", "{ws}/R.safetensors"], 1, "cannot load", None),
    ("model-random-weights-file", lambda ws: _random_bytes(ws / "m" / "model.safetensors"),
     ["compress", M, *CAL, "--out", "{ws}/o"], 1, "cannot load", None),
    ("model-pickle-bin", _pickle_model, ["calibrate", M, *CAL, "--out", "{ws}/R.safetensors"], 2, "holds pickle weights", None),
    ("model-expert-count-mismatch", lambda ws: _edit_json(ws / "m" / "config.json", lambda d: d.update(num_local_experts=6, num_experts=6)),
     ["calibrate", M, *CAL, "--out", "{ws}/R.safetensors"], 1, "other shapes than config.json", None),
    ("model-not-moe", _dense_model, ["calibrate", "{ws}/dense", *CAL, "--out", "{ws}/R.safetensors"], 1, "MoE", None),
    ("model-no-tokenizer", lambda ws: (ws / "m" / "tokenizer.json").unlink(),
     ["calibrate", M, *CAL, "--out", "{ws}/R.safetensors"], 2, "no tokenizer files", None),
    # -- hand-edited plans ------------------------------------------------------------------------
    ("plan-widths-vs-dims", _edit_plan_layer(lambda l: l["widths"].__setitem__(0, l["widths"][0] - 1)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "must agree", None),
    ("plan-negative-dim", _edit_plan_layer(lambda l: l["kept_dims"][0].__setitem__(0, -3)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "kept_dims", None),
    ("plan-negative-expert", _edit_plan_layer(lambda l: l["kept_experts"].__setitem__(0, -1)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "kept_experts", None),
    ("plan-unsorted-dims", _edit_plan_layer(lambda l: l["kept_dims"][0].reverse()),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "ascending", None),
    ("plan-dim-over-width", _edit_plan_layer(lambda l: l["kept_dims"][0].__setitem__(-1, 99)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "names dim 99", None),
    ("plan-top-k-zero", _edit_plan_layer(lambda l: l.update(top_k=0)), ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "top_k", None),
    ("plan-width-string", _edit_plan_layer(lambda l: l["widths"].__setitem__(0, "8")), ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2,
     "widths", None),
    ("plan-is-list", lambda ws: (ws / "p.json").write_text("[1, 2]"), ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "JSON object", None),
    ("plan-not-json", lambda ws: (ws / "p.json").write_text("plan: yes"), ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2,
     "not valid JSON", None),
    ("plan-missing-field", lambda ws: _edit_json(ws / "p.json", lambda d: d.pop("layers") and None),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "lacks layers", None),
    ("plan-params-edited", lambda ws: _edit_json(ws / "p.json", lambda d: d.update(params_after=d["params_after"] - 1)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "params_after", None),
    ("plan-other-model", lambda ws: _edit_json(ws / "p.json", lambda d: d.update(model_fingerprint="0" * 16)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "another model", None),
    ("plan-schema", lambda ws: _edit_json(ws / "p.json", lambda d: d.update(schema_version=7)),
     ["apply", M, "--plan", PLAN, "--out", "{ws}/o"], 2, "schema version", None),
    ("plan-missing", None, ["apply", M, "--plan", "{ws}/nope.json", "--out", "{ws}/o"], 2, "plan not found", None),
    # -- auto plans that mix sliced and replaced layers -------------------------------------------
    ("apply-auto-replaced-streaming", _mixed_plan, ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--streaming", "--out", "{ws}/o"],
     2, "without --streaming", None),
    ("apply-auto-novices-no-profile", _mixed_plan, ["apply", M, "--plan", "{ws}/mx.json", "--out", "{ws}/o"], 2, "--profile", None),
    ("plan-replaced-layer-also-sliced", lambda ws: _mixed_plan(ws, lambda d: d["replaced_layers"][0].update(layer=0)),
     ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--out", "{ws}/o"], 2, "both sliced and replaced", None),
    ("plan-replaced-layer-unknown", lambda ws: _mixed_plan(ws, lambda d: d["replaced_layers"][0].update(layer=9)),
     ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--out", "{ws}/o"], 2, "is not a layer of the plan", None),
    ("plan-replaced-novice-also-kept", lambda ws: _mixed_plan(ws, lambda d: d["replaced_layers"][0]["kept"].append(d["replaced_layers"][0]["novices"][0])),
     ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--out", "{ws}/o"], 2, "replaced layer 1:", None),
    ("plan-replaced-in-dims-plan", lambda ws: _mixed_plan(ws, lambda d: d.update(granularity="dims")),
     ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--out", "{ws}/o"], 2, "only an auto plan", None),
    ("plan-replaced-layer-field", lambda ws: _mixed_plan(ws, lambda d: d["replaced_layers"][0].pop("rank")),
     ["apply", M, "--plan", "{ws}/mx.json", "--profile", "{P}", "--out", "{ws}/o"], 2, "a replaced layer has fields", None),
    # -- hand-edited variable-width checkpoints ------------------------------------------------------
    ("varwidth-swapped-widths", lambda ws: _edit_json(ws / "vw" / "config.json", _swap_widths), ["eval", "{ws}/vw", "--n", 1], 1,
     "disagrees with its weight files", None),
    ("varwidth-layout-edited", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"].update(layout="by_expert")),
     ["eval", "{ws}/vw", "--n", 1], 1, "disagrees with its weight files", None),
    ("varwidth-top-k-edited", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"]["layers"]["0"].update(top_k=1)),
     ["eval", "{ws}/vw", "--n", 1], 1, "disagrees with its weight files", None),
    ("varwidth-negative-width", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"]["layers"]["0"]["widths"].__setitem__(0, -5)),
     ["eval", "{ws}/vw", "--n", 1], 1, "positive integers", None),
    ("varwidth-zero-width", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"]["layers"]["0"]["widths"].__setitem__(0, 0)),
     ["inspect", "{ws}/vw"], 1, "positive integers", None),
    ("varwidth-unknown-layer", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"]["layers"].update({"9": d["moetrim_varwidth"]["layers"]["0"]})),
     ["eval", "{ws}/vw", "--n", 1], 1, "not an MoE layer", None),
    ("varwidth-unknown-base", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d.update(moetrim_base_model_type="nope")),
     ["eval", "{ws}/vw", "--n", 1], 1, "model type", None),
    ("varwidth-unknown-layout", lambda ws: _edit_json(ws / "vw" / "config.json", lambda d: d["moetrim_varwidth"].update(layout="diagonal")),
     ["eval", "{ws}/vw", "--n", 1], 1, "layout", None),
    ("standard-truncated", lambda ws: _truncate(ws / "std" / "model.safetensors"), ["eval", "{ws}/std", "--n", 1], 1, "cannot load", None),
    # -- other commands' options --------------------------------------------------------------------
    ("eval-unknown-task", None, ["eval", M, "--tasks", "poetry"], 2, "poetry", None),
    ("eval-n-zero", None, ["eval", M, "--n", 0], 2, "--n must be", None),
    ("eval-lm-eval-unknown-own-task", None, ["eval", M, "--lm-eval", "moetrim,moetrim_poetry"], 2, "unknown lm-eval task 'moetrim_poetry'", None),
    ("eval-lm-eval-no-tasks", None, ["eval", M, "--lm-eval", " , "], 2, "no lm-eval tasks given", None),
    ("eval-lm-eval-with-tasks", None, ["eval", M, "--lm-eval", "moetrim", "--tasks", "math"], 2, "exclusive", None),
    ("eval-include-path-alone", None, ["eval", M, "--include-path", "{ws}"], 2, "--include-path applies to --lm-eval", None),
    ("eval-include-path-missing", None, ["eval", M, "--lm-eval", "moetrim", "--include-path", "{ws}/nope"], 2, "not a folder", None),
    ("eval-include-path-is-file", None, ["eval", M, "--lm-eval", "moetrim", "--include-path", "{ws}/calib.txt"], 2, "not a folder", None),
    ("eval-lm-eval-json-in-model", None, ["eval", M, "--lm-eval", "moetrim", "--json", "{m}/config.json"], 2, "is inside the input", None),
    ("routing-dense-model", _dense_model, ["routing", "{ws}/dense", *CAL, "--json", "{ws}/r.json", "--png", "{ws}/r.png"], 2, "no MoE layers", None),
    # -- fine-tuning, replacing, recovery, task files ---------------------------------------------
    ("finetune-unknown-method", _sft, ["finetune", M, "--data", "{ws}/sft.jsonl", "--method", "magic", "--out", "{ws}/o"], 2,
     "unknown --method", None),
    ("finetune-no-response", lambda ws: _sft(ws, json.dumps({"prompt": "a"}) + "\n"),
     ["finetune", M, "--data", "{ws}/sft.jsonl", "--out", "{ws}/o"], 2, "'response'", None),
    ("finetune-empty-data", lambda ws: _sft(ws, "\n"), ["finetune", M, "--data", "{ws}/sft.jsonl", "--out", "{ws}/o"], 2, "no examples", None),
    ("finetune-too-many-condensers", _sft, ["finetune", M, "--data", "{ws}/sft.jsonl", "--method", "condenser", "--condensers", 8,
                                            "--out", "{ws}/o"], 2, "fewer than the 8 experts", None),
    ("finetune-dense-model", lambda ws: (_dense_model(ws), _sft(ws)), ["finetune", "{ws}/dense", "--data", "{ws}/sft.jsonl", "--out", "{ws}/o"],
     2, "no MoE layers", None),
    ("finetune-out-is-model", _sft, ["finetune", M, "--data", "{ws}/sft.jsonl", "--out", M, "--overwrite"], 2, "input", None),
    ("finetune-bad-lora-experts", _sft, ["finetune", M, "--data", "{ws}/sft.jsonl", "--lora", 2, "--lora-experts", "magic", "--out", "{ws}/o"],
     2, "--lora-experts", None),
    ("finetune-resume-nothing", _sft, ["finetune", M, "--data", "{ws}/sft.jsonl", "--resume", "--out", "{ws}/o"], 2, "no checkpoint", None),
    ("recover-nothing-to-train", _sft, ["recover", "{ws}/std", "--data", "{ws}/sft.jsonl", "--anneal", "none", "--out", "{ws}/o"], 2,
     "nothing to recover", None),
    ("recover-bad-anneal", _sft, ["recover", "{ws}/std", "--data", "{ws}/sft.jsonl", "--anneal", "bogus", "--out", "{ws}/o"], 2, "--anneal", None),
    ("compress-replace-rank-zero", None, ["compress", M, *CAL, "--granularity", "replace", "--rank", 0, "--out", "{ws}/o"], 2,
     "--rank must be at least 1", None),
    ("compress-replace-rank-over-width", None, ["compress", M, *CAL, "--granularity", "replace", "--rank", 1000, "--out", "{ws}/o"], 2,
     "--rank must be between", None),
    ("compress-replace-bad-weighting", None, ["compress", M, *CAL, "--granularity", "merge", "--base-weighting", "magic", "--out", "{ws}/o"],
     2, "unknown base weighting", None),
    ("plan-replace-no-profile", None, ["plan", M, "--granularity", "d2", "--out", "{ws}/x.json"], 2, "needs --profile", None),
    # -- the 2026 methods: --novice (MoNE), --merge-method ream, data-free criteria (AIMER) -------------------
    ("compress-novice-on-dims", None, ["compress", M, *CAL, "--granularity", "dims", "--novice", "--out", "{ws}/o"], 2,
     "--novice replaces removed experts by constant outputs", None),
    ("plan-novice-on-merge", None, ["plan", M, "--profile", P, "--granularity", "merge", "--novice", "--out", "{ws}/x.json"], 2,
     "it applies to --granularity experts", None),
    ("compress-merge-method-unknown", None, ["compress", M, *CAL, "--granularity", "merge", "--merge-method", "ties", "--out", "{ws}/o"],
     2, "unknown --merge-method 'ties'", None),
    ("compress-merge-method-on-experts", None, ["compress", M, *CAL, "--granularity", "experts", "--merge-method", "ream",
                                                "--out", "{ws}/o"], 2, "it applies to --granularity merge", None),
    ("compress-ream-recover", None, ["compress", M, *CAL, "--granularity", "merge", "--merge-method", "ream", "--recover-steps", 1,
                                     "--out", "{ws}/o"], 2, "a REAM model is a standard checkpoint", None),
    ("compress-no-data-calibrated-criterion", None, ["compress", M, "--granularity", "experts", "--criterion", "reap", "--out", "{ws}/o"],
     2, "--criterion reap reads calibration statistics: give --data", None),
    ("compress-no-data-default-criterion", None, ["compress", M, "--out", "{ws}/o"], 2, "--criterion fisher reads calibration statistics",
     None),
    ("compress-no-data-replace", None, ["compress", M, "--granularity", "novice", "--out", "{ws}/o"], 2, "needs --data", None),
    ("compress-method-unknown", None, ["compress", M, *CAL, "--method", "best", "--out", "{ws}/o"], 2, "unknown --method 'best'", None),
    ("compress-method-auto-criterion", None, ["compress", M, *CAL, "--method", "auto", "--criterion", "reap", "--out", "{ws}/o"], 2,
     "--method auto chooses the granularity, criterion and allocation", None),
    ("compress-method-auto-granularity", None, ["compress", M, *CAL, "--method", "auto", "--granularity", "experts", "--out", "{ws}/o"],
     2, "--method auto chooses the granularity", None),
    ("compress-method-auto-min-width", None, ["compress", M, *CAL, "--method", "auto", "--min-width", 2, "--out", "{ws}/o"], 2,
     "drop --min-width", None),
    ("compress-method-auto-no-data", None, ["compress", M, "--method", "auto", "--out", "{ws}/o"], 2, "give --data", None),
    ("compress-method-auto-streaming", None, ["compress", M, *CAL, "--method", "auto", "--streaming", "--out", "{ws}/o"], 2,
     "drop --sequential/--streaming/--device-map", None),
    ("compress-method-auto-ratio", None, ["compress", M, *CAL, "--method", "auto", "--ratio", 1.5, "--out", "{ws}/o"], 2, "--ratio", None),
    ("compress-no-data-sequential", None, ["compress", M, "--granularity", "experts", "--criterion", "aimer", "--sequential",
                                           "--out", "{ws}/o"], 2, "--sequential calibrates layer by layer", None),
    ("plan-layer-width-experts", None, ["plan", M, "--profile", P, "--granularity", "experts", "--allocation", "layer_width",
                                       "--out", "{ws}/x.json"], 2, "applies to --granularity dims", None),
    ("tasks-unknown-domain", None, ["tasks", "poetry", "--out", "{ws}/t.jsonl"], 2, "poetry", None),
    ("tasks-bad-suffix", None, ["tasks", "units", "--out", "{ws}/t.csv"], 2, ".jsonl", None),
    ("demo-eval-items-zero", None, ["demo", "--model", M, "--eval-items", 0, "--out", "{ws}/d"], 2, "--eval-items", None),
    ("demo-bad-ratio", None, ["demo", "--model", M, "--ratio", 1.5, "--out", "{ws}/d"], 2, "--ratio must be", None),
    ("unknown-command", None, ["shrink", M], 2, "No such command", None),
    # -- placement over devices, gradient checkpointing, several processes --------------------------------
    ("place-device-map-unknown", None, ["calibrate", M, *CAL, "--device-map", "everywhere", "--out", "{ws}/R.safetensors"], 2,
     "neither auto", None),
    ("place-device-map-not-json", lambda ws: (ws / "dm.json").write_text("{layers: 0"),
     ["calibrate", M, *CAL, "--device-map", "{ws}/dm.json", "--out", "{ws}/R.safetensors"], 2, "not valid JSON", None),
    ("place-device-map-list", lambda ws: (ws / "dm.json").write_text("[0, 1]"),
     ["eval", M, "--n", 1, "--device-map", "{ws}/dm.json"], 2, "JSON object", None),
    ("place-device-map-bad-device", lambda ws: (ws / "dm.json").write_text('{"model": "tpu:0"}'),
     ["compress", M, *CAL, "--device-map", "{ws}/dm.json", "--out", "{ws}/o"], 2, "unknown device 'tpu:0'", None),
    ("place-device-map-disk-no-folder", lambda ws: (ws / "dm.json").write_text('{"model": "cpu", "lm_head": "disk"}'),
     ["calibrate", M, *CAL, "--device-map", "{ws}/dm.json", "--out", "{ws}/R.safetensors"], 2, "--offload-folder", None),
    ("place-device-and-device-map", None, ["calibrate", M, *CAL, "--device", "cuda", "--device-map", "auto", "--out", "{ws}/R.safetensors"],
     2, "not both", None),
    ("place-max-memory-no-equals", None, ["calibrate", M, *CAL, "--device-map", "auto", "--max-memory", "cpu:20GiB",
                                         "--out", "{ws}/R.safetensors"], 2, "DEVICE=SIZE", None),
    ("place-max-memory-bad-size", None, ["compress", M, *CAL, "--device-map", "auto", "--max-memory", "cpu=lots", "--out", "{ws}/o"], 2,
     "not a size", None),
    ("place-max-memory-bad-device", None, ["eval", M, "--n", 1, "--device-map", "auto", "--max-memory", "ram=2GiB"], 2,
     "unknown device 'ram'", None),
    ("place-max-memory-alone", None, ["calibrate", M, *CAL, "--max-memory", "cpu=2GiB", "--out", "{ws}/R.safetensors"], 2,
     "go with --device-map", None),
    ("place-offload-in-model", None, ["calibrate", M, *CAL, "--device-map", "auto", "--offload-folder", "{m}/off",
                                      "--out", "{ws}/R.safetensors"], 2, "is inside the input", None),
    ("place-grad-checkpoint-no-fisher", None, ["calibrate", M, *CAL, "--no-fisher", "--grad-checkpoint", "--out", "{ws}/R.safetensors"], 2,
     "--grad-checkpoint", None),
    ("place-compress-replace", None, ["compress", M, *CAL, "--granularity", "replace", "--device-map", "auto", "--out", "{ws}/o"], 2,
     "one device in one process", None),
    ("place-finetune-disk", lambda ws: (_sft(ws), (ws / "dm.json").write_text('{"model": "cpu", "lm_head": "disk"}')),
     ["finetune", M, "--data", "{ws}/sft.jsonl", "--device-map", "{ws}/dm.json", "--offload-folder", "{ws}/off", "--out", "{ws}/o"], 2,
     "cannot train weights offloaded", None),
    # models larger than memory: layer-by-layer calibration and streaming apply
    ("seq-with-device-map", None, ["calibrate", M, *CAL, "--sequential", "--device-map", "auto", "--out", "{ws}/R.safetensors"], 2,
     "loads one layer at a time itself", None),
    ("seq-with-grad-magnitude", None, ["calibrate", M, *CAL, "--sequential", "--grad-magnitude", "--out", "{ws}/R.safetensors"], 2,
     "forward statistics only", None),
    ("seq-compress-fisher", None, ["compress", M, *CAL, "--sequential", "--out", "{ws}/o"], 2, "needs gradients", None),
    ("seq-on-compressed", lambda ws: _compressed(ws), ["calibrate", "{ws}/small", *CAL, "--sequential", "--no-fisher",
                                                       "--out", "{ws}/R.safetensors"], 2, "calibrate the original model", None),
    ("stream-replace-plan", None, ["compress", M, *CAL, "--granularity", "replace", "--streaming", "--out", "{ws}/o"], 2,
     "drop --sequential/--streaming", None),
    ("stream-on-cuda", None, ["apply", M, "--plan", PLAN, "--out", "{ws}/o", "--streaming", "--device", "cuda"], 2, "--device", None),
    ("stream-missing-shard", lambda ws: _sharded_without_one(ws), ["apply", "{ws}/sharded", "--plan", PLAN, "--out", "{ws}/o",
                                                                   "--streaming"], 1, "is missing", None),
    # -- round 2: fine-tuning checkpoints live only in a folder moetrim made, never at an input -------------
    ("ckpt-model-is-out-checkpoints", _copy("m", "s.checkpoints"),
     ["finetune", "{ws}/s.checkpoints", *SFT, "--checkpoint-every", 1, *FT[2:], "--out", "{ws}/s"], 2, "is the input", None),
    ("ckpt-data-inside-out-checkpoints", _data("t.checkpoints/units.jsonl", GOOD_RECORD),
     [*FT, "--data", "{ws}/t.checkpoints/units.jsonl", "--checkpoint-every", 1, "--out", "{ws}/t"], 2, "contains the input", None),
    ("ckpt-foreign-folder", lambda ws: _mkdir_with(ws / "o.checkpoints"), [*FT, *SFT, "--checkpoint-every", 1, "--out", "{ws}/o"], 2,
     "not a checkpoints folder moetrim made", None),
    ("ckpt-foreign-folder-condenser", lambda ws: _mkdir_with(ws / "o.checkpoints"),
     [*FT, *SFT, "--method", "condenser", "--condensers", 1, "--checkpoint-every", 1, "--out", "{ws}/o"], 2,
     "not a checkpoints folder moetrim made", None),
    ("ckpt-foreign-folder-resume", lambda ws: (_mkdir_with(ws / "o.checkpoints"), (ws / "o.checkpoints" / "checkpoint-3").mkdir()),
     [*FT, *SFT, "--resume", "--out", "{ws}/o"], 2, "not a checkpoints folder moetrim made", None),
    ("ckpt-folder-is-a-file", lambda ws: (ws / "o.checkpoints").write_text("mine"), [*FT, *SFT, "--checkpoint-every", 1, "--out", "{ws}/o"],
     2, "not a checkpoints folder moetrim made", None),
    ("ckpt-every-negative", None, [*FT, *SFT, "--checkpoint-every", -1, "--out", "{ws}/o"], 2, "--checkpoint-every must be at least 0", None),
    ("ckpt-earlier-run-without-resume", _resume_state(), [*FT, *SFT, "--checkpoint-every", 1, "--out", "{ws}/o"], 2,
     "holds checkpoints of an earlier run", None),
    ("resume-max-steps-below-checkpoint", _resume_state(5), [*FT[:2], *SFT, "--resume", "--max-steps", 2, "--out", "{ws}/o"], 2,
     "is at step 5, past --max-steps 2", None),
    ("resume-truncated-state", _resume_state(2, lambda ck: _truncate(ck / "moetrim_state.safetensors")), RESUME, 1,
     "moetrim_state.safetensors is truncated or damaged", None),
    ("resume-truncated-optimizer", _resume_state(2, lambda ck: _truncate(ck / "optimizer.pt")), RESUME, 1,
     "optimizer.pt is truncated or damaged", None),
    ("resume-garbage-trainer-state", _resume_state(2, lambda ck: (ck / "trainer_state.json").write_text("{garbage")), RESUME, 1,
     "trainer_state.json is truncated or damaged", None),
    ("resume-trainer-state-step-text", _resume_state(2, lambda ck: (ck / "trainer_state.json").write_text('{"global_step": "two"}')),
     RESUME, 1, "not a step count", None),
    ("resume-no-model-state", _resume_state(2, lambda ck: (ck / "moetrim_state.safetensors").unlink()), RESUME, 2,
     "not a whole moetrim checkpoint", None),
    # -- every numeric option finite and in range, before any work (test_every_numeric_option_is_checked: all of them)
    ("finetune-lr-nan", None, [*FT, *SFT, "--lr", "nan", "--out", "{ws}/o"], 2, "--lr must be a finite number", None),
    ("finetune-lr-overflow", None, [*FT, *SFT, "--lr", "1e999", "--out", "{ws}/o"], 2, "--lr must be a finite number", None),
    ("finetune-weight-decay-inf", None, [*FT, *SFT, "--weight-decay", "inf", "--out", "{ws}/o"], 2, "--weight-decay must be a finite", None),
    ("finetune-gamma-nan", None, [*FT, *SFT, "--method", "auxfree", "--bias", "balance", "--gamma", "nan", "--out", "{ws}/o"], 2,
     "--gamma must be a finite", None),
    ("finetune-gamma-phase2-inf", None, [*FT, *SFT, "--method", "condenser", "--condensers", 1, "--gamma-phase2", "inf", "--out", "{ws}/o"],
     2, "--gamma-phase2 must be a finite", None),
    ("finetune-epochs-inf", None, [*FT[:2], *SFT, "--epochs", "inf", "--routing-tokens", 0, "--out", "{ws}/o"], 2,
     "--epochs must be a finite", None),
    ("finetune-warmup-nan", None, [*FT, *SFT, "--warmup", "nan", "--out", "{ws}/o"], 2, "--warmup must be a finite", None),
    ("finetune-routing-tokens-negative", None, [*FT[:4], "--routing-tokens", -1, *SFT, "--out", "{ws}/o"], 2,
     "--routing-tokens must be at least 0", None),
    ("finetune-seed-negative", None, [*FT, *SFT, "--seed", -1, "--out", "{ws}/o"], 2, "--seed must be between 0 and", None),
    ("finetune-seed-too-big", None, [*FT, *SFT, "--seed", 2**40, "--out", "{ws}/o"], 2, "--seed must be between 0 and", None),
    ("recover-kd-weight-nan", None, ["recover", "{ws}/rep", *SFT, "--teacher", M, "--steps", 1, "--kd-weight", "nan", "--out", "{ws}/o"],
     2, "--kd-weight must be a finite", None),
    ("recover-lr-inf", None, ["recover", "{ws}/rep", *SFT, "--teacher", M, "--steps", 1, "--lr", "inf", "--out", "{ws}/o"], 2,
     "--lr must be a finite", None),
    ("recover-steps-negative", None, ["recover", "{ws}/rep", *SFT, "--steps", -1, "--out", "{ws}/o"], 2, "--steps must be at least 1", None),
    ("recover-router-only-with-lora", None, ["recover", "{ws}/rep", *SFT, "--teacher", M, "--steps", 1, "--router-only", "--lora", 4,
                                             "--out", "{ws}/o"], 2, "--router-only trains the routers alone", None),
    ("compress-recover-lr-nan", None, ["compress", M, *CAL, *REPLACE, "--recover-steps", 1, "--recover-lr", "nan", "--out", "{ws}/o"],
     2, "--recover-lr must be a finite", None),
    ("compress-recover-steps-negative", None, ["compress", M, *CAL, *REPLACE, "--recover-steps", -1, "--out", "{ws}/o"], 2,
     "--recover-steps must be at least 0", None),
    ("place-max-memory-overflow", None, ["calibrate", M, *CAL, "--device-map", "auto", "--max-memory", "cpu=1e999GiB",
                                         "--out", "{ws}/R.safetensors"], 2, "'1e999GiB' is not a size", None),
    ("tasks-n-huge", None, ["tasks", "units", "--n", 1_000_000_000, "--out", "{ws}/t.jsonl"], 2, "--n must be between 1 and 100,000", None),
    ("eval-n-huge", None, ["eval", M, "--n", 1_000_000_000], 2, "--n must be between 1 and 100,000", None),
    ("demo-eval-items-huge", None, ["demo", "--model", M, "--eval-items", 10**9, "--out", "{ws}/d"], 2, "--eval-items must be between", None),
    ("routing-max-tokens-one", None, ["routing", M, *CAL, "--max-tokens", 1], 2, "--max-tokens must be at least 2", None),
    # -- messages that name what to change -------------------------------------------------------------
    ("compress-unknown-granularity", None, ["compress", M, *CAL, "--granularity", "foo", "--out", "{ws}/o"], 2,
     "choose from dims, experts, replace, naive, merge, d2", None),
    ("plan-unknown-granularity", None, ["plan", M, "--profile", P, "--granularity", "foo", "--out", "{ws}/q.json"], 2,
     "choose from dims, experts, replace", None),
    ("compress-max-group-one", None, ["compress", M, *CAL, "--granularity", "replace", "--max-group", 1, "--out", "{ws}/o"], 2,
     "--max-group must be at least 2", None),
    ("plan-rank-outweighs-experts", None, ["plan", M, "--profile", P, "--granularity", "replace", "--rank", 32, "--ratio", 0.1,
                                            "--out", "{ws}/q.json"], 2, "stores more than it removes", None),
    ("apply-plan-unknown-granularity", _unknown_granularity_plan, ["apply", M, "--plan", "{ws}/rp.json", "--out", "{ws}/o"], 2,
     "granularity 'foo' is not one moetrim knows", None),
    ("eval-json-exists-says-overwrite", None, ["eval", M, "--n", 1, "--json", "{ws}/other/config.json"], 2,
     "choose another --json or pass --overwrite", None),
    # -- reports replace only moetrim's own reports; offload folders apart from inputs and outputs -------------
    ("eval-json-overwrite-other-model-config", None, ["eval", M, "--n", 1, "--json", "{ws}/other/config.json", "--overwrite"], 2,
     "not a moetrim JSON report", None),
    ("eval-json-overwrite-foreign-json", lambda ws: (ws / "notes.json").write_text('{"a": 1}'),
     ["eval", M, "--n", 1, "--json", "{ws}/notes.json", "--overwrite"], 2, "not a moetrim JSON report", None),
    ("eval-lm-eval-json-other-model-config", None, ["eval", M, "--lm-eval", "moetrim", "--json", "{ws}/other/config.json", "--overwrite"],
     2, "not a moetrim JSON report", None),
    ("eval-json-in-include-path", lambda ws: (ws / "tasks").mkdir(), ["eval", M, "--lm-eval", "moetrim", "--include-path", "{ws}/tasks",
                                                                      "--json", "{ws}/tasks/r.json"], 2, "is inside the input", None),
    ("eval-json-under-a-file", None, ["eval", M, "--n", 1, "--json", "{ws}/calib.txt/r.json"], 2, "is a file, not a folder", None),
    ("routing-json-overwrite-other-model-config", None, ["routing", M, *CAL, "--json", "{ws}/other/config.json", "--overwrite"], 2,
     "not a moetrim JSON report", None),
    ("routing-json-is-data", None, ["routing", M, *CAL, "--json", "{ws}/calib.txt", "--overwrite"], 2, "is the input", None),
    ("routing-png-not-png", lambda ws: (ws / "r.png").write_text("not an image"), ["routing", M, *CAL, "--png", "{ws}/r.png", "--overwrite"],
     2, "not a moetrim PNG report", None),
    ("routing-png-foreign-png", _foreign_png, ["routing", M, *CAL, "--png", "{ws}/r.png", "--overwrite"], 2, "not a moetrim PNG report", None),
    ("routing-png-is-plan", None, ["routing", M, *CAL, "--png", "{ws}/p.json", "--overwrite"], 2, "not a moetrim PNG report", None),
    ("compress-offload-holds-data", _data("dd/calib.txt", " ".join(["the cat sat on a mat"] * 40)),
     ["compress", M, "--data", "{ws}/dd/calib.txt", "--seq-len", 32, "--device-map", "auto", "--max-memory", "cpu=100KB",
      "--offload-folder", "{ws}/dd", "--out", "{ws}/o"], 2, "contains the input", None),
    ("compress-offload-is-out", None, ["compress", M, *CAL, "--device-map", "auto", "--offload-folder", "{ws}/o", "--out", "{ws}/o"], 2,
     "is --out", None),
    ("compress-offload-inside-out", None, ["compress", M, *CAL, "--device-map", "auto", "--offload-folder", "{ws}/o/off",
                                           "--out", "{ws}/o"], 2, "is inside --out", None),
    ("eval-offload-is-json", None, ["eval", M, "--n", 1, "--json", "{ws}/r.json", "--device-map", "auto", "--offload-folder", "{ws}/r.json"],
     2, "is --json", None),
    ("finetune-offload-is-checkpoints", None, [*FT, *SFT, "--checkpoint-every", 1, "--device-map", "auto", "--offload-folder",
                                               "{ws}/o.checkpoints", "--out", "{ws}/o"], 2, "checkpoints folder", None),
    ("calibrate-offload-is-a-file", None, ["calibrate", M, *CAL, "--device-map", "auto", "--offload-folder", "{ws}/p.json",
                                           "--out", "{ws}/R.safetensors"], 2, "is a file", None),
    # -- data: one validated reader for .jsonl and .txt, one line naming the file and line ----------------
    ("finetune-jsonl-not-utf8", _data("bad.jsonl", NOT_UTF8), [*FT, *BAD, "--out", "{ws}/o"], 2, "bad.jsonl:2: not UTF-8", None),
    ("finetune-jsonl-lone-surrogate", _data("bad.jsonl", SURROGATE), [*FT, *BAD, "--out", "{ws}/o"], 2, "bad.jsonl:2: a string holds \\ud800", None),
    ("finetune-jsonl-deep", _data("bad.jsonl", DEEP), [*FT, *BAD, "--out", "{ws}/o"], 2, "bad.jsonl:2: JSON nested too deeply", None),
    ("finetune-jsonl-wrong-type", _data("bad.jsonl", WRONG_TYPE), [*FT, *BAD, "--out", "{ws}/o"], 2, "bad.jsonl:2: a record with 'prompt'", None),
    ("finetune-condenser-jsonl-deep", _data("bad.jsonl", DEEP), [*FT, *BAD, "--method", "condenser", "--condensers", 1, "--out", "{ws}/o"],
     2, "bad.jsonl:2: JSON nested too deeply", None),
    ("recover-jsonl-lone-surrogate", _data("bad.jsonl", SURROGATE), ["recover", "{ws}/rep", *BAD, "--teacher", M, "--steps", 1,
                                                                     "--out", "{ws}/o"], 2, "bad.jsonl:2: a string holds", None),
    ("recover-jsonl-not-utf8", _data("bad.jsonl", NOT_UTF8), ["recover", "{ws}/rep", *BAD, "--teacher", M, "--steps", 1, "--out", "{ws}/o"],
     2, "bad.jsonl:2: not UTF-8", None),
    ("routing-jsonl-deep", _data("bad.jsonl", DEEP), ["routing", M, *BAD], 2, "bad.jsonl:2: JSON nested too deeply", None),
    ("routing-jsonl-not-utf8", _data("bad.jsonl", NOT_UTF8), ["routing", M, *BAD], 2, "bad.jsonl:2: not UTF-8", None),
    ("calibrate-jsonl-lone-surrogate", _data("bad.jsonl", SURROGATE), ["calibrate", M, *BAD, "--out", "{ws}/R.safetensors"], 2,
     "bad.jsonl:2: a string holds", None),
    ("calibrate-txt-not-utf8-line", _data("bad.txt", b"fine words\n\nw\xffrld\n"), ["calibrate", M, "--data", "{ws}/bad.txt",
                                                                                  "--out", "{ws}/R.safetensors"], 2, "bad.txt:3: not UTF-8", None),
    ("compress-data-deep", _data("bad.jsonl", DEEP), ["compress", M, *BAD, "--out", "{ws}/o"], 2, "bad.jsonl:2: JSON nested too deeply", None),
    ("compress-recover-data-not-utf8", _data("bad.jsonl", NOT_UTF8), ["compress", M, *CAL, *REPLACE, "--recover-steps", 1,
                                                                      "--recover-data", "{ws}/bad.jsonl", "--out", "{ws}/o"], 2,
     "bad.jsonl:2: not UTF-8", None),
    ("compress-recover-data-lone-surrogate", _data("bad.jsonl", SURROGATE), ["compress", M, *CAL, *REPLACE, "--recover-steps", 1,
                                                                             "--recover-data", "{ws}/bad.jsonl", "--out", "{ws}/o"], 2,
     "bad.jsonl:2: a string holds", None),
    # -- truncated weights of every moetrim format, in every command that loads them ---------------------------
    ("replaced-truncated-eval", lambda ws: _truncate(ws / "rep" / "model.safetensors"), ["eval", "{ws}/rep", "--n", 1], 1,
     "rep/model.safetensors: it is truncated", None),
    ("replaced-truncated-routing", lambda ws: _truncate(ws / "rep" / "model.safetensors"), ["routing", "{ws}/rep", *CAL], 1,
     "it is truncated", None),
    ("replaced-truncated-recover", lambda ws: _truncate(ws / "rep" / "model.safetensors"),
     ["recover", "{ws}/rep", *SFT, "--teacher", M, "--steps", 1, "--out", "{ws}/o"], 1, "it is truncated", None),
    ("replaced-truncated-finetune", lambda ws: _truncate(ws / "rep" / "model.safetensors"), ["finetune", "{ws}/rep", *SFT, *FT[2:],
                                                                                               "--out", "{ws}/o"], 1, "it is truncated", None),
    ("replaced-truncated-as-base", lambda ws: _truncate(ws / "rep" / "model.safetensors"), ["routing", M, *CAL, "--base", "{ws}/rep"], 1,
     "it is truncated", None),
    ("replaced-random-bytes", lambda ws: _random_bytes(ws / "rep" / "model.safetensors"), ["eval", "{ws}/rep", "--n", 1], 1,
     "not a safetensors file", None),
    ("routed-truncated-eval", lambda ws: _truncate(ws / "rt" / "model.safetensors"), ["eval", "{ws}/rt", "--n", 1], 1, "it is truncated", None),
    ("routed-truncated-finetune", lambda ws: _truncate(ws / "rt" / "model.safetensors"), ["finetune", "{ws}/rt", *SFT, *FT[2:],
                                                                                             "--out", "{ws}/o"], 1, "it is truncated", None),
    ("varwidth-truncated-eval", lambda ws: _truncate(ws / "vw" / "model.safetensors"), ["eval", "{ws}/vw", "--n", 1], 1, "it is truncated", None),
    ("varwidth-truncated-routing", lambda ws: _truncate(ws / "vw" / "model.safetensors"), ["routing", "{ws}/vw", *CAL], 1,
     "it is truncated", None),
]


def _compressed(ws: Path) -> None:
    from moetrim.apply.slicing import apply_plan
    from moetrim.checkpoint import load_model, load_tokenizer, save_checkpoint
    from moetrim.plan import load_plan

    model = load_model(ws / "m")
    apply_plan(model, load_plan(ws / "p.json"))
    save_checkpoint(model, ws / "small", tokenizer=load_tokenizer(ws / "m"))


def _sharded_without_one(ws: Path) -> None:
    from moetrim.checkpoint import load_model

    load_model(ws / "m").save_pretrained(ws / "sharded", max_shard_size="30KB")
    shards = sorted((ws / "sharded").glob("model-*.safetensors"))
    shards[len(shards) // 2].unlink()


def _fill(arg, ws: Path) -> str:
    return str(arg).format(ws=ws, m=ws / "m", P=ws / "P.safetensors", p=ws / "p.json")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path):
    name, setup, args, code, text, cwd = case
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    shutil.copy(ws / "P.safetensors", ws / "P2.safetensors")
    if setup is not None:
        setup(ws)
    before = snapshot(tmp_path)
    got, stdout, stderr = cli(*[_fill(a, ws) for a in args], cwd=Path(_fill(cwd, ws)) if cwd else None)
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert got == code, f"exit {got}, wanted {code}: {stderr}"
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert text in lines[0].replace(str(tmp_path), "WS"), lines[0]
    assert "Traceback" not in stderr + stdout and "internal error" not in stderr
    assert snapshot(tmp_path) == before  # nothing written, moved or deleted; every input byte as it was


def _numeric_options():
    """(command, option, int or float, the command's function) for every numeric option of the app."""
    import inspect
    import typing

    from moetrim.cli.ranges import option_names

    for info in app.registered_commands:
        fn = inspect.unwrap(info.callback)
        hints = typing.get_type_hints(fn)
        for param, flag in option_names(fn).items():
            kind = hints[param]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            if kind in (int, float):
                yield info.name or fn.__name__, flag, kind, fn


def _required(fn, skip: str) -> list[str]:
    """Placeholder values for the command's required arguments and options: the range check comes first."""
    import inspect

    import typer.models

    args = []
    for name, p in inspect.signature(fn).parameters.items():
        info = p.default
        if isinstance(info, typer.models.ArgumentInfo) and info.default is ...:
            args.append("x")
        elif isinstance(info, typer.models.OptionInfo) and info.default is ... and info.param_decls[0] != skip:
            args += [info.param_decls[0], "x"]
    return args


NUMERIC = list(_numeric_options())


def test_every_numeric_option_has_a_range():
    from moetrim.cli.ranges import RANGES

    assert len(NUMERIC) > 50
    assert [(c, f) for c, f, _, _ in NUMERIC if f not in RANGES] == []


@pytest.mark.parametrize("command, flag, kind, fn", NUMERIC, ids=[f"{c}{f}" for c, f, _, _ in NUMERIC])
def test_every_numeric_option_is_checked(command, flag, kind, fn, tmp_path):
    """nan and ±inf for every float option, and one past each end of every option's range: exit 2, one
    line naming the option, before any work (nothing written)."""
    from moetrim.cli.ranges import RANGES

    bounds = RANGES[flag]
    bad = ["nan", "inf", "-inf"] if kind is float else []
    if bounds.low is not None:
        bad.append(str(bounds.low if bounds.low_open else bounds.low - (1 if kind is int else 1e-9)))
    if bounds.high is not None:
        bad.append(str(bounds.high if bounds.high_open else bounds.high + (1 if kind is int else 1e-9)))
    for value in [b.removesuffix(".0") if kind is int else b for b in bad]:
        code, stdout, stderr = cli(command, *_required(fn, flag), flag, value, cwd=tmp_path)
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} must be"), (value, stderr)
        assert list(tmp_path.iterdir()) == []
