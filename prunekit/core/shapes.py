"""Per-layer shapes of a transformer, as core sees them: query heads, KV heads, head size and
MLP width. Adapters read them from modules or configs; plans, scores and capture use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerShape:
    """Shape of one transformer layer: query heads, KV heads, head size, MLP width."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def config_global(config: Any, key: str, default: Any = None) -> Any:
    """Read a config attribute's global value, also on a heterogeneous (per-layer) config."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if getter is not None:
        return getter(key, default)
    return getattr(config, key, default)


__all__ = ["LayerShape", "config_global"]
