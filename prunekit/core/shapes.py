"""Per-layer shapes of a transformer, as core sees them: query heads, KV heads, head size and
MLP width. Adapters read them from modules or configs; plans, scores and capture use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LayerShape:
    """Shape of one transformer layer: query heads, KV heads, head size, MLP width.

    A layer whose attention sub-block was removed has ``n_heads == n_kv_heads == 0`` (it keeps
    ``head_dim``, the model's); one whose MLP was removed has ``intermediate == 0``. Counts of
    parameters, FLOPs and KV cache computed from the shape are then right without a special
    case."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def has_attention(self) -> bool:
        return self.n_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate > 0

    def without(self, attention: bool = False, mlp: bool = False) -> LayerShape:
        """This shape with its attention and/or MLP sub-block removed."""
        return LayerShape(
            n_heads=0 if attention else self.n_heads,
            n_kv_heads=0 if attention else self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate=0 if mlp else self.intermediate,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def config_global(config: Any, key: str, default: Any = None) -> Any:
    """Read a config attribute's global value, also on a heterogeneous (per-layer) config."""
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    if getter is not None:
        return getter(key, default)
    return getattr(config, key, default)


__all__ = ["LayerShape", "config_global"]
