#!/usr/bin/env python
"""Train moetrim's reference Mixture-of-Experts model on the task suite (CPU, deterministic).

No pretrained MoE checkpoint can be downloaded where moetrim is developed, so the project ships its own
small one: a real ``transformers`` Qwen2-MoE (routed experts + gated shared expert, like Qwen1.5-MoE) with
a small word-level tokenizer, trained from scratch on the train splits of every task domain. Compression
is then judged by how much of its task accuracy survives.

Determinism: fixed seeds, a fixed data order, ``torch.use_deterministic_algorithms(True)`` and a fixed
thread count. Rerunning with the same torch/transformers versions reproduces the weights.

    python scripts/train_reference.py                  # writes src/moetrim/assets/reference/
    python scripts/train_reference.py --steps 300 --out /tmp/ref-smoke   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

# Sleep instead of spin in OpenMP barriers: on a shared 2-core box, spinning threads of two torch processes
# starve each other (measured ~5x slowdown); passive waiting costs almost nothing when the box is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moetrim.data.tasks import DOMAINS, TaskItem, get_items, vocabulary_words  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402

DEFAULT_OUT = REPO / "src" / "moetrim" / "assets" / "reference"

HPARAMS: dict = {
    "seed": 0,
    "threads": 2,
    # model
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,  # wide enough that half the dims can go
    "shared_expert_intermediate_size": 128,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.01,
    "rope_theta": 10000.0,
    "initializer_range": 0.06,
    "max_position_embeddings": 256,
    # data
    "train_items_per_domain": {"math": 150_000, "code": 150_000, "strings": 120_000},  # knowledge: all
    "domain_weights": {"math": 0.28, "knowledge": 0.12, "code": 0.32, "strings": 0.28},
    "prompt_loss_weight": 0.1,  # answers carry the task; a little prompt loss keeps it a sane LM
    # optimisation
    "steps": 7000,
    "tokens_per_batch": 2048,  # padded tokens per step (batches are length-bucketed)
    "lr": 2e-3,
    "min_lr_ratio": 0.05,
    "warmup_steps": 200,
    "weight_decay": 0.05,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
    "experts_implementation": "grouped_mm",
    # reporting
    "eval_every": 1000,
    "eval_probe_n": 64,
}

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the suite's own vocabulary, falling back to single characters.

    Template words, names and facts (``vocabulary_words()``, with and without a leading space) are one
    token each; everything else -- digits, code, the random strings of the strings domain, any other
    ASCII -- is one token per character. That keeps items short (~15-55 tokens) while arithmetic and
    letter manipulation still see individual digits and letters.
    """
    words = vocabulary_words()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    for word in words:
        vocab[word] = len(vocab)
        vocab[" " + word] = len(vocab)
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
    # A whole vocabulary word (optionally with its leading space) or else any single character.
    pattern = rf" ?(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])|[\s\S]"
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast, hp: dict) -> torch.nn.Module:
    cfg = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp["hidden_size"],
        intermediate_size=4 * hp["hidden_size"],  # unused: every layer is sparse
        num_hidden_layers=hp["num_hidden_layers"],
        num_attention_heads=hp["num_attention_heads"],
        num_key_value_heads=hp["num_key_value_heads"],
        max_position_embeddings=hp["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": hp["rope_theta"]},
        initializer_range=hp["initializer_range"],
        num_experts=hp["num_experts"],
        num_experts_per_tok=hp["num_experts_per_tok"],
        moe_intermediate_size=hp["moe_intermediate_size"],
        shared_expert_intermediate_size=hp["shared_expert_intermediate_size"],
        norm_topk_prob=hp["norm_topk_prob"],
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,  # training asks for router logits explicitly; inference should not pay
        router_aux_loss_coef=hp["router_aux_loss_coef"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.set_experts_implementation(hp["experts_implementation"])
    return model


def encode(tokenizer: PreTrainedTokenizerFast, items: list[TaskItem], prompt_w: float) -> list[tuple]:
    """(token ids of ``item.text``, per-token loss weight) per item: answer 1.0, prompt ``prompt_w``."""
    prompts = tokenizer([it.prompt for it in items]).input_ids
    answers = tokenizer([it.completion for it in items], add_special_tokens=False).input_ids
    out = []
    for prompt, answer in zip(prompts, answers):
        # weight[t] scales the loss of predicting ids[t] (from position t-1); bos is never predicted.
        out.append((prompt + answer, [0.0] + [prompt_w] * (len(prompt) - 1) + [1.0] * len(answer)))
    return out


def training_pools(tokenizer: PreTrainedTokenizerFast, hp: dict) -> dict[str, list[tuple]]:
    """Encoded train items of every domain (knowledge: all of them, it is a fixed fact base)."""
    pools: dict[str, list[tuple]] = {}
    for domain in DOMAINS:
        n = hp["train_items_per_domain"].get(domain)
        t0 = time.time()
        items = get_items(domain, "train", n, seed=hp["seed"])
        pools[domain] = encode(tokenizer, items, hp["prompt_loss_weight"])
        print(f"[data] {domain}: {len(items)} train items ({time.time() - t0:.1f}s)", flush=True)
    return pools


def make_batches(pools: dict[str, list[tuple]], hp: dict, rng: random.Random):
    """Yield (ids, mask, weights, domain index) batches forever: weighted domain mix, length-bucketed, fixed order."""
    names = list(DOMAINS)
    weights = [hp["domain_weights"][d] for d in names]
    cursors = {d: 0 for d in names}
    orders = {d: list(range(len(pools[d]))) for d in names}
    for d in names:
        rng.shuffle(orders[d])
    budget = hp["tokens_per_batch"]
    while True:
        pool = []
        for d in rng.choices(names, weights=weights, k=budget // 2):  # ~a dozen batches per refill
            if cursors[d] == len(orders[d]):
                rng.shuffle(orders[d])
                cursors[d] = 0
            pool.append(pools[d][orders[d][cursors[d]]] + (names.index(d),))
            cursors[d] += 1
        pool.sort(key=lambda x: len(x[0]))
        batches, cur = [], []
        for ex in pool:
            if cur and (len(cur) + 1) * len(ex[0]) > budget:
                batches.append(cur)
                cur = []
            cur.append(ex)
        if cur:
            batches.append(cur)
        rng.shuffle(batches)
        for b in batches:
            width = max(len(ex[0]) for ex in b)
            ids = torch.zeros((len(b), width), dtype=torch.long)
            mask = torch.zeros((len(b), width), dtype=torch.long)
            w = torch.zeros((len(b), width), dtype=torch.float32)
            for row, (seq, wt, _) in enumerate(b):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                w[row, : len(seq)] = torch.tensor(wt)
            yield ids, mask, w, torch.tensor([ex[2] for ex in b])


def lr_at(step: int, hp: dict) -> float:
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    progress = (step - hp["warmup_steps"]) / max(1, hp["steps"] - hp["warmup_steps"])
    floor = hp["min_lr_ratio"]
    return hp["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(hp: dict, out_dir: Path, final_eval_n: int | None) -> dict:
    torch.manual_seed(hp["seed"])
    torch.set_num_threads(hp["threads"])
    torch.use_deterministic_algorithms(True)
    rng = random.Random(hp["seed"])
    start = time.time()

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] qwen2_moe, {n_params / 1e6:.2f}M parameters", flush=True)
    pools = training_pools(tokenizer, hp)
    batches = make_batches(pools, hp, rng)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"], betas=hp["betas"],
    )
    model.train()
    tokens_seen, t_log, loss_acc, aux_acc = 0, time.time(), 0.0, 0.0
    dom_nll = torch.zeros(len(DOMAINS), dtype=torch.float64)  # answer-token loss per domain, for the log
    dom_cnt = torch.zeros(len(DOMAINS), dtype=torch.float64)
    for step in range(hp["steps"]):
        ids, mask, w, dom = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, hp)
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        task_loss = (nll * w[:, 1:]).sum() / w[:, 1:].sum()
        loss = task_loss + hp["router_aux_loss_coef"] * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        with torch.no_grad():
            answer = (w[:, 1:] == 1.0).double()
            dom_nll.index_add_(0, dom, (nll.double() * answer).sum(1))
            dom_cnt.index_add_(0, dom, answer.sum(1))
        tokens_seen += int(mask.sum())
        loss_acc += float(task_loss.detach())
        aux_acc += float(out.aux_loss.detach())
        if (step + 1) % 100 == 0:
            per = " ".join(f"{d}={float(dom_nll[i] / max(dom_cnt[i], 1)):.3f}" for i, d in enumerate(DOMAINS))
            print(
                f"[train] step {step + 1}/{hp['steps']} loss {loss_acc / 100:.4f} aux {aux_acc / 100:.3f} "
                f"lr {lr_at(step, hp):.2e} answer-nll {per} | {(time.time() - t_log) / 100:.2f} s/step "
                f"elapsed {(time.time() - start) / 60:.1f} min",
                flush=True,
            )
            t_log, loss_acc, aux_acc = time.time(), 0.0, 0.0
            dom_nll.zero_()
            dom_cnt.zero_()
        if hp["eval_every"] and (step + 1) % hp["eval_every"] == 0 and step + 1 < hp["steps"]:
            probe = evaluate_tasks(model, tokenizer, list(DOMAINS), n=hp["eval_probe_n"], batch_size=48, split="calib")
            print("[probe] " + " ".join(f"{d}={a:.2f}" for d, a in probe["accuracy"].items()), flush=True)
            model.train()
    train_time = time.time() - start

    model.eval()
    # Reported on the calib split: the eval split is the test set of every benchmark, never seen here.
    result = evaluate_tasks(model, tokenizer, list(DOMAINS), n=final_eval_n, batch_size=64, split="calib")
    total_time = time.time() - start
    for d in DOMAINS:
        print(
            f"[final] {d}: accuracy {result['accuracy'][d]:.4f} perplexity {result['perplexity'][d]:.4f} "
            f"(n={result['n'][d]})",
            flush=True,
        )

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "hyperparameters": hp,
        "parameters": n_params,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_time, 1),
        "total_seconds": round(total_time, 1),
        "torch": torch.__version__,
        "calib_split_eval": result,
    }
    import transformers

    record["transformers"] = transformers.__version__
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[done] saved to {out_dir} in {total_time / 60:.1f} min", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=None, help="override the step count (smoke runs)")
    parser.add_argument("--eval-n", type=int, default=None, help="calib items per domain for the final report (default: 256)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a hyperparameter for experiments, e.g. --set lr=0.003")
    args = parser.parse_args(argv)
    hp = dict(HPARAMS)
    if args.steps is not None:
        hp["steps"] = args.steps
    for kv in args.set:
        key, value = kv.split("=", 1)
        if key not in hp:
            parser.error(f"unknown hyperparameter {key!r}")
        hp[key] = json.loads(value)
    train(hp, args.out, args.eval_n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
