"""Layer selection by what linear healing cannot repair (:mod:`prunekit.core.heal`).

Block selection by healed loss (:func:`select_block_by_heal_residual`): for every candidate
block of ``n`` layers the same statistics give, in closed form, the squared residual of the
best map, ``‖Y − h_p‖² − 2 tr(TᵀC) + tr(TᵀGT)``; one forward pass accumulates them for every
start at once, and the block whose relative residual ``residual / ‖Y‖²`` is smallest is the
one the healed model loses least on.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.core.heal import (
    accumulate_run_stats,
    check_healable,
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
