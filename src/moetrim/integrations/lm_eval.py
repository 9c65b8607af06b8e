"""lm-evaluation-harness bridge: run lm-eval tasks on a model moetrim has loaded, in any checkpoint format.

lm-eval's `hf` model loads a path with plain transformers, which cannot build moetrim's own formats
(variable-width, replaced, rerouted experts); here the model and tokenizer come from `moetrim.load`
and are wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=tok)`. moetrim's task suite ships as
lm-eval tasks (`lm_eval_tasks/`: `moetrim_<domain>` exact match, `moetrim_<domain>_ppl` answer
likelihood, the group `moetrim`) that score the items `moetrim eval` scores, the same way.

Two things the plain wrapper gets wrong on small models, handled here:
- generation budget: lm-eval asks for 256 new tokens unless a task says otherwise and asserts when
  that does not fit the context; each generation request is capped to what the context leaves.
- rolling perplexity (`loglikelihood_rolling`): lm-eval puts its prefix token (BOS) in front and a
  tokenizer that adds BOS itself adds a second one. Those tasks run with `add_bos_token=False`;
  the others keep the tokenizer's own BOS, as generation and `moetrim eval` see it.

lm-eval is optional (`pip install "moetrim[eval]"`) and imported only when used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetrim.errors import MoetrimError, UsageError

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
MISSING = 'lm-eval is not installed: pip install "moetrim[eval]"'
ROLLING = "loglikelihood_rolling"


def require_lm_eval() -> None:
    """Raise a one-line error (exit 1) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MoetrimError(MISSING) from None


def own_task_names() -> list[str]:
    """moetrim's lm-eval task and group names (read from the task folder, no lm-eval needed)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def parse_task_names(spec: str) -> list[str]:
    """Comma-separated lm-eval task names, order kept, duplicates dropped; our own names checked here."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part and part not in names:
            names.append(part)
    if not names:
        raise UsageError(f"no lm-eval tasks given; {_listing()}")
    own = own_task_names()
    for name in names:
        if name.startswith("moetrim") and name not in own:
            raise UsageError(f"unknown lm-eval task {name!r}; {_listing()}")
    return names


def _listing() -> str:
    return (f"moetrim's tasks are {', '.join(own_task_names())}; `lm-eval ls tasks` lists lm-eval's "
            "(`--include_path DIR` there, `--include-path DIR` here, for task folders of your own)")


def check_include_paths(paths: Sequence[Path]) -> list[Path]:
    """Each --include-path must be an existing folder."""
    for p in paths:
        if not Path(p).is_dir():
            raise UsageError(f"--include-path {p} is not a folder")
    return [Path(p) for p in paths]


def task_manager(names: Sequence[str], include_paths: Sequence[Path] = ()) -> Any:
    """A TaskManager that knows every name: moetrim's folder and the user's first (fast: no index of
    lm-eval's 14,000 built-in tasks, an 8 s build), lm-eval's own only if a name needs them."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(str(p) for p in include_paths)]
    with _quiet():
        tm = TaskManager(include_path=paths, include_defaults=False)
        if all(_known(tm, n) for n in names):
            return tm
        tm = TaskManager(include_path=paths)
    for name in names:
        if not _known(tm, name):
            raise UsageError(f"unknown lm-eval task {name!r}; {_listing()}")
    return tm


def _known(tm: Any, name: str) -> bool:
    return name in tm.task_index or (name.endswith(".yaml") and Path(name).is_file())


class _quiet:
    """lm-eval logs every step at INFO/WARNING; a CLI run shows only errors."""

    def __enter__(self):
        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _capped_hflm(model: Any, tokenizer: Any, batch_size: int, max_length: int) -> Any:
    """HFLM whose generation requests never ask for more tokens than the context leaves."""
    from lm_eval.models.huggingface import HFLM

    class CappedHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            if requests:
                longest = max(len(self.tok_encode(r.args[0])) for r in requests)
                room = self.max_length - longest
                cap = room if room >= 1 else max(1, self.max_length // 2)  # contexts are left-truncated
                for r in requests:
                    context, kwargs = r.arguments
                    want = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                    if want > cap:
                        r.arguments = (context, {**kwargs, "max_gen_toks": cap})
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    device = next(model.parameters()).device
    return CappedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      max_length=max_length, device=str(device))


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context: the config's position limit (moetrim.calibrate.run.model_context), else
    the tokenizer's, else 2048."""
    from moetrim.calibrate.run import model_context

    value = model_context(model)
    if value is not None:
        return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def _load_split(tm: Any, names: Sequence[str]) -> tuple[list[Any], list[Any], dict[str, str]]:
    """Build the tasks once and sort them by kind: (not rolling, rolling, output type per leaf task).
    A group that mixes both kinds is run as its leaf tasks (its own aggregate is then not reported)."""
    plain, rolling, kinds, origin = [], [], {}, {}
    for name in names:
        loaded = tm.load([name])
        leaves = loaded["tasks"]
        for task_name, task in leaves.items():
            if task_name in origin:
                raise UsageError(f"lm-eval task {task_name!r} is asked for twice (in {origin[task_name]!r} and {name!r}); name it once")
            origin[task_name] = name
            kinds[task_name] = task.get_config("output_type")
        top = loaded["groups"].get(name) or leaves.get(name)
        top_items = [top] if top is not None else list(leaves.values())  # a tag: its tasks
        leaf_kinds = {kinds[t] == ROLLING for t in leaves}
        if len(leaf_kinds) == 1:
            (rolling if leaf_kinds == {True} else plain).extend(top_items)
        else:
            for t in leaves.values():
                (rolling if kinds[t.task_name] == ROLLING else plain).append(t)
    return plain, rolling, kinds


@dataclass
class LoadedTasks:
    """lm-eval tasks built and sorted by kind, before any model is loaded (bad names fail fast)."""

    manager: Any
    plain: list = field(default_factory=list)
    rolling: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)


def load_tasks(names: Sequence[str], include_paths: Sequence[Path] = ()) -> LoadedTasks:
    """Check the names and build their tasks (data included): moetrim's, the user's, lm-eval's."""
    tm = task_manager(names, include_paths)
    with _lm_eval_errors("could not load its tasks"), _quiet():
        plain, rolling, kinds = _load_split(tm, list(names))
    return LoadedTasks(tm, plain, rolling, kinds)


class _lm_eval_errors:
    """An exception inside lm-eval becomes one line (exit 1); ours, memory and Ctrl-C pass through."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (MoetrimError, MemoryError, KeyboardInterrupt)) or not isinstance(exc, Exception) \
                or type(exc).__name__ == "OutOfMemoryError":
            return False
        first = (str(exc).splitlines() or [""])[0][:300]
        raise MoetrimError(f"lm-eval {self.what} ({type(exc).__name__}: {first})") from exc


def evaluate_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | LoadedTasks,
    include_paths: Sequence[Path] = (),
    limit: int | None = None,
    batch_size: int = 32,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval tasks (names, groups or tags, or `load_tasks`' result) on a loaded model and tokenizer.

    Returns ``{"accuracy", "perplexity", "n"}`` per moetrim domain whose tasks ran (the shape `moetrim
    eval` gives; perplexity token-weighted as there) and ``"lm_eval": {"results": {task: {metric:
    value}}, "n": {task: items}, ...}`` for every task. ``limit`` = items per task (the first ones,
    as `moetrim eval --n` takes). ``keep_samples`` adds lm-eval's per-item records under "samples".
    """
    require_lm_eval()
    import lm_eval

    loaded = tasks if isinstance(tasks, LoadedTasks) else load_tasks(tasks, include_paths)
    was_training = model.training
    model.eval()
    max_length = context_length(model, tokenizer)
    runs = []
    try:
        with _lm_eval_errors("failed"), _quiet():
            lm = _capped_hflm(model, tokenizer, batch_size, max_length)
            for objs, add_bos in ((loaded.plain, None), (loaded.rolling, False if adds_bos(tokenizer) else None)):
                if objs:
                    lm.add_bos_token = add_bos
                    runs.append(lm_eval.simple_evaluate(
                        model=lm, tasks=objs, task_manager=loaded.manager, limit=limit, log_samples=True,
                        bootstrap_iters=0, num_fewshot=None))
    finally:
        model.train(was_training)
    return _collect(runs, lm, loaded.kinds, keep_samples, max_length)


def _collect(runs: list[dict], lm: Any, kinds: dict[str, str], keep_samples: bool, max_length: int) -> dict[str, Any]:
    """Merge the runs' results; moetrim's tasks also in `moetrim eval`'s shape."""
    import lm_eval

    out: dict[str, Any] = {"accuracy": {}, "perplexity": {}, "n": {}}
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list] = {}
    for run in runs:
        for task, metrics in run["results"].items():
            clean = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                     if k not in ("alias", "sample_len") and isinstance(v, (int, float)) and not math.isnan(v)}
            if clean:  # a group without an aggregate metric reports nothing of its own
                results[task] = clean
        for task, n in run.get("n-samples", {}).items():
            counts[task] = int(n.get("effective", n.get("original", 0)))
        samples.update(run.get("samples", {}))
    for task, recs in samples.items():
        domain = _domain_of(task)
        if domain is None:
            continue
        if task == f"moetrim_{domain}" and "exact_match" in results.get(task, {}):
            out["accuracy"][domain] = float(results[task]["exact_match"])
            out["n"][domain] = counts.get(task, len(recs))
        elif task == f"moetrim_{domain}_ppl":
            nll, tokens = 0.0, 0
            for rec in recs:
                context, continuation = rec["arguments"][0][:2]  # one (context, continuation) request per item
                nll -= float(rec["filtered_resps"][0][0])  # its (loglikelihood, is_greedy)
                tokens += len(lm._encode_pair(context, continuation)[1])
            out["perplexity"][domain] = math.exp(nll / max(tokens, 1))
            results[task]["answer_perplexity_tokens"] = out["perplexity"][domain]
            out["n"].setdefault(domain, counts.get(task, len(recs)))
    out["lm_eval"] = {"version": getattr(lm_eval, "__version__", "?"), "results": results, "n": counts,
                      "output_type": kinds, "max_length": max_length}
    if keep_samples:
        out["samples"] = samples
    return out


def _domain_of(task: str) -> str | None:
    from moetrim.data.tasks import TASK_DOMAINS

    for d in TASK_DOMAINS:
        if task in (f"moetrim_{d}", f"moetrim_{d}_ppl"):
            return d
    return None
