"""PrunePlan: which layers, heads and MLP neurons to remove. Pure data, JSON round-trip.

Indices always refer to the model the plan is applied to, *before* any removal (the
"original" model): ``heads[7]`` names query heads of original layer 7 even if layers before it
are removed by the same plan.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.core.jsonfile import read_json_object
from prunekit.core.shapes import LayerShape
from prunekit.errors import PruningPlanError


def _index(value: Any, entry: str) -> int:
    """An integer index (ints, numpy/torch integers); ``1.7``, ``"1"`` and ``True`` are
    errors, never silently truncated."""
    if isinstance(value, bool):
        raise PruningPlanError(f"{value!r} is not an integer index", entry=entry)
    try:
        return operator.index(value)
    except TypeError:
        raise PruningPlanError(f"{value!r} is not an integer index", entry=entry) from None


def _index_list(values: Any, entry: str) -> list[int]:
    if values is None:
        return []
    if isinstance(values, str | bytes | dict) or not isinstance(values, Iterable):
        raise PruningPlanError(f"expected a list of integer indices, got {values!r}", entry=entry)
    return sorted({_index(v, entry) for v in values})


def _int_keys(mapping: Any, what: str) -> dict[int, list[int]]:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise PruningPlanError(
            f"expected an object {{layer: [indices]}}, got {mapping!r}", entry=what
        )
    out: dict[int, list[int]] = {}
    for key, values in mapping.items():
        layer = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            layer = int(key)
        if isinstance(layer, str | float | bool) or not isinstance(layer, int):
            raise PruningPlanError(f"layer key {key!r} is not an integer", entry=what)
        out[layer] = _index_list(values, f"{what}[{key}]")
    return dict(sorted(out.items()))


@dataclass
class PrunePlan:
    """Units to remove. ``layers``: layer indices; ``heads``: layer -> query-head indices;
    ``neurons``: layer -> MLP neuron indices; ``attention`` / ``mlp``: indices of layers whose
    attention / MLP sub-block (with its norm) is removed, the residual path kept. Indices refer
    to the original model."""

    layers: list[int] = field(default_factory=list)
    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    attention: list[int] = field(default_factory=list)
    mlp: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layers = _index_list(self.layers, "layers")
        self.attention = _index_list(self.attention, "attention")
        self.mlp = _index_list(self.mlp, "mlp")
        if not isinstance(self.meta, dict):
            raise PruningPlanError(f"expected an object, got {self.meta!r}", entry="meta")
        self.heads = _int_keys(self.heads, "heads")
        self.neurons = _int_keys(self.neurons, "neurons")

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layers": list(self.layers),
            "heads": {str(k): v for k, v in self.heads.items()},
            "neurons": {str(k): v for k, v in self.neurons.items()},
        }
        for key in ("attention", "mlp"):
            if getattr(self, key):
                d[key] = list(getattr(self, key))
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        unknown = set(d) - {"layers", "heads", "neurons", "attention", "mlp", "meta"}
        if unknown:
            raise PruningPlanError(
                f"unknown keys {sorted(unknown)}; a plan has layers, heads, neurons, "
                "attention, mlp, meta"
            )
        return cls(
            layers=d.get("layers", []),
            heads=d.get("heads", {}),
            neurons=d.get("neurons", {}),
            meta=d.get("meta", {}),
            attention=d.get("attention", []),
            mlp=d.get("mlp", []),
        )

    def to_json(self, path: str | Path | None = None, **kw: Any) -> str:
        text = json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PrunePlan:
        """Read a plan from inline JSON or a file (``FileNotFoundError`` if it is missing)."""
        return cls.from_dict(read_json_object(text_or_path, "plan", PruningPlanError))

    def is_empty(self) -> bool:
        return not (
            self.layers
            or self.attention
            or self.mlp
            or any(self.heads.values())
            or any(self.neurons.values())
        )

    def summary(self) -> str:
        n_heads = sum(len(v) for v in self.heads.values())
        n_neurons = sum(len(v) for v in self.neurons.values())
        return (
            f"{len(self.layers)} layers, {n_heads} heads in {len(self.heads)} layers, "
            f"{n_neurons} neurons in {len(self.neurons)} layers"
            + (f", attention of {len(self.attention)} layers" if self.attention else "")
            + (f", MLP of {len(self.mlp)} layers" if self.mlp else "")
        )

    # ---- validation --------------------------------------------------------------------
    def validate(self, shapes: list[LayerShape]) -> dict[int, tuple[list[int], list[int]]]:
        """Check the whole plan against per-layer shapes; return, per layer with heads
        removed, ``(keep_query_heads, keep_kv_heads)``. Raises :class:`PruningPlanError`
        naming the offending entry."""
        n_layers = len(shapes)
        if self.is_empty():
            raise PruningPlanError(
                "the plan removes nothing; give layers, heads or neurons to remove", entry="plan"
            )
        for i in self.layers:
            if not 0 <= i < n_layers:
                raise PruningPlanError(
                    f"layer {i} out of range [0, {n_layers})", entry=f"layers[{i}]"
                )
        if len(self.layers) >= n_layers:
            raise PruningPlanError(
                f"removes all {n_layers} layers; keep at least one", entry="layers"
            )
        removed = set(self.layers)
        self._validate_subblocks(shapes)
        head_keeps: dict[int, tuple[list[int], list[int]]] = {}
        for what, mapping in (("heads", self.heads), ("neurons", self.neurons)):
            for layer, idx in mapping.items():
                entry = f"{what}[{layer}]"
                if not 0 <= layer < n_layers:
                    raise PruningPlanError(
                        f"layer {layer} out of range [0, {n_layers})", entry=entry
                    )
                if layer in removed:
                    raise PruningPlanError(
                        f"layer {layer} is removed whole by `layers`; drop this entry", entry=entry
                    )
                if not idx:
                    continue
                s = shapes[layer]
                total = s.n_heads if what == "heads" else s.intermediate
                bad = [i for i in idx if not 0 <= i < total]
                if bad:
                    raise PruningPlanError(
                        f"indices {bad[:5]} out of range [0, {total})", entry=entry
                    )
                if len(idx) >= total:
                    raise PruningPlanError(
                        f"removes all {total} {what} of layer {layer}; keep at least one "
                        "(or remove the layer with `layers`)",
                        entry=entry,
                    )
                if what == "heads":
                    head_keeps[layer] = _gqa_keep(idx, s, entry)
        return head_keeps

    def _validate_subblocks(self, shapes: list[LayerShape]) -> None:
        """``attention`` / ``mlp``: in range, not a layer removed whole, the sub-block still
        there, and never both sub-blocks of one layer (that is ``layers``)."""
        n_layers = len(shapes)
        both = {
            i
            for i in {*self.attention, *self.mlp}
            if 0 <= i < n_layers
            and not (shapes[i].has_attention and i not in self.attention)
            and not (shapes[i].has_mlp and i not in self.mlp)
        }
        for what, indices, present in (
            ("attention", self.attention, "has_attention"),
            ("mlp", self.mlp, "has_mlp"),
        ):
            for i in indices:
                entry = f"{what}[{i}]"
                if not 0 <= i < n_layers:
                    raise PruningPlanError(f"layer {i} out of range [0, {n_layers})", entry=entry)
                if i in self.layers:
                    raise PruningPlanError(
                        f"layer {i} is removed whole by `layers`; drop this entry", entry=entry
                    )
                if not getattr(shapes[i], present):
                    raise PruningPlanError(
                        f"layer {i} has no {what} sub-block left to remove", entry=entry
                    )
                if i in both:
                    raise PruningPlanError(
                        f"leaves layer {i} with neither attention nor MLP; remove the layer "
                        "with `layers`",
                        entry=entry,
                    )
                other = self.neurons if what == "mlp" else self.heads
                if other.get(i):
                    raise PruningPlanError(
                        f"layer {i} loses its {what} sub-block; drop its "
                        f"{'neurons' if what == 'mlp' else 'heads'} entry",
                        entry=entry,
                    )


def _gqa_keep(removed: list[int], s: LayerShape, entry: str) -> tuple[list[int], list[int]]:
    """GQA rule: a KV head goes only with all its query heads; the kept groups must all lose the
    same number of query heads, so ``num_key_value_groups`` stays uniform."""
    r = s.group_size
    gone = set(removed)
    counts = [sum((g * r + i) in gone for i in range(r)) for g in range(s.n_kv_heads)]
    partial = sorted({c for c in counts if c < r})
    if len(partial) > 1:
        detail = ", ".join(f"group {g}: {c}/{r}" for g, c in enumerate(counts))
        raise PruningPlanError(
            "GQA-inconsistent head set: remove whole KV groups, or the same number of query "
            f"heads from every kept group (query heads removed per group: {detail})",
            entry=entry,
        )
    keep_q = [h for h in range(s.n_heads) if h not in gone]
    keep_kv = [g for g, c in enumerate(counts) if c < r]
    return keep_q, keep_kv
