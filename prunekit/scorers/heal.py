"""Layer-block scorers by what linear healing cannot repair: ``heal_residual`` (the fit's
relative residual, closed form) and ``heal_loss`` (the healed model's held-out calibration
loss)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Context
from prunekit.core.heal import FITS, HealAccumulator, accumulate_run_stats
from prunekit.scorers.base import Scorer
from prunekit.scorers.heal_loss import healed_block_losses


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
        _need_pre_norm(ctx, "heal_residual")
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


def _need_pre_norm(ctx: Context, name: str) -> None:
    if not getattr(ctx.adapter, "pre_norm", ctx.causal):
        raise ValueError(
            f"{name} scores what a map folded into down_proj repairs, which needs a pre-norm "
            "decoder; use block_influence or angular_distance for this model"
        )


@dataclass
class HealLossConfig:
    block_size: int = field(
        default=0,
        metadata={
            "help": "block size scored (set from the layer target by plan_for/compress); "
            "0: every size up to max_block"
        },
    )
    max_block: int = field(default=8, metadata={"help": "largest size scored when block_size=0"})
    candidates: int = field(
        default=4,
        metadata={
            "help": "blocks per size whose healed loss is measured: those with the smallest "
            "heal_residual (the others get NaN)"
        },
    )
    holdout: float = field(
        default=0.25,
        metadata={"help": "fraction of the calibration samples held out to measure the loss"},
    )
    fit: str = field(
        default="down_proj", metadata={"help": "the healing fit: 'map' or 'down_proj'"}
    )
    ridge: float = field(
        default=1e-4, metadata={"help": "ridge of the fit, relative to the mean eigenvalue"}
    )

    def __post_init__(self) -> None:
        for name in ("block_size", "max_block", "candidates"):
            value = getattr(self, name)
            low = 0 if name == "block_size" else 1
            if isinstance(value, bool) or int(value) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
            setattr(self, name, int(value))
        if not 0 < float(self.holdout) < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout!r}")
        self.holdout = float(self.holdout)
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if float(self.ridge) < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        self.ridge = float(self.ridge)

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "max_block": self.max_block,
            "candidates": self.candidates,
            "holdout": self.holdout,
            "fit": self.fit,
            "ridge": self.ridge,
        }


class HealLoss(Scorer):
    """Held-out calibration loss of the *healed* model (ReplaceMe, Shopkhoev et al. 2025, arXiv
    2505.02819, selecting by what the healed model loses): for the block of ``n`` layers
    starting at ``s``,

        D[n−1, s] = CE(model without layers s..s+n−1, healed by --heal linear; held-out rows),

    the mean next-token loss on the last ``holdout`` fraction of the calibration samples,
    with the map fitted on the others. Only the ``candidates`` blocks per size with the
    smallest ``heal_residual`` are measured (NaN elsewhere; blocks containing layer 0 or the
    last layer are never candidates). ``block = True``: lower = remove. ``plan_for`` sets
    ``block_size`` to the layer target; ``block_size=0`` scores every size up to
    ``max_block``. Normal mode only.
    """

    name = "heal_loss"
    unit = "layers"
    kind = "custom"
    block = True
    sequential_ok = False
    config_class = HealLossConfig

    def run(self, model, samples, ctx, config, *, batch_size, progress):
        _need_pre_norm(ctx, self.name)
        n_held = max(1, round(config.holdout * len(samples)))
        if len(samples) - n_held < 1:
            raise ValueError("heal_loss needs at least 2 calibration samples (fit and held-out)")
        fit_ids, held_ids = samples[:-n_held], samples[-n_held:]
        L = ctx.n_layers
        sizes = [config.block_size] if config.block_size else range(1, config.max_block + 1)
        runs = [(s, s + n - 1) for n in sizes for s in range(1, L - n)]
        if not runs:
            raise ValueError(f"no block of {list(sizes)} layers fits between the first and last")
        ranked = accumulate_run_stats(model, fit_ids, runs, batch_size=batch_size)
        res = {
            r: st.residual(st.solve(config.ridge)) / max(st.yy, 1e-300) for r, st in ranked.items()
        }
        chosen = []
        for n in sizes:
            of_n = sorted((r for r in runs if r[1] - r[0] + 1 == n), key=res.__getitem__)
            chosen += of_n[: config.candidates]
        losses = healed_block_losses(
            model,
            ctx.adapter,
            fit_ids,
            held_ids,
            chosen,
            fit=config.fit,
            ridge=config.ridge,
            batch_size=batch_size,
        )
        out = torch.full((L, L), float("nan"))
        for (s, e), value in losses.items():
            out[e - s, s] = value
        return out


SCORERS = (HealResidual(), HealLoss())
