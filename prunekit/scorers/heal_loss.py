"""The engine of ``heal_loss``: the held-out calibration loss of the model with a block of
layers removed *and healed* (:mod:`prunekit.core.heal`), for a few candidate blocks.

Each candidate's map is fitted on the fitting rows (one capture pass shared by all
candidates); the held-out rows then go once through the dense model, recording every layer's
input, and for each candidate only the layers from the one its map is folded into upwards are
recomputed (the layers below are stand-ins returning the cached input, as for
``perplexity_drop``; the removed block is a pass-through).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunekit.core.heal import Run, accumulate_run_stats, temporary_folds
from prunekit.scorers.perplexity import _inputs_recorded, _loss, _StandIn


def _healed_layers(layers: Sequence[nn.Module], run: Run, cached: torch.Tensor) -> nn.ModuleList:
    """Layers of the model with ``run`` removed: stand-ins below ``p = first - 1`` (the first
    returns ``cached``, the input of layer ``p``), layer ``p`` itself, pass-throughs for the
    run, the layers above."""
    first, last = run
    p = first - 1
    below = [_StandIn(layers[j], cached if j == 0 else None) for j in range(p)]
    gone = [_StandIn(layers[j], None) for j in range(first, last + 1)]
    return nn.ModuleList([*below, layers[p], *gone, *layers[last + 1 :]])


@torch.no_grad()
def healed_block_losses(
    model: nn.Module,
    adapter,
    fit_ids: torch.Tensor,
    held_ids: torch.Tensor,
    runs: Sequence[Run],
    *,
    fit: str,
    ridge: float,
    batch_size: int,
) -> dict[Run, float]:
    """Mean next-token loss on ``held_ids`` of the model with each run removed and healed by a
    map fitted on ``fit_ids`` (``fit``/``ridge`` as for :func:`prunekit.core.heal.fit_linear_heal`,
    every run fitted on the dense model). The model is restored afterwards."""
    stats = accumulate_run_stats(model, fit_ids, runs, fit=fit, batch_size=batch_size)
    maps = {run: stats[run].solve(ridge) for run in runs}
    device = next(p.device for p in model.parameters())
    layers = adapter.layers(model)
    totals = dict.fromkeys(runs, 0.0)
    tokens = 0
    for s in range(0, len(held_ids), batch_size):
        ids = held_ids[s : s + batch_size].to(device)
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        inputs: list = [None] * len(layers)
        with _inputs_recorded(layers, inputs):
            _loss(model, ids)
        for run in runs:
            try:
                with temporary_folds(model) as fold:
                    fold(run[0] - 1, maps[run], fit)
                    adapter.set_layers(model, _healed_layers(layers, run, inputs[run[0] - 1]))
                    totals[run] += _loss(model, ids)
            finally:
                adapter.set_layers(model, layers)
    return {run: total / tokens for run, total in totals.items()}
