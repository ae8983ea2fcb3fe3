"""``example_layers``: a layer scorer with its own options (a ``custom`` scorer: it computes
its scores itself instead of streaming activations)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.scores import Scorer


@dataclass
class WeightNormConfig:
    """Options of ``example_layers``."""

    power: float = field(default=1.0, metadata={"help": "score = ||W_layer||_F ** power (> 0)"})
    drop: int | None = field(
        default=None, metadata={"help": "a layer index to score 0 (selected first)"}
    )

    def __post_init__(self) -> None:
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power!r}")
        if self.drop is not None and (not isinstance(self.drop, int) or self.drop < 0):
            raise ValueError(f"drop must be a layer index >= 0, got {self.drop!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"power": self.power, "drop": self.drop}


class WeightNormLayers(Scorer):
    """Layers scored by the Frobenius norm of their weights (higher = keep); ``drop`` marks
    one layer as the least important, so a test can tell that its option arrived."""

    name = "example_layers"
    unit = "layers"
    kind = "custom"
    config_class = WeightNormConfig

    def run(self, model, samples, ctx, config, *, batch_size: int, progress: bool):
        layers = list(ctx.adapter.layers(model))
        with torch.no_grad():
            norms = [
                torch.sqrt(sum(p.float().pow(2).sum() for p in layer.parameters()))
                for layer in layers
            ]
        scores = torch.stack(norms).pow(config.power)
        if config.drop is not None:
            if config.drop >= len(layers):
                raise ValueError(f"drop must be < {len(layers)} (the layers), got {config.drop}")
            scores[config.drop] = 0.0
        return scores
