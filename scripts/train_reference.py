#!/usr/bin/env python
"""Train one of moetrim's bundled reference MoE models on the task suite (CPU, deterministic, resumable).

No pretrained MoE checkpoint can be downloaded where moetrim is developed, so the project ships its own
small ones, real ``transformers`` checkpoints trained from scratch (recipes in ``reference_recipes.py``):

* ``--model reference``: the first, a Qwen2-MoE with a word-level tokenizer on four domains;
* ``--model longtail``: a fine-grained Qwen3-MoE with a byte-level BPE tokenizer on nine skills whose
  token shares fall off like a real corpus's.

Compression is then judged by how much of their task accuracy survives.

Determinism: fixed seeds, a data order that is a pure function of the seed, a fixed thread count and
``torch.use_deterministic_algorithms(True)``. A run writes a checkpoint every few minutes and
``--resume`` continues from the last one to the same weights an uninterrupted run gives (same threads).

    python scripts/train_reference.py --model longtail              # writes src/moetrim/assets/longtail/
    python scripts/train_reference.py --model longtail --resume     # after an interruption
    python scripts/train_reference.py --model reference --init-from reference --steps 6000 --set lr=0.001
    python scripts/train_reference.py --model longtail --steps 300 --out /tmp/smoke   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# Sleep instead of spin in OpenMP barriers: on a shared 2-core box, spinning threads of two torch processes
# starve each other (measured ~5x slowdown); passive waiting costs almost nothing when the box is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_recipes import RECIPES, build_model, build_tokenizer, skills  # noqa: E402

from moetrim.data.tasks import TaskItem, get_items  # noqa: E402
from moetrim.evaluate.tasks_eval import evaluate_tasks  # noqa: E402

ASSETS = REPO / "src" / "moetrim" / "assets"
FACT_BASES = ("knowledge", "people")  # every train item of these is used (a fixed set of facts)


def encode(tokenizer, items: list[TaskItem], prompt_w: float) -> list[tuple]:
    """(token ids of ``item.text``, per-token loss weight) per item: answer 1.0, prompt ``prompt_w``."""
    prompts = tokenizer([it.prompt for it in items]).input_ids
    answers = tokenizer([it.completion for it in items], add_special_tokens=False).input_ids
    out = []
    for prompt, answer in zip(prompts, answers):
        # weight[t] scales the loss of predicting ids[t] (from position t-1); bos is never predicted.
        out.append((prompt + answer, [0.0] + [prompt_w] * (len(prompt) - 1) + [1.0] * len(answer)))
    return out


def training_pools(tokenizer, hp: dict) -> dict[str, list[tuple]]:
    """Encoded train items of every skill (fact bases: all of them)."""
    pools: dict[str, list[tuple]] = {}
    for domain in skills(hp):
        n = None if domain in FACT_BASES else hp["train_items_per_domain"][domain]
        t0 = time.time()
        items = get_items(domain, "train", n, seed=hp["seed"])
        pools[domain] = encode(tokenizer, items, hp["prompt_loss_weight"])
        print(f"[data] {domain}: {len(items)} train items ({time.time() - t0:.1f}s)", flush=True)
    return pools


def item_weights(pools: dict[str, list[tuple]], hp: dict) -> dict[str, float]:
    """How often each skill's items are drawn: the recipe's item shares, or its token shares divided by
    the skill's mean item length (so that the skill gets that share of the tokens)."""
    if "token_shares" not in hp:
        return dict(hp["domain_weights"])
    return {d: hp["token_shares"][d] / (sum(len(ex[0]) for ex in pool) / len(pool)) for d, pool in pools.items()}


def make_batches(pools: dict[str, list[tuple]], weights: dict[str, float], hp: dict, rng: random.Random):
    """Yield lists of (ids, loss weights, skill index) forever: weighted skill mix, length-bucketed, a fixed
    order that depends on the seed only (so a resumed run replays it without training)."""
    names = list(pools)
    mix = [weights[d] for d in names]
    cursors = {d: 0 for d in names}
    orders = {d: list(range(len(pools[d]))) for d in names}
    for d in names:
        rng.shuffle(orders[d])
    budget = hp["tokens_per_batch"]
    while True:
        pool = []
        for d in rng.choices(names, weights=mix, k=budget // 2):  # ~a dozen batches per refill
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
        yield from batches


def collate(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
    width = max(len(ex[0]) for ex in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    w = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, (seq, wt, _) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        w[row, : len(seq)] = torch.tensor(wt)
    return ids, mask, w, torch.tensor([ex[2] for ex in batch])


def lr_at(step: int, hp: dict) -> float:
    if step < hp["warmup_steps"]:
        return hp["lr"] * (step + 1) / hp["warmup_steps"]
    progress = (step - hp["warmup_steps"]) / max(1, hp["steps"] - hp["warmup_steps"])
    floor = hp["min_lr_ratio"]
    return hp["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a run killed while saving leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def probe(model, tokenizer, names: list[str], n: int | None, batch_size: int) -> dict:
    # Calib split only: the eval split is the test set of every benchmark, never seen here.
    return evaluate_tasks(model, tokenizer, names, n=n, batch_size=batch_size, split="calib")


def train(hp: dict, out_dir: Path, ckpt: Path, resume: bool, init_from: Path | None, final_eval_n: int | None,
          ckpt_minutes: float, max_minutes: float | None, stop_after: int | None = None) -> dict | None:
    torch.manual_seed(hp["seed"])
    torch.set_num_threads(hp["threads"])
    torch.use_deterministic_algorithms(True)
    session_start = time.time()
    names = skills(hp)

    if init_from is not None:  # continue training given weights (same architecture, and their tokenizer)
        from moetrim.assets import resolve_model_path
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # The weights' own tokenizer, not one rebuilt from the recipe: a BPE's merges follow the corpus mixture,
        # so a continuation with other token shares would otherwise renumber every token under trained weights.
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(str(init_from)))
        model = build_model(tokenizer, hp)
        src = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(init_from)), dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        del src
    else:
        tokenizer = build_tokenizer(hp)
        model = build_model(tokenizer, hp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {model.config.model_type}, {n_params / 1e6:.2f}M parameters, {hp['threads']} threads", flush=True)
    pools = training_pools(tokenizer, hp)
    weights = item_weights(pools, hp)
    batches = make_batches(pools, weights, hp, random.Random(hp["seed"]))

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["lr"], betas=hp["betas"],
    )
    state = {"step": 0, "tokens_seen": 0, "skill_tokens": [0] * len(names), "train_seconds": 0.0, "probes": [], "sessions": []}
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        differ = sorted(k for k in set(saved["hp"]) | set(hp) if saved["hp"].get(k) != json.loads(json.dumps(hp)).get(k))
        if differ:
            raise SystemExit(f"{ckpt} was written with other settings ({', '.join(differ)}); give the same ones "
                             f"(--threads {saved['hp'].get('threads')}, ...) or start afresh without --resume")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        for _ in range(state["step"]):  # replay the data order up to where the checkpoint stopped
            next(batches)
        print(f"[resume] from {ckpt} at step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)", flush=True)
    elif resume:
        print(f"[resume] no checkpoint at {ckpt}: starting afresh", flush=True)

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"hp": json.loads(json.dumps(hp)), "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "state": state})
        print(f"[ckpt] step {state['step']} -> {ckpt}", flush=True)

    first_step = state["step"]
    model.train()
    t_seg, t_log, t_ckpt, loss_acc, aux_acc = time.time(), time.time(), time.time(), 0.0, 0.0
    dom_nll = torch.zeros(len(names), dtype=torch.float64)  # answer-token loss per skill, for the log
    dom_cnt = torch.zeros(len(names), dtype=torch.float64)
    while state["step"] < hp["steps"]:
        step = state["step"]
        ids, mask, w, dom = collate(next(batches))
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
            for i, n_tok in zip(dom.tolist(), mask.sum(1).tolist()):
                state["skill_tokens"][i] += n_tok
        state["tokens_seen"] += int(mask.sum())
        state["step"] = step = step + 1
        now = time.time()
        state["train_seconds"] += now - t_seg
        t_seg = now
        loss_acc += float(task_loss.detach())
        aux_acc += float(out.aux_loss.detach())
        if step % 100 == 0:
            per = " ".join(f"{d}={float(dom_nll[i] / max(dom_cnt[i], 1)):.3f}" for i, d in enumerate(names))
            print(f"[train] step {step}/{hp['steps']} loss {loss_acc / 100:.4f} aux {aux_acc / 100:.3f} "
                  f"lr {lr_at(step - 1, hp):.2e} answer-nll {per} | {(now - t_log) / 100:.2f} s/step "
                  f"trained {state['train_seconds'] / 60:.1f} min", flush=True)
            t_log, loss_acc, aux_acc = now, 0.0, 0.0
            dom_nll.zero_()
            dom_cnt.zero_()
        if hp["eval_every"] and step % hp["eval_every"] == 0 and step < hp["steps"]:
            acc = probe(model, tokenizer, names, hp["eval_probe_n"], 48)["accuracy"]
            state["probes"].append({"step": step, "train_minutes": round(state["train_seconds"] / 60, 2), "calib_accuracy": acc})
            print("[probe] " + " ".join(f"{d}={a:.2f}" for d, a in acc.items()), flush=True)
            model.train()
            t_seg = time.time()  # probing is not training time
        if ckpt_minutes > 0 and time.time() - t_ckpt >= ckpt_minutes * 60:
            checkpoint()
            t_ckpt = t_seg = time.time()
        out_of_time = max_minutes is not None and time.time() - session_start >= max_minutes * 60
        if (out_of_time or (stop_after is not None and step - first_step >= stop_after)) and step < hp["steps"]:
            checkpoint()
            print(f"[stop] {'--max-minutes' if out_of_time else '--stop-after'} reached at step {step}; continue with --resume", flush=True)
            return None
    if ckpt_minutes > 0:
        checkpoint()
    return finish(model, tokenizer, hp, state, names, n_params, out_dir, final_eval_n)


def finish(model, tokenizer, hp: dict, state: dict, names: list[str], n_params: int, out_dir: Path,
           final_eval_n: int | None) -> dict:
    """Round the weights to the saved dtype, score them on the calib split and write the checkpoint folder."""
    import transformers

    t0 = time.time()
    model.eval()
    dtype = getattr(torch, hp["save_dtype"])
    model.to(dtype)
    model.to(torch.float32)  # score exactly the weights that are saved
    result = probe(model, tokenizer, names, final_eval_n, 64)
    for d in names:
        print(f"[final] {d}: accuracy {result['accuracy'][d]:.4f} perplexity {result['perplexity'][d]:.4f} "
              f"(n={result['n'][d]})", flush=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.to(dtype)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    total = sum(state["skill_tokens"])
    record = {
        "model": hp["model"],
        "skills": names,
        "finetune_domain": hp.get("finetune_domain"),
        "hyperparameters": hp,
        "parameters": n_params,
        "tokens_seen": state["tokens_seen"],
        "skill_token_shares": {d: round(state["skill_tokens"][i] / max(total, 1), 4) for i, d in enumerate(names)},
        "train_seconds": round(state["train_seconds"], 1),
        "final_eval_seconds": round(time.time() - t0, 1),
        "threads": hp["threads"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "probes": state["probes"],
        "calib_split_eval": result,
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[done] saved to {out_dir} after {state['train_seconds'] / 60:.1f} min of training", flush=True)
    return record


def default_threads() -> int:
    """The cores this process may really run on (not the machine's count: a container or taskset may give fewer)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="reference", help="which recipe to train")
    parser.add_argument("--out", type=Path, default=None, help="output directory, replaced (default: src/moetrim/assets/MODEL)")
    parser.add_argument("--steps", type=int, default=None, help="override the step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    parser.add_argument("--eval-n", type=int, default=None, help="calib items per skill for the final report (default: 256)")
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="where the resumable checkpoint goes (default: .train-ckpt/MODEL)")
    parser.add_argument("--ckpt-minutes", type=float, default=5.0, help="minutes between checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir if there is one")
    parser.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this many minutes (resume later)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEPS", help="checkpoint and stop after this many steps (resume later)")
    parser.add_argument("--init-from", type=Path, default=None, metavar="MODEL",
                        help="start from these weights (a folder or a bundled name) instead of a fresh init: train a model longer")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a hyperparameter for experiments, e.g. --set lr=0.003")
    args = parser.parse_args(argv)
    hp = dict(RECIPES[args.model])
    if args.steps is not None:
        hp["steps"] = args.steps
    hp["threads"] = args.threads or default_threads()
    for kv in args.set:
        key, value = kv.split("=", 1)
        if key not in hp:
            parser.error(f"unknown hyperparameter {key!r}")
        hp[key] = json.loads(value)
    if hp["threads"] < 1:
        parser.error("--threads must be at least 1")
    if args.init_from is not None:
        hp["init_from"] = str(args.init_from)  # part of the recipe: a resume must start from the same weights
    out_dir = args.out or ASSETS / args.model
    ckpt = (args.ckpt_dir or REPO / ".train-ckpt" / args.model) / "last.pt"
    train(hp, out_dir, ckpt, args.resume, args.init_from, args.eval_n, args.ckpt_minutes, args.max_minutes, args.stop_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
