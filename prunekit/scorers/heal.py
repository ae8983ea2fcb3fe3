"""Layer-block scorer by what linear healing cannot repair (``heal_residual``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Context
from prunekit.core.heal import HealAccumulator
from prunekit.scorers.base import Scorer


@dataclass
class HealResidualConfig:
    max_block: int = field(
        default=8,
        metadata={
            "help": "largest block size scored (memory: one [hidden, hidden] float64 matrix "
            "per scored block); larger blocks get NaN and cannot be selected"
        },
    )
    ridge: float = field(
        default=1e-4, metadata={"help": "ridge of the fit, relative to the mean eigenvalue"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_block, bool) or int(self.max_block) < 1:
            raise ValueError(f"max_block must be an integer >= 1, got {self.max_block!r}")
        self.max_block = int(self.max_block)
        if float(self.ridge) < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        self.ridge = float(self.ridge)

    def to_dict(self) -> dict[str, Any]:
        return {"max_block": self.max_block, "ridge": self.ridge}


class _BlockAccumulator(HealAccumulator):
    def __init__(self, ctx: Context, config: HealResidualConfig):
        if not getattr(ctx.adapter, "pre_norm", ctx.causal):
            raise ValueError(
                "heal_residual scores what a map folded into down_proj repairs, which needs a "
                "pre-norm decoder; use block_influence or angular_distance for this model"
            )
        L = ctx.n_layers
        runs = {
            (s, s + n - 1): s - 1
            for n in range(1, min(config.max_block, L - 1) + 1)
            for s in range(1, L - n + 1)
        }
        super().__init__(ctx.adapter, runs)
        self.n_layers = L
        self.ridge = config.ridge

    def result(self) -> torch.Tensor:
        out = torch.full((self.n_layers, self.n_layers), float("nan"))
        for (s, e), st in self.stats.items():
            out[e - s, s] = st.residual(st.solve(self.ridge)) / max(st.yy, 1e-300)
        return out


class HealResidual(Scorer):
    """Relative residual of the best linear map replacing a block (ReplaceMe, Shopkhoev et al.
    2025, arXiv 2505.02819, used as a selector; see :mod:`prunekit.core.heal`).

    For the block of ``n`` layers starting at ``s`` (``p = s − 1`` the layer its map is folded
    into, ``M_p`` that layer's MLP output, ``h_p`` the residual stream bypassing it, ``Y`` the
    block's output):

        D[n−1, s] = min_T ‖(Y − h_p) − M_p T‖² / ‖Y‖²   (ridge-regularised T),

    in closed form from the streamed ``M_pᵀM_p``, ``M_pᵀ(Y − h_p)`` and ``‖Y − h_p‖²`` of one
    forward pass. It scores what the *healed* model loses, so use it with ``--heal linear``;
    lower = remove, NaN where no block can start (layer 0 has no layer before it) or
    ``n > max_block``. ``block = True``: the selection removes the contiguous block minimising
    ``D[n−1, s]``. Normal mode only (it needs a batch through all layers at once).
    """

    name = "heal_residual"
    unit = "layers"
    block = True
    sequential_ok = False
    config_class = HealResidualConfig
    accumulator_class = _BlockAccumulator


SCORERS = (HealResidual(),)
