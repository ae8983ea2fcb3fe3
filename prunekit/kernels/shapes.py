"""The layer shapes that ``bench-kernels`` times, and the timing cases built from them.

A :class:`KernelShape` is core's :class:`~prunekit.core.shapes.LayerShape` (heads, KV heads,
head size, MLP width) plus what a timing needs besides: a label ("dense" / "pruned"), the
model width and the MLP and attention kinds. :func:`planned_shapes` computes the per-layer
shapes a plan leaves from a config alone; :func:`rounding_variants` lists the widths on the
64/128 grid that a pruned width is compared with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prunekit.core.shapes import LayerShape

__all__ = [
    "MULTIPLES",
    "Case",
    "KernelShape",
    "attn_case",
    "describe_shapes",
    "mlp_case",
    "planned_shapes",
    "rounded_heads",
    "rounding_variants",
]

#: The block multiples a pruned width is checked against (tensor-core tiles).
MULTIPLES = (64, 128)


@dataclass(frozen=True)
class KernelShape:
    """The dimensions of one transformer layer that a kernel timing needs."""

    label: str = field(metadata={"help": "'dense' for the reference shape, 'pruned' otherwise"})
    hidden: int = field(metadata={"help": "model width (hidden_size), >= 1"})
    n_heads: int = field(metadata={"help": "query heads of the layer, >= 1"})
    n_kv_heads: int = field(metadata={"help": "KV heads (groups); divides n_heads"})
    head_dim: int = field(
        metadata={"help": "per-head width, >= 1 (the Triton kernel needs a power of 2, 16-256)"}
    )
    intermediate: int = field(metadata={"help": "MLP width (intermediate_size), >= 1"})
    gated: bool = field(
        default=True, metadata={"help": "SiLU-gated MLP (Llama) if true, GELU MLP (BERT) if not"}
    )
    causal: bool | None = field(
        default=None, metadata={"help": "causal attention; default: same as gated (decoders)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(
                f"label must be a non-empty string such as 'dense', got {self.label!r}"
            )
        for name in ("hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.causal is None:
            object.__setattr__(self, "causal", bool(self.gated))

    @classmethod
    def coerce(cls, obj: KernelShape | Mapping[str, Any] | Any) -> KernelShape:
        """Accept a KernelShape, a mapping or any dataclass with the same field names."""
        if isinstance(obj, cls):
            return obj
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"a layer shape must be a dict or a dataclass, got {type(obj)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown layer-shape keys {unknown}; valid keys: {sorted(names)}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ValueError(f"incomplete layer shape {dict(obj)}: {exc}") from exc

    @classmethod
    def from_layer(
        cls, layer: LayerShape, *, label: str, hidden: int, gated: bool, causal: bool
    ) -> KernelShape:
        """The timing shape of a core :class:`LayerShape` (an adapter says gated/causal)."""
        return cls(
            label=label,
            hidden=int(hidden),
            n_heads=layer.n_heads,
            n_kv_heads=layer.n_kv_heads,
            head_dim=layer.head_dim,
            intermediate=layer.intermediate,
            gated=bool(gated),
            causal=bool(causal),
        )


@dataclass(frozen=True)
class Case:
    """One op at one shape: what a provider is timed on (and what the timings are cached by)."""

    op: str  # gated_mlp | gelu_mlp | attention
    dims: tuple  # (hidden, intermediate) or (n_heads, n_kv_heads, head_dim, causal)


def mlp_case(shape: KernelShape, intermediate: int | None = None) -> Case:
    op = "gated_mlp" if shape.gated else "gelu_mlp"
    return Case(op, (shape.hidden, shape.intermediate if intermediate is None else intermediate))


def attn_case(shape: KernelShape, n_heads: int | None = None) -> Case:
    heads = shape.n_heads if n_heads is None else n_heads
    return Case("attention", (heads, shape.n_kv_heads, shape.head_dim, bool(shape.causal)))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def rounded_heads(shape: KernelShape, multiple: int) -> int:
    """Fewest heads >= n_heads, still whole KV groups, with heads * head_dim % multiple == 0."""
    heads = shape.n_heads
    while heads % shape.n_kv_heads or (heads * shape.head_dim) % multiple:
        heads += 1
    return heads


def rounding_variants(shape: KernelShape, case: Case) -> tuple[str, int, list[tuple]]:
    """(what, width, [(multiple, rounded_width, rounded_case)]) for widths off the 64/128 grid."""
    if case.op == "attention":
        what, width = "n_heads*head_dim", shape.n_heads * shape.head_dim
        variants = []
        for m in MULTIPLES:
            heads = rounded_heads(shape, m)
            variants.append((m, heads * shape.head_dim, attn_case(shape, heads)))
    else:
        what, width = "intermediate", shape.intermediate
        variants = [
            (m, _round_up(width, m), mlp_case(shape, _round_up(width, m))) for m in MULTIPLES
        ]
    return what, width, variants


def planned_shapes(shapes: list[LayerShape], plan: Any) -> list[LayerShape]:
    """Per-layer shapes after ``plan`` (removed layers dropped), computed from the config alone.

    Same rules as :func:`prunekit.apply_plan`: the plan is validated first, heads leave whole
    KV groups or the same number of query heads per group.
    """
    head_keeps = plan.validate(shapes)
    removed = set(plan.layers)
    out = []
    for i, s in enumerate(shapes):
        if i in removed:
            continue
        n_heads, n_kv = s.n_heads, s.n_kv_heads
        if i in head_keeps:
            keep_q, keep_kv = head_keeps[i]
            n_heads, n_kv = len(keep_q), len(keep_kv)
        neurons = len(set(plan.neurons.get(i, [])))
        out.append(LayerShape(n_heads, n_kv, s.head_dim, s.intermediate - neurons))
    return out


def _layer_ranges(indices: list[int]) -> str:
    parts, start = [], None
    for j, i in enumerate(indices):
        if start is None:
            start = i
        if j + 1 == len(indices) or indices[j + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def describe_shapes(label: str, shapes: list[LayerShape]) -> list[str]:
    """Lines that group a model's layers by shape: ``layers 0-3: 9 heads / 3 KV, ...``."""
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    lines = [f"{label}: {len(shapes)} layers, {len(groups)} distinct shape(s)"]
    for s, idx in groups.items():
        lines.append(
            f"  layers {_layer_ranges(idx)}: {s.n_heads} heads / {s.n_kv_heads} KV, "
            f"head_dim {s.head_dim}, MLP {s.intermediate}"
        )
    return lines
