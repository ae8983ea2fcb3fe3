"""What to remove and with which scorers: :class:`Targets` (pure data, round-trips through a
recipe) and :func:`resolve_scorers`, which turns its scorer names into scorer objects once.

``layer_steps`` (SLEB, Song et al. 2024) removes the layers of *one* selection in k re-scored
steps on an unmodified model; the recipe's ``iterative`` is the outer loop that repeats
score → select → prune (→ recover) on the pruned model. ``iterative_layers`` is the old name
of ``layer_steps`` and still accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Any

from prunekit.core.scores import get_scorer, is_block

MODES = ("uniform", "per_layer")
HEAD_REMOVALS = ("groups", "per_group")
#: serving formats a selection can be constrained to (``Targets.serve``, core/serve_shapes.py)
SERVE_FORMATS = ("decilm",)
#: what a target can remove: whole layers, heads, neurons, attention / MLP sub-blocks
UNITS = ("layers", "heads", "neurons", "attention", "mlps")


def _check_amount(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1) or an int >= 0, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name}={value!r}: a float is a fraction in [0, 1); use an int for a count"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass
class Targets:
    """How much to remove and how to choose it."""

    layers: float | int = field(
        default=0, metadata={"help": "layers to remove: fraction in [0, 1) or count"}
    )
    heads: float | int = field(
        default=0,
        metadata={"help": "query heads to remove (of the kept layers): fraction or count"},
    )
    neurons: float | int = field(
        default=0,
        metadata={"help": "MLP neurons to remove (of the kept layers): fraction or count"},
    )
    attention: float | int = field(
        default=0,
        metadata={"help": "attention sub-blocks to remove: fraction of the layers or count"},
    )
    mlps: float | int = field(
        default=0, metadata={"help": "MLP sub-blocks to remove: fraction of the layers or count"}
    )
    layer_scorer: str = field(default="block_influence", metadata={"help": "layer scorer"})
    head_scorer: str = field(default="taylor", metadata={"help": "head scorer"})
    neuron_scorer: str = field(
        default="activation_frequency",
        metadata={
            "help": "neuron scorer (a head scorer means the neuron counterpart it declares: "
            "'taylor' -> 'neuron_taylor', 'magnitude' -> 'neuron_magnitude')"
        },
    )
    attention_scorer: str = field(
        default="attention_influence", metadata={"help": "attention sub-block scorer"}
    )
    mlp_scorer: str = field(default="mlp_influence", metadata={"help": "MLP sub-block scorer"})
    protect_first: int = field(default=1, metadata={"help": "first layers never removed"})
    protect_last: int = field(default=1, metadata={"help": "last layers never removed"})
    min_heads: int = field(default=1, metadata={"help": "query heads every layer keeps (>= 1)"})
    mode: str = field(
        default="uniform",
        metadata={"help": "'uniform': same count per layer (stock config); 'per_layer': global"},
    )
    head_removal: str = field(
        default="groups",
        metadata={"help": "'groups': whole KV groups; 'per_group': same count from each group"},
    )
    round_to: int = field(
        default=64, metadata={"help": "kept MLP width multiple (1 disables rounding)"}
    )
    contiguous: bool = field(
        default=False,
        metadata={"help": "remove one contiguous block of layers (always so for a block scorer)"},
    )
    serve: str | None = field(
        default=None,
        metadata={
            "help": "constrain the selection to shapes a serving format expresses: 'decilm' "
            "(one query-head count in every layer, MLP widths that ffn_mult expresses)"
        },
    )
    layer_steps: int = field(
        default=1,
        metadata={
            "help": "remove the layers in this many steps, re-scoring with the chosen layers "
            "masked before each (SLEB); not the recipe's 'iterative' prune(-recover) rounds"
        },
    )
    scorer_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "scorer name -> its options, e.g. {angular_distance: {token: all}}"},
    )
    #: old name of ``layer_steps``, accepted on input
    iterative_layers: InitVar[int | None] = None

    def __post_init__(self, iterative_layers: int | None = None) -> None:
        if iterative_layers is not None:
            self.layer_steps = iterative_layers
        for name in UNITS:
            _check_amount(name, getattr(self, name))
        for name in ("protect_first", "protect_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("min_heads", "round_to", "layer_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.serve is not None and self.serve not in SERVE_FORMATS:
            raise ValueError(f"serve must be one of {SERVE_FORMATS} or None, got {self.serve!r}")
        if self.head_removal not in HEAD_REMOVALS:
            raise ValueError(
                f"head_removal must be one of {HEAD_REMOVALS}, got {self.head_removal!r}"
            )
        for name in [self.scorer_field(u) for u in UNITS]:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a scorer name")
        if self.layer_steps > 1 and self.contiguous:
            raise ValueError(
                "layer_steps > 1 re-scores single layers; it cannot be combined with "
                "contiguous block selection (contiguous=True)"
            )
        if not isinstance(self.scorer_options, Mapping) or not all(
            isinstance(v, Mapping) for v in self.scorer_options.values()
        ):
            raise ValueError("scorer_options must map scorer names to mappings of options")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Targets:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"iterative_layers"}
        if unknown:
            raise ValueError(f"unknown target keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    @staticmethod
    def scorer_field(unit: str) -> str:
        """The field naming the scorer of ``unit`` (``"mlps"`` -> ``"mlp_scorer"``)."""
        return f"{unit.rstrip('s')}_scorer"

    def scorer_name(self, unit: str) -> str:
        """The scorer name this target gives for ``unit`` (as written, not resolved)."""
        return getattr(self, self.scorer_field(unit))


def resolve_scorers(targets: Targets) -> dict[str, Any]:
    """unit → scorer object for the units ``targets`` remove: each name resolved once (a head
    scorer named for neurons becomes the counterpart it declares), checked against its unit
    and availability, and a block scorer refused with ``layer_steps > 1``."""
    out = {
        unit: get_scorer(targets.scorer_name(unit), unit)
        for unit in UNITS
        if getattr(targets, unit)
    }
    if "layers" in out and targets.layer_steps > 1 and is_block(out["layers"]):
        raise ValueError(
            f"layer_steps > 1 re-scores single layers; {out['layers'].name!r} selects one "
            "contiguous block -- use layer_steps=1 or a per-layer scorer"
        )
    return out


def scorer_configs(
    targets: Targets, scorers: Mapping[str, Any], configs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``configs=`` for :func:`~prunekit.core.scores.score`: ``targets.scorer_options`` keyed by
    the resolved scorer names (a key may also be the name the target gives, e.g. ``taylor`` for
    ``neuron_taylor``), then ``configs`` on top."""
    out: dict[str, Any] = {}
    used = set()
    for unit, obj in scorers.items():
        for key in dict.fromkeys((targets.scorer_name(unit), obj.name)):
            if key in targets.scorer_options:
                out.setdefault(obj.name, {}).update(targets.scorer_options[key])
                used.add(key)
    unknown = sorted(set(targets.scorer_options) - used)
    if unknown:
        raise ValueError(
            f"scorer_options for {unknown}: no target uses these scorers "
            f"({', '.join(o.name for o in scorers.values()) or 'none'})"
        )
    for name, cfg in (configs or {}).items():
        out[name] = cfg if not isinstance(cfg, Mapping) else {**out.get(name, {}), **cfg}
    return out


def parse_amount(text: str) -> float | int:
    """A target amount as written on a command line: ``"3"`` (or ``"3.0"``) → the count 3,
    ``"0.25"`` → the fraction 0.25. Raises ``ValueError`` for anything else."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a fraction in [0, 1) nor a count") from None
    if value < 0 or math.isnan(value):
        raise ValueError(f"{text!r}: an amount is a fraction in [0, 1) or a count >= 0")
    if value < 1:
        return value
    if value != int(value):
        raise ValueError(f"{text!r}: a count must be a whole number (a fraction is below 1)")
    return int(value)


def count_of(amount: float | int, total: int) -> int:
    """Units a target asks for out of ``total``."""
    if isinstance(amount, float):
        return int(round(amount * total))
    return int(amount)


def unit_counts(shapes: list) -> dict[str, int]:
    """Layers, query heads, MLP neurons, attention and MLP sub-blocks of a model of
    ``shapes``."""
    return {
        "layers": len(shapes),
        "heads": sum(s.n_heads for s in shapes),
        "neurons": sum(s.intermediate for s in shapes),
        "attention": sum(s.has_attention for s in shapes),
        "mlps": sum(s.has_mlp for s in shapes),
    }


#: unit -> (LayerShape size, LayerShape flag saying the sub-block is there)
_SIZES = {"heads": ("n_heads", "has_attention"), "neurons": ("intermediate", "has_mlp")}


def _goal_fraction(goal: float | int, total: int) -> float:
    return goal if isinstance(goal, float) else goal / total if total else 0.0


def step_targets(
    t: Targets, k: int, step: int, dense_counts: dict[str, int], shapes: list
) -> Targets:
    """Targets for iteration ``step`` (1-based) of ``k`` (the recipe's ``iterative``).

    The cumulative goal grows linearly with the step: after step s of k, a fraction s/k of
    each target is removed. Layers, attention and MLP sub-blocks are counted against the dense
    layer count (each step asks for the count still missing: a sub-block removed in an earlier
    step counts, a layer removed whole is no sub-block); heads and neurons as a fraction of
    those of the layers that still have the sub-block (the selection's rule), so each step asks
    for the fraction of the *current* model that reaches the cumulative goal."""
    if k == 1:
        return t
    n_layers0 = dense_counts["layers"]
    changes: dict[str, Any] = {}
    for unit in ("layers", "attention", "mlps"):
        cum = round(_goal_fraction(getattr(t, unit), n_layers0) * step / k * n_layers0)
        if unit == "layers":
            done = n_layers0 - len(shapes)
        else:
            flag = "has_attention" if unit == "attention" else "has_mlp"
            done = sum(not getattr(s, flag) for s in shapes)
        changes[unit] = max(cum - done, 0)
    for unit, (size, flag) in _SIZES.items():
        total0 = dense_counts[unit]
        cum = _goal_fraction(getattr(t, unit), total0) * step / k
        present = [s for s in shapes if getattr(s, flag)]
        full = total0 / n_layers0 * len(present)
        done = 1 - sum(getattr(s, size) for s in present) / full if full else 1.0
        changes[unit] = max(0.0, (cum - done) / (1 - done)) if done < 1 else 0.0
    return dataclasses.replace(t, **changes)


__all__ = [
    "HEAD_REMOVALS",
    "MODES",
    "SERVE_FORMATS",
    "UNITS",
    "Targets",
    "count_of",
    "parse_amount",
    "resolve_scorers",
    "scorer_configs",
    "step_targets",
    "unit_counts",
]
