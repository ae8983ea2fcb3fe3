"""``example_norms``: recovery that trains only normalization weights (all of them, or only
the final norm). Its config extends the shared training options with ``norms``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunekit.core.recovery import RecoveryConfig, RecoveryMethod
from prunekit.core.training import (
    TrainingSession,
    requires_grad_flags,
    set_requires_grad_flags,
)


@dataclass
class NormRecoveryConfig(RecoveryConfig):
    """Every :class:`RecoveryConfig` option, plus ``norms``."""

    norms: str = field(
        default="all", metadata={"help": "'all' normalization weights or only the 'final' one"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norms not in ("all", "final"):
            raise ValueError(f"norms must be 'all' or 'final', got {self.norms!r}")


class NormRecovery(RecoveryMethod):
    name = "example_norms"
    description = "train normalization weights only"
    config_class = NormRecoveryConfig

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        flags = requires_grad_flags(model)
        norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
        if config.norms == "final":
            last = list(norms)[-1]  # the final norm is registered after the layers
            norms = {last: norms[last]}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in norms.values():
            p.requires_grad_(True)

        def finish() -> nn.Module:
            set_requires_grad_flags(model, flags)
            return model

        return TrainingSession(model=model, module=model, params=norms, _finish=finish)
