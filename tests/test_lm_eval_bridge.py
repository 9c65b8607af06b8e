"""The lm-eval bridge: moetrim's task suite as lm-eval tasks, scored as `moetrim eval` scores it.

Without lm-eval installed (CI): the task files and their data against the suite, the package data, and
the one-line errors. With it (`pip install "moetrim[eval]"`): on the reference model, dense and
compressed to a variable-width and a standard checkpoint, `moetrim eval --lm-eval` equals `moetrim
eval` item by item; a rolling-perplexity task sees one BOS; generation fits the context.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moetrim.cli import app
from moetrim.data.tasks import DOMAINS, TASK_DOMAINS, calibration_texts, get_items
from moetrim.integrations.lm_eval import MISSING, TASKS_DIR, own_task_names

runner = CliRunner()
N = 16  # items per domain in the equality runs
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


class _Tagless(yaml.SafeLoader):
    """Reads lm-eval YAML without lm-eval: `!function x.y` becomes the string 'x.y'."""


_Tagless.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _yaml(name: str) -> dict:
    return yaml.load((TASKS_DIR / name).read_text(), Loader=_Tagless)


def _task_utils():
    spec = importlib.util.spec_from_file_location("moetrim_lm_eval_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- without lm-eval ------------------------------------------------------------------------------
def test_task_files_name_every_domain() -> None:
    want = {"moetrim"} | {f"moetrim_{d}" for d in TASK_DOMAINS} | {f"moetrim_{d}_ppl" for d in TASK_DOMAINS}
    assert set(own_task_names()) == want
    group = _yaml("moetrim.yaml")
    assert group["group"] == "moetrim"
    assert group["task"] == [f"moetrim_{d}" for d in DOMAINS] + [f"moetrim_{d}_ppl" for d in DOMAINS]  # 'all'
    for d in TASK_DOMAINS:
        gen, ppl = _yaml(f"moetrim_{d}.yaml"), _yaml(f"moetrim_{d}_ppl.yaml")
        assert (gen["task"], gen["include"], gen["dataset_kwargs"]) == (f"moetrim_{d}", "_moetrim_generate", {"domain": d})
        assert (ppl["task"], ppl["include"], ppl["dataset_kwargs"]) == (f"moetrim_{d}_ppl", "_moetrim_answer_ppl", {"domain": d})


def test_task_templates_score_as_moetrim_eval() -> None:
    from moetrim.assets import REFERENCE_DIR
    from moetrim.checkpoint import load_tokenizer

    gen, ppl = _yaml("_moetrim_generate"), _yaml("_moetrim_answer_ppl")
    assert gen["custom_dataset"] == ppl["custom_dataset"] == "utils.load"
    assert (gen["output_type"], gen["doc_to_text"], gen["doc_to_target"], gen["num_fewshot"]) == ("generate_until", "prompt", "answer", 0)
    assert gen["generation_kwargs"]["until"] == ["\n"] and gen["generation_kwargs"]["do_sample"] is False
    # exact match on the text with surrounding whitespace removed, as str.strip() in `moetrim eval`
    (metric,) = gen["metric_list"]
    assert metric["metric"] == "exact_match" and metric["regexes_to_ignore"] == ["^\\s+|\\s+$"]
    # loglikelihood of " answer\n" right after the prompt: what `moetrim eval` turns into perplexity
    assert (ppl["output_type"], ppl["doc_to_text"], ppl["doc_to_target"], ppl["target_delimiter"]) == \
        ("loglikelihood", "prompt", "completion", "")
    # the budget holds every reference answer with the slack `moetrim eval` gives (+8) and fits its context
    tok = load_tokenizer("reference")
    longest = max(len(tok(it.completion, add_special_tokens=False).input_ids) for d in TASK_DOMAINS for it in get_items(d, "eval"))
    context = json.loads((REFERENCE_DIR / "config.json").read_text())["max_position_embeddings"]
    assert longest + 8 <= gen["generation_kwargs"]["max_gen_toks"] < context


@pytest.mark.parametrize("domain", TASK_DOMAINS)
def test_task_data_is_the_eval_split(domain: str) -> None:
    recs = _task_utils().records(domain)
    items = get_items(domain, "eval")
    assert [r["prompt"] for r in recs] == [it.prompt for it in items]
    assert [r["answer"] for r in recs] == [it.answer for it in items]
    assert [r["completion"] for r in recs] == [it.completion for it in items]
    assert recs[:N] == _task_utils().records(domain, N)  # --n takes the first items, as `moetrim eval --n` does


def test_task_files_are_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moetrim"]
    pkg = ROOT / "src" / "moetrim"
    for f in TASKS_DIR.iterdir():
        if f.is_file() and f.suffix != ".pyc":
            rel = str(f.relative_to(pkg))
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_missing_lm_eval_is_one_line(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    code, _, stderr = cli("eval", "reference", "--lm-eval", "moetrim", "--n", 1)
    assert code == 1 and MISSING in _one_error_line(stderr)


@pytest.mark.parametrize("args, text", [
    (["--lm-eval", "moetrim_poetry"], "unknown lm-eval task 'moetrim_poetry'"),
    (["--lm-eval", " , "], "no lm-eval tasks given"),
    (["--lm-eval", "moetrim", "--tasks", "math"], "exclusive"),
    (["--include-path", "."], "--include-path applies to --lm-eval"),
    (["--lm-eval", "moetrim", "--include-path", "/nonexistent-moetrim-tasks"], "not a folder"),
])
def test_bad_lm_eval_input_is_one_line(args, text) -> None:
    code, _, stderr = cli("eval", "reference", *args)
    line = _one_error_line(stderr)
    assert code == 2 and text in line
    if "unknown" in text:
        assert "moetrim_math" in line and "lm-eval ls tasks" in line  # says how to see the names


# -- with lm-eval ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """reference (dense), a variable-width checkpoint (global 50%) and a standard one (uniform 50%)."""
    pytest.importorskip("lm_eval")
    ws = tmp_path_factory.mktemp("lm-eval-ckpts")
    (ws / "calib.txt").write_text("\n\n".join(calibration_texts(n_per_domain=16)) + "\n")
    for name, allocation in (("varwidth", "global"), ("standard", "uniform")):
        code, _, stderr = cli("compress", "reference", "--data", ws / "calib.txt", "--seq-len", 64, "--ratio", 0.5,
                              "--allocation", allocation, "--out", ws / name)
        assert code == 0, stderr
    fmt = {n: json.loads((ws / n / "config.json").read_text())["model_type"] for n in ("varwidth", "standard")}
    assert fmt == {"varwidth": "moetrim_varwidth", "standard": "qwen2_moe"}
    return {"reference": "reference", "varwidth": str(ws / "varwidth"), "standard": str(ws / "standard")}


def _moetrim_items(model, tok, domain: str) -> list[str]:
    from moetrim.evaluate.tasks_eval import _encode_pairs, greedy_generate

    items = get_items(domain, "eval", N)
    pairs = _encode_pairs(tok, items)
    return greedy_generate(model, tok, [p for p, _ in pairs], max(len(a) for _, a in pairs) + 8, N)


@pytest.mark.parametrize("which", ["reference", "varwidth", "standard"])
def test_bridge_equals_moetrim_eval(which, checkpoints, tmp_path) -> None:
    from moetrim.checkpoint import load_model, load_tokenizer
    from moetrim.evaluate.tasks_eval import evaluate_tasks
    from moetrim.integrations.lm_eval import evaluate_lm_eval

    path = checkpoints[which]
    model, tok = load_model(path), load_tokenizer(path)
    ours = evaluate_tasks(model, tok, list(DOMAINS), n=N, batch_size=N)
    theirs = evaluate_lm_eval(model, tok, ["moetrim"], limit=N, batch_size=N, keep_samples=True)
    assert theirs["accuracy"] == ours["accuracy"] and theirs["n"] == ours["n"]
    for d in DOMAINS:
        assert math.isclose(theirs["perplexity"][d], ours["perplexity"][d], rel_tol=1e-4), d
        # item by item: the same greedy text and the same verdict
        outputs = _moetrim_items(model, tok, d)
        samples = sorted(theirs["samples"][f"moetrim_{d}"], key=lambda s: s["doc_id"])
        assert [s["doc"]["prompt"] for s in samples] == [it.prompt for it in get_items(d, "eval", N)]
        assert [s["filtered_resps"][0].strip() for s in samples] == [o.strip() for o in outputs]
        assert [float(s["exact_match"]) for s in samples] == \
            [float(o.strip() == it.answer) for o, it in zip(outputs, get_items(d, "eval", N))]
    if which == "varwidth":  # the command line gives the same figures, into --json in `moetrim eval`'s shape
        code, stdout, stderr = cli("eval", path, "--lm-eval", "moetrim_math,moetrim_math_ppl", "--n", N, "--json", tmp_path / "r.json")
        assert code == 0, stderr
        res = json.loads((tmp_path / "r.json").read_text())
        assert res["accuracy"] == {"math": ours["accuracy"]["math"]} and res["n"] == {"math": N}
        assert math.isclose(res["perplexity"]["math"], ours["perplexity"]["math"], rel_tol=1e-4)
        assert "moetrim_math" in stdout and "exact_match" in stdout


_ROLLING_TASKS = {
    "utils.py": "import datasets\nfrom moetrim.data.tasks import get_items\n\n"
                "def load(**_):\n"
                "    rows = [{'text': it.text, 'prompt': it.prompt, 'answer': it.answer} for it in get_items('math', 'eval', 4)]\n"
                "    return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})\n",
    "roll_text.yaml": "task: roll_text\ndataset_path: x\ncustom_dataset: !function utils.load\noutput_type: loglikelihood_rolling\n"
                      "test_split: test\ndoc_to_text: ''\ndoc_to_target: text\nmetric_list:\n  - metric: word_perplexity\n",
    "long_gen.yaml": "task: long_gen\ndataset_path: x\ncustom_dataset: !function utils.load\noutput_type: generate_until\n"
                     "test_split: test\ndoc_to_text: prompt\ndoc_to_target: answer\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                     "  max_gen_toks: 4096\nmetric_list:\n  - metric: exact_match\n    regexes_to_ignore: ['^\\s+']\n",
    "mixed.yaml": "group: mixed\ntask:\n  - roll_text\n  - long_gen\n",
}


def test_rolling_perplexity_has_one_bos_and_generation_fits(tmp_path) -> None:
    pytest.importorskip("lm_eval")
    from moetrim.checkpoint import load_model, load_tokenizer
    from moetrim.integrations.lm_eval import evaluate_lm_eval

    for name, text in _ROLLING_TASKS.items():
        (tmp_path / name).write_text(text)
    model, tok = load_model("reference"), load_tokenizer("reference")
    # a group mixing rolling perplexity and generation; the generation task asks for 4096 new tokens
    res = evaluate_lm_eval(model, tok, ["mixed"], include_paths=[tmp_path], limit=4, batch_size=4, keep_samples=True)
    assert res["lm_eval"]["n"] == {"roll_text": 4, "long_gen": 4}
    assert res["lm_eval"]["results"]["long_gen"]["exact_match"] == 1.0  # asked 4096 new tokens of a 256 context: capped, right
    got = [s["filtered_resps"][0] for s in sorted(res["samples"]["roll_text"], key=lambda s: s["doc_id"])]
    for text, ll in zip((it.text for it in get_items("math", "eval", 4)), got):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        want = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())  # every token after the one <bos>
        assert math.isclose(ll, want, rel_tol=1e-4, abs_tol=1e-3), (ll, want)


def test_unknown_lm_eval_task_is_one_line(tmp_path) -> None:
    pytest.importorskip("lm_eval")
    code, _, stderr = cli("eval", "reference", "--lm-eval", "moetrim_math,no_such_task_anywhere", "--include-path", tmp_path)
    line = _one_error_line(stderr)
    assert code == 2 and "'no_such_task_anywhere'" in line and "lm-eval ls tasks" in line
    code, _, stderr = cli("eval", "reference", "--lm-eval", "moetrim,moetrim_math")  # lm-eval would refuse the duplicate
    assert code == 2 and "'moetrim_math' is asked for twice" in _one_error_line(stderr)
