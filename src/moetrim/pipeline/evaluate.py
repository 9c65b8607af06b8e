"""`moetrim.evaluate`: what `moetrim eval` measures, on a model in memory: exact-match accuracy and
answer perplexity on moetrim's task suite (moetrim.evaluate.tasks_eval), or lm-eval tasks through
the bridge (moetrim.integrations.lm_eval). It sits here, above both, because it chooses between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from moetrim.errors import UsageError


def task_domains(model: nn.Module | str | Path | None, tasks: str | Sequence[str] | None) -> list[str]:
    """The domains `tasks` names (comma-separated or a list; 'all' or None: every skill the model's
    training.json records, else the first reference model's four), checked by name."""
    from moetrim.assets import resolve_model_path, trained_domains
    from moetrim.data.tasks import parse_domains

    if isinstance(model, (str, Path)):
        trained = trained_domains(resolve_model_path(str(model)))
    else:
        source = getattr(model, "name_or_path", None)
        trained = trained_domains(source) if source else None
    spec = tasks if tasks is None or isinstance(tasks, str) else ",".join(tasks)
    try:
        return parse_domains(spec or "all", trained)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str] | None = None,
    n: int | None = None,
    lm_eval=None,
    *,
    include_paths: Sequence[str | Path] = (),
    batch_size: int = 64,
) -> dict[str, Any]:
    """Measure what a compressed or fine-tuned model still does, the numbers `moetrim eval` prints:
    ``{"accuracy": {domain: float}, "perplexity": {domain: float}, "n": {domain: int}}`` over the
    task domains `tasks` names (default: the skills the model was trained on), `n` items each
    (default: the full eval split). lm_eval: lm-eval task names ("moetrim" is the built-in suite,
    comma-separated or a list, or the bridge's loaded tasks) instead of the built-in suite, with
    `include_paths` for task files of your own; the result then also holds "lm_eval".

    >>> model, tok = moetrim.reference_model()
    >>> moetrim.evaluate(model, tok, tasks="math", n=20)["accuracy"]["math"] > 0.5
    True
    """
    if lm_eval is not None:
        if tasks is not None:
            raise UsageError("tasks and lm_eval exclusive: the built-in suite is the lm-eval task 'moetrim' (or moetrim_math, ...)")
        from moetrim.integrations import lm_eval as bridge

        if isinstance(lm_eval, str):
            lm_eval = bridge.load_tasks(bridge.parse_task_names(lm_eval), bridge.check_include_paths([Path(p) for p in include_paths]))
        return bridge.evaluate_lm_eval(model, tokenizer, lm_eval, limit=n, batch_size=batch_size)
    if include_paths:
        raise UsageError("include_paths applies to lm_eval")
    from moetrim.evaluate.tasks_eval import evaluate_tasks

    domains = task_domains(model, tasks)
    try:
        return evaluate_tasks(model, tokenizer, domains, n=n, batch_size=batch_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
