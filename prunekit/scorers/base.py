"""What the built-in scorers share: the :class:`~prunekit.core.scores.Scorer` contract (defined
in core, re-exported here), the per-layer stacking of results, and the Taylor reduction.

A third-party scorer subclasses :class:`prunekit.core.scores.Scorer` and sets ``name``,
``unit``, ``kind`` and, where they apply, ``config_class``, ``block``, ``sequential_ok`` and
``counterparts`` (see :mod:`prunekit.core.scores`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.core.scores import Scorer, stack_or_list


@dataclass
class TaylorConfig:
    """Options of the Taylor scorers (heads and neurons)."""

    granularity: str = field(
        default="element",
        metadata={
            "help": "'element': Σ_w |g·w| (LLM-Pruner element-wise); "
            "'vector': |Σ_w g·w| (first-order loss change of removing the unit)"
        },
    )

    def __post_init__(self) -> None:
        if self.granularity not in ("element", "vector"):
            raise ValueError(f"granularity must be 'element' or 'vector', got {self.granularity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity}


def taylor_reduce(parts: Iterable[tuple[torch.Tensor, int | tuple[int, ...]]], granularity: str):
    """First-order Taylor importance of units from ``(g ⊙ w, dims)`` parts: each part is the
    elementwise product of weights and their gradients and ``dims`` the dimensions summed to
    get one value per unit. ``element``: s = Σ_parts Σ_dims |g·w|; ``vector``:
    s = |Σ_parts Σ_dims g·w| (the first-order loss change of removing the unit)."""
    total = None
    for prod, dims in parts:
        prod = prod.float()
        v = prod.abs().sum(dims) if granularity == "element" else prod.sum(dims)
        total = v if total is None else total + v
    return total if granularity == "element" else total.abs()


def weight_grad(adapter, module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight gradient in ``nn.Linear`` layout ``[out, in]``."""
    g = module.weight.grad
    if g is None:
        raise RuntimeError(f"{type(module).__name__} has no gradient; was backward() run?")
    return adapter.linear_weight(module, g)


class MagnitudeAccumulator(Accumulator):
    """Weight magnitude per unit, s = sqrt(Σ_parts Σ_dims w²), from the ``(w, dims)`` parts
    that :meth:`parts` gives for a layer. Needs no data."""

    taps = frozenset({"weights"})

    def __init__(self, ctx: Context, config: Any = None):
        self.adapter = ctx.adapter
        self.rows: list[torch.Tensor | None] = [None] * ctx.n_layers

    def parts(self, layer) -> list[tuple[torch.Tensor, int | tuple[int, ...]]]:
        raise NotImplementedError

    def on_weights(self, i, layer):
        sq = sum(w.float().pow(2).sum(dims) for w, dims in self.parts(layer))
        self.rows[i] = sq.sqrt().cpu()

    def result(self):
        return stack_or_list(self.rows)


class TaylorAccumulator(Accumulator):
    """Averages :func:`taylor_reduce` over calibration batches, per layer. Subclasses give
    the ``(g ⊙ w, dims)`` parts of a layer in :meth:`products`."""

    taps = frozenset({"gradients"})

    def __init__(self, ctx: Context, config: TaylorConfig):
        self.adapter = ctx.adapter
        self.granularity = config.granularity
        self.sums: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.batches = [0] * ctx.n_layers

    def products(self, layer) -> list[tuple[torch.Tensor, int | tuple[int, ...]]]:
        raise NotImplementedError

    def on_gradients(self, i, layer):
        with torch.no_grad():
            v = taylor_reduce(self.products(layer), self.granularity).double().cpu()
        self.sums[i] = v if self.sums[i] is None else self.sums[i] + v
        self.batches[i] += 1

    def result(self):
        pairs = zip(self.sums, self.batches, strict=True)
        return stack_or_list([(s / b).float() for s, b in pairs])


__all__ = [
    "MagnitudeAccumulator",
    "Scorer",
    "TaylorAccumulator",
    "TaylorConfig",
    "stack_or_list",
    "taylor_reduce",
    "weight_grad",
]
