"""Run EleutherAI's lm-evaluation-harness tasks on a (pruned) model, in memory or on disk.

The harness is the optional extra ``lm_eval`` (``pip install 'prunekit[lm_eval]'``) and is
imported only when :func:`run_lm_eval` is called. Models are wrapped in the harness's own
``HFLM``, so its task definitions, prompts and metrics apply unchanged; a per-layer (pruned)
model directory is loaded with :func:`prunekit.load_pretrained` first, which stock
``HFLM(pretrained="dir")`` could not do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["run_lm_eval"]

_INSTALL_HINT = (
    "run_lm_eval needs EleutherAI's lm-evaluation-harness: pip install 'prunekit[lm_eval]' "
    "(or pip install 'lm-eval>=0.4')"
)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return lm_eval, HFLM


def run_lm_eval(
    model: Any,
    tokenizer: Any = None,
    tasks: list[str] | None = None,
    *,
    batch_size: int = 1,
    include_path: str | os.PathLike | None = None,
    max_length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate ``model`` on lm-evaluation-harness ``tasks`` → ``{task: {metric: value}}``.

    ``model`` is a loaded causal LM (with its ``tokenizer``) or a path that
    :func:`prunekit.load_model` accepts (uniform or per-layer model directory, ``.gguf``).
    ``include_path`` points the harness at a folder of extra task YAML files (e.g. local,
    offline tasks). Other keyword arguments go to ``lm_eval.simple_evaluate`` (``limit``,
    ``num_fewshot``, ``random_seed``, ...). The harness's full output (configs, versions,
    per-sample logs) is under the key ``"_raw"`` when ``log_samples=True`` is passed.
    """
    if not tasks:
        raise ValueError("tasks is empty; name at least one lm-evaluation-harness task")
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of task names, e.g. [{tasks!r}]")
    lm_eval, HFLM = _import_lm_eval()
    if isinstance(model, str | os.PathLike):
        from prunekit.core.io import load_model

        model, loaded_tokenizer = load_model(Path(model))
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; pass tokenizer=")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length
        )
        task_manager = None
        if include_path is not None:
            from lm_eval.tasks import TaskManager

            if not Path(include_path).exists():
                raise FileNotFoundError(f"include_path {include_path} does not exist")
            task_manager = TaskManager(include_path=str(include_path))
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=task_manager, **kwargs
        )
    finally:
        model.train(was_training)
    if raw is None:  # non-zero rank in a distributed run
        return {}
    results: dict[str, Any] = {
        task: {k: v for k, v in metrics.items() if k != "alias"}
        for task, metrics in raw["results"].items()
    }
    if kwargs.get("log_samples"):
        results["_raw"] = raw
    return results
