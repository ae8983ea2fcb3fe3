"""Layer selection by what linear healing cannot repair (:mod:`prunekit.core.heal`).

Block selection by healed loss (:func:`select_block_by_heal_residual`): for every candidate
block of ``n`` layers the same statistics give, in closed form, the squared residual of the
best map, ``‖Y − h_p‖² − 2 tr(TᵀC) + tr(TᵀGT)``; one forward pass accumulates them for every
start at once, and the block whose relative residual ``residual / ‖Y‖²`` is smallest is the
one the healed model loses least on.

Greedy selection (:func:`select_layers_by_heal_residual`): one layer at a time, each scored on
the model whose earlier choices are already healed and masked, so that the choice follows what
the healed model really computes; non-contiguous runs are allowed.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.core.heal import (
    accumulate_run_stats,
    check_healable,
    preceding_kept,
    temporary_folds,
)
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter


def select_block_by_heal_residual(
    model: nn.Module,
    calib_ids: torch.Tensor,
    n: int,
    *,
    ridge: float = 1e-4,
    protect_last: bool = True,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[int], torch.Tensor]:
    """Choose the contiguous block of ``n`` layers whose removal linear healing repairs best.

    For every start ``s`` (``1 <= s``; the block ends before the last layer when
    ``protect_last``) one forward pass accumulates the block's :class:`RunStats`; the score of
    the block is the relative squared residual of its best ridge map,
    ``‖(Y − h) − M T‖² / ‖Y‖²`` (module docstring). Returns the chosen layers and the score
    per start (``inf`` where no block may start; lower = better to remove).
    """
    adapter = get_adapter(model)
    n_layers = len(adapter.layers(model))
    last_end = n_layers - (2 if protect_last else 1)
    runs = [(s, s + n - 1) for s in range(1, n_layers) if s + n - 1 <= last_end]
    if n < 1 or not runs:
        raise PruningPlanError(
            f"no block of {n} layers fits a {n_layers}-layer model with layer 0"
            + (" and the last layer" if protect_last else "")
            + " kept",
            entry="layers",
        )
    check_healable(model, runs)
    stats = accumulate_run_stats(model, calib_ids, runs, batch_size=batch_size, progress=progress)
    scores = torch.full((n_layers,), float("inf"), dtype=torch.float64)
    for (s, _e), st in stats.items():
        scores[s] = st.residual(st.solve(ridge)) / max(st.yy, 1e-300)
    best = int(torch.argmin(scores))
    return list(range(best, best + n)), scores


def select_layers_by_heal_residual(
    model: nn.Module,
    calib_ids: torch.Tensor,
    n: int,
    *,
    ridge: float = 1e-4,
    protect_first: int = 1,
    protect_last: int = 1,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[int], list[torch.Tensor]]:
    """Choose ``n`` layers (not necessarily contiguous) greedily by what the *healed* model
    loses: each of ``n`` steps is one forward pass on the model with the layers chosen so far
    healed and masked, scoring every remaining layer ``i`` by the relative residual of its best
    map, ``‖(Y_i − h_p) − M_p T‖² / ‖Y_i‖²`` (``p``: the last kept layer before ``i``); the
    lowest is removed and its map folded before the next step. The model is restored on exit.
    Returns the sorted layers and each step's scores (``inf`` where not a candidate)."""
    adapter = get_adapter(model)
    n_layers = len(adapter.layers(model))
    allowed = range(max(1, protect_first), n_layers - protect_last)
    if n < 1 or n > len(allowed):
        raise PruningPlanError(
            f"cannot remove {n} of the {len(allowed)} layers that layer 0 (the first map "
            f"needs a layer to fold into) and the protection leave in a {n_layers}-layer model",
            entry="layers",
        )
    check_healable(model, [(i, i) for i in allowed])
    removed: list[int] = []
    history: list[torch.Tensor] = []
    with temporary_folds(model) as fold:
        for _ in range(n):
            runs = [(i, i) for i in allowed if i not in removed]
            stats = accumulate_run_stats(
                model, calib_ids, runs, removed=removed, batch_size=batch_size, progress=progress
            )
            scores = torch.full((n_layers,), float("inf"), dtype=torch.float64)
            maps = {}
            for (i, _), st in stats.items():
                maps[i] = st.solve(ridge)
                scores[i] = st.residual(maps[i]) / max(st.yy, 1e-300)
            best = int(torch.argmin(scores))
            fold(preceding_kept(best, removed), maps[best])
            removed.append(best)
            history.append(scores)
    return sorted(removed), history
