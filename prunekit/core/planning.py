""":func:`plan_for`: score exactly what the targets need, then select
(:func:`prunekit.core.select.select`), with SLEB-style layer steps (re-scoring with the layers
chosen so far masked). Re-exported by :mod:`prunekit.core.select` and the package root."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from prunekit.core.devices import load_or_check
from prunekit.core.masking import masked
from prunekit.core.plan import PrunePlan
from prunekit.core.scores import Scores, score
from prunekit.core.targets import Targets, count_of, resolve_scorers, scorer_configs


def plan_for(
    model: Any,
    samples: torch.Tensor,
    targets: Targets,
    *,
    progress: bool = True,
    batch_size: int = 8,
    configs: Mapping[str, Any] | None = None,
    scorers: Mapping[str, Any] | None = None,
    sequential: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
) -> tuple[PrunePlan, Scores]:
    """Score exactly what ``targets`` need (one capture pass for the forward-only scorers) and
    select. ``scorers``: unit → scorer object from :func:`resolve_scorers` (resolved here if
    not given); ``configs``: scorer name → options, on top of ``targets.scorer_options``.
    With ``layer_steps > 1`` the layers are removed in that many steps, each re-scored with
    the layers chosen so far masked out; the head and neuron scores are then computed with all
    chosen layers masked. ``sequential=True`` scores layer by layer (``model`` may then be a
    model directory read one layer at a time; ``layer_steps`` must be 1). ``device`` /
    ``dtype`` / ``device_map`` / ``max_memory``: where a ``model`` given as a path is loaded
    (see :func:`prunekit.score`); an in-memory model keeps its own device and dtype."""
    from prunekit.core.select import select

    scorers = resolve_scorers(targets) if scorers is None else dict(scorers)
    if not scorers:
        raise ValueError("targets remove nothing: set layers, heads or neurons")
    cfgs = scorer_configs(targets, scorers, configs)
    placement = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    if not sequential:  # a path is loaded once, here (masking needs the model)
        model = load_or_check(model, **placement)[0]
        placement = {}
        _block_size_from_target(model, targets, scorers, cfgs)

    def run(units: list[str], removed: list[int]) -> Scores:
        objs = list({scorers[u].name: scorers[u] for u in units}.values())
        cfg = {s.name: cfgs[s.name] for s in objs if s.name in cfgs}
        mask = masked(model, PrunePlan(layers=removed)) if removed else contextlib.nullcontext()
        with mask:
            return score(
                model,
                samples,
                objs,
                batch_size=batch_size,
                progress=progress,
                configs=cfg,
                sequential=sequential,
                **placement,
            )

    if targets.layer_steps <= 1 or "layers" not in scorers:
        scores = run(list(scorers), [])
        return select(scores, targets, scorers=scorers), scores
    removed, history, scores = _layers_in_steps(model, targets, scorers["layers"], run)
    others = [u for u in scorers if u != "layers"]
    if others:
        scores = scores.merge(run(others, removed))
    scores.meta["layer_steps"] = history
    plan = select(scores, targets, layers=removed, scorers=scorers)
    plan.meta["layer_steps"] = history
    return plan, scores


def _block_size_from_target(model, targets: Targets, scorers, cfgs: dict) -> None:
    """A layer scorer whose config has a ``block_size`` option (``heal_loss``) scores the
    block size the layer target asks for, unless the options set it (one-step selection)."""
    from dataclasses import fields, is_dataclass

    from prunekit.plugins import get_adapter

    obj = scorers.get("layers")
    cls = getattr(obj, "config_class", None)
    names = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
    opts = cfgs.get(obj.name, {}) if obj is not None else None
    if "block_size" not in names or not isinstance(opts, Mapping) or targets.layer_steps > 1:
        return
    n = count_of(targets.layers, len(get_adapter(model).layers(model)))
    cfgs[obj.name] = {"block_size": n, **opts}


def _layers_in_steps(model, targets: Targets, scorer, run) -> tuple[list[int], list, Scores]:
    """SLEB-style layer selection: ``targets.layer_steps`` rounds of score (with the layers
    chosen so far masked) and select; returns the layers, the per-step history and the last
    layer scores."""
    from prunekit.core.select import select_layers
    from prunekit.plugins import get_adapter

    k = count_of(targets.layers, len(get_adapter(model).layers(model)))
    steps = min(targets.layer_steps, k) or 1
    sizes = [k // steps + (1 if s < k % steps else 0) for s in range(steps)]
    removed: list[int] = []
    history = []
    layer_scores = None
    for size in sizes:
        layer_scores = run(["layers"], removed)
        removed = select_layers(
            layer_scores, targets, already=removed, count=len(removed) + size, scorer=scorer
        )
        history.append(list(removed))
    return removed, history, layer_scores


__all__ = ["plan_for"]
