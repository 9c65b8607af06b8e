"""The second bundled model, ``reference-longtail``: recipe, mixture, tokenizer, loading by name, training script.

Nothing here depends on the model's training: until its weights are in the repository the loading
tests build the recipe's architecture with random weights into a temporary folder (and point the
bundled name there); once they are, the real asset is what gets loaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import moetrim
from moetrim.assets import BUNDLED, REFERENCE_DIR, bundled_names, reference_model, resolve_model_path, trained_domains
from moetrim.cli import app
from moetrim.data.tasks import DOMAINS, TASK_DOMAINS, get_items
from moetrim.errors import MoetrimError, UsageError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import reference_recipes as recipes  # noqa: E402

LONGTAIL = recipes.LONGTAIL
SKILLS = recipes.skills(LONGTAIL)
ASSET = BUNDLED["longtail"]
TRAINED = (ASSET / "model.safetensors").is_file()


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def bpe():
    return recipes.build_tokenizer(dict(LONGTAIL))


@pytest.fixture(scope="module")
def longtail(tmp_path_factory, bpe):
    """The folder ``reference-longtail`` names: the trained asset, or else the recipe with random weights."""
    if TRAINED:
        yield ASSET
        return
    folder = tmp_path_factory.mktemp("longtail")
    torch.manual_seed(0)
    model = recipes.build_model(bpe, dict(LONGTAIL))
    model.to(torch.bfloat16).save_pretrained(folder)
    bpe.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"model": "longtail", "skills": SKILLS, "finetune_domain": "dates",
                                                       "random_weights": True}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BUNDLED, "longtail", folder)
        yield folder


# ------------------------------------------------------------------------------------------- recipe

def test_architecture_is_a_fine_grained_qwen3_moe_small_enough_to_bundle(bpe) -> None:
    model = recipes.build_model(bpe, dict(LONGTAIL))
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and cfg.norm_topk_prob and not getattr(cfg, "shared_expert_intermediate_size", 0)
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4 and cfg.num_hidden_layers >= 6
    assert cfg.moe_intermediate_size % 16 == 0 and not cfg.mlp_only_layers and cfg.decoder_sparse_step == 1
    assert sum(p.numel() for p in model.parameters()) * 2 <= 40 * 2**20  # bf16 bytes
    assert LONGTAIL["save_dtype"] == "bfloat16"


def test_mixture_is_pinned_and_long_tailed() -> None:
    shares = LONGTAIL["token_shares"]
    assert shares == {"code": 0.27, "math": 0.20, "strings": 0.14, "knowledge": 0.11, "sorting": 0.09,
                      "units": 0.08, "cipher": 0.065, "calendar": 0.025, "people": 0.02}
    assert abs(sum(shares.values()) - 1) < 1e-9 and len(shares) >= 8
    assert {"math", "knowledge", "code", "strings", "units"} <= set(shares) and set(shares) <= set(TASK_DOMAINS)
    assert sum(v <= 0.03 for v in shares.values()) >= 2 and max(shares.values()) / min(shares.values()) >= 10
    assert LONGTAIL["finetune_domain"] not in shares and SKILLS == [d for d in TASK_DOMAINS if d in shares]


def test_sampler_gives_each_skill_its_share_of_the_tokens(bpe) -> None:
    """Token shares, not item shares: the rare skills really get at most 3% of what the model reads."""
    import train_reference as tr

    hp = dict(LONGTAIL, train_items_per_domain={d: 800 for d in SKILLS})
    pools = {d: tr.encode(bpe, get_items(d, "train", None if d in tr.FACT_BASES else 800), hp["prompt_loss_weight"]) for d in SKILLS}
    weights = tr.item_weights(pools, hp)
    tokens = dict.fromkeys(SKILLS, 0)
    batches = tr.make_batches(pools, weights, hp, __import__("random").Random(0))
    for _ in range(1500):
        for seq, _w, i in next(batches):
            tokens[SKILLS[i]] += len(seq)
    total = sum(tokens.values())
    for d in SKILLS:
        assert abs(tokens[d] / total - hp["token_shares"][d]) <= 0.01 + 0.1 * hp["token_shares"][d], (d, tokens[d] / total)
    assert sum(tokens[d] / total <= 0.031 for d in SKILLS) >= 2


def test_first_models_recipe_is_the_one_that_made_it() -> None:
    """`--model reference` trains today's recipe: its hyperparameters (with the continued run's overrides,
    REFERENCE_CONTINUED) and tokenizer are the bundled model's."""
    from transformers import AutoTokenizer

    recorded = json.loads((REFERENCE_DIR / "training.json").read_text())["hyperparameters"]
    recipe = json.loads(json.dumps({**recipes.REFERENCE, **recipes.REFERENCE_CONTINUED}))
    assert {k: v for k, v in recorded.items() if k != "threads"} == {k: v for k, v in recipe.items() if k in recorded and k != "threads"}
    assert recipes.skills(recipes.REFERENCE) == list(DOMAINS)
    built = recipes.build_tokenizer(dict(recipes.REFERENCE))
    assert built.get_vocab() == AutoTokenizer.from_pretrained(REFERENCE_DIR).get_vocab()


@pytest.mark.skipif(not TRAINED, reason="the long-tail weights are not in this checkout")
def test_longtail_recipe_is_the_one_that_made_the_bundled_weights() -> None:
    """`--model longtail` trains today's recipe: the bundled training.json records exactly its hyperparameters."""
    recorded = json.loads((ASSET / "training.json").read_text())["hyperparameters"]
    recipe = json.loads(json.dumps(LONGTAIL))
    assert {k: v for k, v in recorded.items() if k != "threads"} == {k: v for k, v in recipe.items() if k != "threads"}


# ---------------------------------------------------------------------------------------- tokenizer

def test_bpe_tokenizer_round_trips_every_domain_and_splits_digits(bpe, tmp_path) -> None:
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) <= LONGTAIL["vocab_size"] and tok.bos_token_id is not None and tok.pad_token_id is not None
    for domain in [*SKILLS, LONGTAIL["finetune_domain"]]:
        for split in ("train", "calib", "eval"):
            for it in get_items(domain, split, 60):
                ids = tok(it.text).input_ids
                assert tok.decode(ids, skip_special_tokens=True) == it.text
                prompt = tok(it.prompt).input_ids
                assert ids[: len(prompt)] == prompt  # answers start on a token boundary
                pieces = [tok.decode([i]) for i in ids]
                assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
    # a number is the same tokens wherever it stands: after a space (code's `A: 2`) as after `=` (math's `8-6=2.`)
    assert tok("A: 42").input_ids[-2:] == tok("8-6=42.").input_ids[-3:-1]
    assert tok.decode(tok("Q: z\u00e9\u4e2d 12\nA:").input_ids, skip_special_tokens=True) == "Q: z\u00e9\u4e2d 12\nA:"  # byte-level
    assert recipes.build_tokenizer(dict(LONGTAIL)).backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()  # deterministic
    if TRAINED:
        assert AutoTokenizer.from_pretrained(ASSET).get_vocab() == tok.get_vocab()


# ------------------------------------------------------------------------------------------ by name

def test_bundled_names_resolve_and_unknown_ones_fail_in_one_line(longtail) -> None:
    assert bundled_names() == ["reference", "reference-longtail"]
    assert resolve_model_path("reference") == REFERENCE_DIR
    assert resolve_model_path("reference-longtail") == longtail
    assert resolve_model_path("some/dir") == Path("some/dir")
    with pytest.raises(UsageError) as err:
        resolve_model_path("reference-nosuch")
    assert "\n" not in str(err.value) and "reference, reference-longtail" in str(err.value)
    code, text = run("eval", "reference-nosuch", "--n", 1)
    assert code == 2 and "reference, reference-longtail" in text and len(text.strip().splitlines()) == 1, text
    assert trained_domains(longtail) == SKILLS and trained_domains(REFERENCE_DIR) == list(DOMAINS)


def test_untrained_bundled_model_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(BUNDLED, "longtail", tmp_path / "empty")
    with pytest.raises(MoetrimError, match="train_reference.py --model longtail"):
        resolve_model_path("reference-longtail")
    with pytest.raises(FileNotFoundError, match="train_reference.py --model longtail"):
        reference_model("longtail")


def test_reference_model_loads_either_by_name(longtail) -> None:
    model, tok = reference_model("longtail")
    assert model.config.model_type == "qwen3_moe" and not model.training and next(model.parameters()).dtype == torch.float32
    again, _ = moetrim.reference_model("reference-longtail", dtype=torch.bfloat16)
    assert next(again.parameters()).dtype == torch.bfloat16
    first, _ = reference_model()
    assert first.config.model_type == "qwen2_moe"
    old_style, _ = reference_model(torch.bfloat16)  # the first signature: reference_model(dtype)
    assert old_style.config.model_type == "qwen2_moe" and next(old_style.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bundled models"):
        reference_model("nosuch")
    ids = tok("Q: Sort 3 1 2.\nA:", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_eval_all_is_every_skill_the_model_was_trained_on(longtail, tmp_path) -> None:
    code, text = run("eval", "reference-longtail", "--tasks", "all", "--n", 2, "--json", tmp_path / "e.json")
    assert code == 0, text
    assert list(json.loads((tmp_path / "e.json").read_text())["accuracy"]) == SKILLS
    code, text = run("eval", "reference-longtail", "--tasks", "dates", "--n", 2)
    assert code == 0 and "dates" in text, text


def test_compress_and_finetune_take_the_bundled_name(longtail, tmp_path) -> None:
    from moetrim.data.tasks import calibration_texts, to_sft_records

    data = tmp_path / "calib.txt"
    data.write_text("\n\n".join(calibration_texts(SKILLS, n_per_domain=2)))
    code, text = run("compress", "reference-longtail", "--data", data, "--ratio", 0.5, "--seq-len", 64, "--out", tmp_path / "c")
    assert code == 0, text
    assert moetrim.load(tmp_path / "c").config.num_experts == LONGTAIL["num_experts"]
    sft = tmp_path / "dates.jsonl"
    sft.write_text("\n".join(json.dumps(r) for r in to_sft_records(get_items("dates", "train", 16))))
    code, text = run("finetune", "reference-longtail", "--data", sft, "--max-steps", 2, "--batch-size", 4,
                     "--out", tmp_path / "ft", "--quiet")
    assert code == 0, text
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------- training script

def _train(tmp_path: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    items = json.dumps({d: 300 for d in SKILLS})
    cmd = [sys.executable, str(REPO / "scripts" / "train_reference.py"), "--model", "longtail", "--threads", "1", "--steps", "6",
           "--eval-n", "2", "--ckpt-minutes", "0", "--ckpt-dir", str(tmp_path / f"ck-{out}"), "--out", str(tmp_path / out),
           "--set", f"train_items_per_domain={items}", "--set", "tokens_per_batch=512", "--set", "eval_every=0",
           "--set", "warmup_steps=2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})


def test_training_resumes_to_the_same_weights_and_records_its_recipe(tmp_path) -> None:
    from safetensors.torch import load_file

    whole = _train(tmp_path, "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = _train(tmp_path, "parts", "--stop-after", "3")
    assert part.returncode == 0 and "continue with --resume" in part.stdout and not (tmp_path / "parts").exists(), part.stdout
    rest = _train(tmp_path, "parts", "--resume")
    assert rest.returncode == 0 and "[resume] from" in rest.stdout and "at step 3" in rest.stdout, rest.stdout[-2000:]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    record = json.loads((tmp_path / "whole" / "training.json").read_text())
    assert record["skills"] == SKILLS and record["finetune_domain"] == "dates" and record["threads"] == 1
    assert set(record["calib_split_eval"]["accuracy"]) == set(SKILLS) and record["tokens_seen"] > 0
    assert abs(sum(record["skill_token_shares"].values()) - 1) < 0.01 and record["train_seconds"] > 0
    other = _train(tmp_path, "parts", "--resume", "--set", "lr=0.001")  # a checkpoint of other settings is refused
    assert other.returncode != 0 and re.search(r"other settings \(lr\)", other.stderr + other.stdout)
