"""Selection of attention / MLP sub-blocks to remove (targets ``attention`` and ``mlps``).

Rules: a count (int) or a fraction (float in [0, 1)) of the model's layers; the lowest-scoring
sub-blocks go (a sub-block scorer, e.g. ``attention_influence``, gives ``[L]``, higher =
keep); the first ``protect_first`` and last ``protect_last`` layers keep both sub-blocks;
a layer removed whole, a layer whose sub-block is already gone and a layer that would be left
with neither sub-block are never picked. Attention is chosen first, then MLPs among the other
layers.
"""

from __future__ import annotations

import math
from typing import Any

from prunekit.core.scores import Scores, get_scorer
from prunekit.core.targets import count_of

#: target / unit name -> LayerShape property saying the sub-block is there
SUBBLOCK_UNITS = {"attention": "has_attention", "mlps": "has_mlp"}


def _pick(scores: Scores, targets: Any, unit: str, scorer: Any, excluded: set[int]) -> list[int]:
    L = scores.n_layers
    k = count_of(getattr(targets, unit), L)
    if k <= 0:
        return []
    scorer = scorer or get_scorer(targets.scorer_name(unit), unit)
    values = scores[scorer.name]
    present = SUBBLOCK_UNITS[unit]
    other = "has_mlp" if unit == "attention" else "has_attention"
    pool = [
        i
        for i in range(targets.protect_first, L - targets.protect_last)
        if i not in excluded
        and getattr(scores.shapes[i], present)
        and getattr(scores.shapes[i], other)
        and not math.isnan(float(values[i]))
    ]
    if k > len(pool):
        raise ValueError(
            f"{unit} target asks to remove {k} sub-blocks but only {len(pool)} layers may lose "
            f"one (protect_first={targets.protect_first}, protect_last={targets.protect_last}, "
            "layers removed whole or already without a sub-block excluded); lower the target"
        )
    return sorted(sorted(pool, key=lambda i: (float(values[i]), i))[:k])


def select_subblocks(
    scores: Scores, targets: Any, layers: list[int], scorers: dict[str, Any] | None = None
) -> tuple[list[int], list[int]]:
    """``(attention, mlp)``: the layers whose attention / MLP sub-block to remove, given the
    layers ``layers`` removed whole. ``scorers``: unit -> resolved scorer object."""
    scorers = scorers or {}
    removed = set(layers)
    attention = _pick(scores, targets, "attention", scorers.get("attention"), removed)
    mlp = _pick(scores, targets, "mlps", scorers.get("mlps"), removed | set(attention))
    return attention, mlp


__all__ = ["SUBBLOCK_UNITS", "select_subblocks"]
