"""The scorer protocol.

A scorer is an object with

- ``name`` (registry name), ``unit`` (``"layers"``, ``"heads"`` or ``"neurons"``),
  ``config_class`` (a dataclass; ``configs={name: {...}}`` in :func:`prunekit.score` fills it);
- ``kind``: ``"forward"`` (streams statistics from the shared capture pass: implement
  ``accumulator(ctx, config) -> Accumulator``), ``"gradient"`` (shares one forward+backward
  pass per batch with the other gradient scorers: implement ``accumulator`` with the
  ``"gradients"`` tap and ``params(model, adapter) -> list[Parameter]``), or ``"custom"``
  (implement ``run(model, samples, ctx, config, *, batch_size, progress) -> Tensor``).

Results: higher = keep. Layers ``[L]`` (angular distance: ``[L, L]``, see its docstring);
heads ``[L, n_query_heads]``; neurons ``[L, intermediate]`` (a list when widths differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunekit.core.capture import Accumulator, Context

UNITS = ("layers", "heads", "neurons")
KINDS = ("forward", "gradient", "custom")


@dataclass
class NoConfig:
    """Scorer without options."""

    def to_dict(self) -> dict[str, Any]:
        return {}


class Scorer:
    name: ClassVar[str]
    unit: ClassVar[str]
    kind: ClassVar[str] = "forward"
    config_class: ClassVar[type] = NoConfig
    #: whether the scorer can run in sequential (layer-by-layer) mode
    sequential_ok: ClassVar[bool] = True

    def make_config(self, config: Any = None) -> Any:
        if config is None:
            return self.config_class()
        if isinstance(config, self.config_class):
            return config
        if isinstance(config, dict):
            return self.config_class(**config)
        raise TypeError(
            f"config of scorer {self.name!r} must be a {self.config_class.__name__} or a dict, "
            f"got {type(config).__name__}"
        )

    def accumulator(self, ctx: Context, config: Any) -> Accumulator:
        raise NotImplementedError(f"scorer {self.name!r} has no forward accumulator")

    def params(self, model: Any, adapter: Any) -> list[torch.nn.Parameter]:
        return []

    def run(self, model, samples, ctx: Context, config, *, batch_size: int, progress: bool):
        raise NotImplementedError(f"scorer {self.name!r} has no run()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.unit}, {self.kind})>"


def stack_or_list(rows: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One tensor when every layer has the same width, else the per-layer list."""
    if rows and all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    return rows


def head_slices(weight: torch.Tensor, n_heads: int, head_dim: int, dim: int) -> torch.Tensor:
    """View a projection weight per head: rows (``dim=0``, q/k/v) or columns (``dim=1``, o)
    → ``[n_heads, head_dim, other]``."""
    if dim == 0:
        return weight.reshape(n_heads, head_dim, -1)
    return weight.reshape(weight.shape[0], n_heads, head_dim).permute(1, 2, 0)


__all__ = ["KINDS", "UNITS", "NoConfig", "Scorer", "head_slices", "stack_or_list"]
