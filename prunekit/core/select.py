"""From scores and targets to a :class:`~prunekit.core.plan.PrunePlan`.

Rules (each enforced, each covered by property-based tests):

- **Counts.** A float in [0, 1) is a fraction of the total, an int ≥ 1 a count. Heads are
  counted in query heads. When layers are removed too, the head and neuron totals are those of
  the *kept* layers (a removed layer's heads and neurons are gone already and count toward
  nothing), e.g. ``heads=0.25`` removes a quarter of the query heads that the kept layers hold.
- **Protection.** The first ``protect_first`` and last ``protect_last`` layers are never
  removed. In ``per_layer`` mode their heads and neurons are left whole too; ``uniform`` mode
  prunes every kept layer by the same amount (that is what makes the result loadable by a
  stock config), so protection there applies to whole-layer removal only.
- **Layers.** The lowest-scoring unprotected layers go. ``angular_distance`` (which scores
  blocks) and ``contiguous=True`` select one contiguous block of the requested size: the start
  l minimising ``D[n-1, l]`` for angular distance (Gromov et al.), the minimal score sum
  otherwise.
- **Heads (GQA).** ``head_removal="groups"`` removes whole KV groups (a group's score is the
  sum of its query heads' scores); ``"per_group"`` removes the same number of query heads from
  every KV group of a layer (the lowest-scoring ones in each group). Either way every layer
  keeps at least one KV group and at least ``min_heads`` query heads. For multi-head attention
  (one query head per KV head) both are the same: heads are removed one by one.
- **Uniform mode** removes the same number of units from every kept layer; a target that is
  not a multiple of the step (query heads per removed unit × layers) is rounded to the nearest
  achievable count, and a target that rounds to zero is an error (use ``per_layer`` mode).
  **Per-layer mode** ranks units globally across layers and removes the lowest.
- **Rounding.** Kept MLP widths are rounded to the nearest multiple of ``round_to`` (never
  above the layer's width and never below ``round_to``; ``round_to=1`` disables it).
- **Iterative layers** (SLEB, Song et al. 2024): with ``iterative_layers=k > 1``,
  :func:`plan_for` removes layers in k steps and re-scores the model (with the layers chosen so
  far masked out) before each step, instead of ranking once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from prunekit.core.plan import PrunePlan
from prunekit.core.scores import Scores, get_scorer

MODES = ("uniform", "per_layer")
HEAD_REMOVALS = ("groups", "per_group")


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
    layer_scorer: str = field(default="block_influence", metadata={"help": "layer scorer"})
    head_scorer: str = field(default="taylor", metadata={"help": "head scorer"})
    neuron_scorer: str = field(
        default="activation_frequency",
        metadata={"help": "neuron scorer ('taylor'/'magnitude' mean the neuron variants)"},
    )
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
        metadata={"help": "remove one contiguous block of layers (always so for angular_distance)"},
    )
    iterative_layers: int = field(
        default=1, metadata={"help": "re-score after each of this many layer-removal steps"}
    )

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "neurons"):
            _check_amount(name, getattr(self, name))
        for name in ("protect_first", "protect_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("min_heads", "round_to", "iterative_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.head_removal not in HEAD_REMOVALS:
            raise ValueError(
                f"head_removal must be one of {HEAD_REMOVALS}, got {self.head_removal!r}"
            )
        for name in ("layer_scorer", "head_scorer", "neuron_scorer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a scorer name")
        if self.iterative_layers > 1 and self.block_mode:
            raise ValueError(
                "iterative_layers > 1 re-scores single layers; it cannot be combined with "
                "contiguous block selection (contiguous=True or layer_scorer='angular_distance')"
            )

    @property
    def block_mode(self) -> bool:
        """Whether layers are removed as one contiguous block."""
        return self.contiguous or self.layer_scorer == "angular_distance"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Targets:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown target keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def scorer_names(self) -> dict[str, str]:
        """unit → registered scorer name, for the units that have a target."""
        out = {}
        if self.layers:
            out["layers"] = get_scorer(self.layer_scorer, "layers").name
        if self.heads:
            out["heads"] = get_scorer(self.head_scorer, "heads").name
        if self.neurons:
            out["neurons"] = get_scorer(self.neuron_scorer, "neurons").name
        return out


def count_of(amount: float | int, total: int) -> int:
    """Units a target asks for out of ``total``."""
    if isinstance(amount, float):
        return int(round(amount * total))
    return int(amount)


# ---- layers ----------------------------------------------------------------------------------
def _layer_vector(values: torch.Tensor) -> torch.Tensor:
    """Per-layer scores; for a block matrix (angular distance) its n = 1 row."""
    return values[0] if values.dim() == 2 else values


def select_layers(
    scores: Scores, targets: Targets, *, already: list[int] | None = None, count: int | None = None
) -> list[int]:
    """Layers to remove (sorted), ``already`` removed ones included, ``count`` in total."""
    L = scores.n_layers
    already = sorted(already or [])
    k = count_of(targets.layers, L) if count is None else count
    name = get_scorer(targets.layer_scorer, "layers").name
    values = scores[name]
    lo, hi = targets.protect_first, L - targets.protect_last
    allowed = [i for i in range(max(lo, 0), max(hi, 0)) if i not in already]
    need = k - len(already)
    if need <= 0:
        return already
    if need > len(allowed):
        raise ValueError(
            f"layers target asks to remove {k} of {L} layers but only {len(allowed) + len(already)}"
            f" are unprotected (protect_first={targets.protect_first}, protect_last="
            f"{targets.protect_last}); lower the target or the protection"
        )
    if k >= L:
        raise ValueError(f"layers target removes all {L} layers; keep at least one")
    if targets.block_mode:
        if already:
            raise ValueError("contiguous block selection does not combine with removed layers")
        best, best_cost = None, math.inf
        for start in range(lo, hi - k + 1):
            if values.dim() == 2:
                cost = float(values[k - 1, start])
            else:
                cost = float(values[start : start + k].sum())
            if not math.isnan(cost) and cost < best_cost:
                best, best_cost = start, cost
        if best is None:
            raise ValueError(f"no block of {k} unprotected layers has a finite score")
        return list(range(best, best + k))
    vec = _layer_vector(values)
    order = sorted(allowed, key=lambda i: (float(vec[i]), i))
    return sorted(already + order[:need])


# ---- heads -----------------------------------------------------------------------------------
def _pool(scores: Scores, targets: Targets, removed: list[int]) -> list[int]:
    L = scores.n_layers
    kept = [i for i in range(L) if i not in set(removed)]
    if targets.mode == "per_layer":
        kept = [i for i in kept if targets.protect_first <= i < L - targets.protect_last]
    return kept


def _uniform_step_error(what: str, asked: int, step: int, hint: str) -> ValueError:
    return ValueError(
        f"{what} target ({asked}) is below half the smallest uniform step ({step}: one unit in "
        f"every kept layer); {hint}, use mode='per_layer', or ask for more"
    )


def select_heads(scores: Scores, targets: Targets, removed_layers: list[int]) -> dict:
    name = get_scorer(targets.head_scorer, "heads").name
    rows = scores.layer_rows(name)
    pool = _pool(scores, targets, removed_layers)
    shapes = scores.shapes
    total = sum(shapes[i].n_heads for i in pool)
    k = count_of(targets.heads, total)
    if k == 0 or not pool:
        return {}
    by_groups = targets.head_removal == "groups" or any(shapes[i].group_size == 1 for i in pool)
    if targets.mode == "uniform":
        return _heads_uniform(rows, shapes, pool, k, targets, by_groups)
    return _heads_per_layer(rows, shapes, pool, k, targets, by_groups)


def _group_scores(row: torch.Tensor, s) -> torch.Tensor:
    return row.reshape(s.n_kv_heads, s.group_size).sum(1)


def _check_keep(s, n_heads_kept: int, n_groups_kept: int, targets: Targets, layer: int) -> None:
    if n_groups_kept < 1 or n_heads_kept < targets.min_heads or n_heads_kept < 1:
        raise ValueError(
            f"heads target leaves layer {layer} with {n_heads_kept} query heads in "
            f"{n_groups_kept} KV groups (min_heads={targets.min_heads}, at least one group); "
            "lower the heads target or min_heads"
        )


def _heads_uniform(rows, shapes, pool, k, targets, by_groups) -> dict:
    if len({shapes[i] for i in pool}) > 1:
        raise ValueError(
            "uniform head removal needs every kept layer to have the same shape; this model's "
            "layers differ -- use mode='per_layer'"
        )
    s = shapes[pool[0]]
    out = {}
    if by_groups:
        step = s.group_size * len(pool)
        r = int(round(k / step))
        if r == 0:
            raise _uniform_step_error("heads", k, step, "use head_removal='per_group'")
        for i in pool:
            _check_keep(s, (s.n_kv_heads - r) * s.group_size, s.n_kv_heads - r, targets, i)
            g = _group_scores(rows[i], s)
            drop = sorted(torch.argsort(g, stable=True)[:r].tolist())
            out[i] = [gi * s.group_size + j for gi in drop for j in range(s.group_size)]
        return out
    step = s.n_kv_heads * len(pool)
    m = int(round(k / step))
    if m == 0:
        raise _uniform_step_error("heads", k, step, "use head_removal='groups'")
    for i in pool:
        _check_keep(s, s.n_kv_heads * (s.group_size - m), s.n_kv_heads, targets, i)
        if m >= s.group_size:
            raise ValueError(
                f"per_group removal of {m} query heads per group empties the groups of layer "
                f"{i} (group size {s.group_size}); lower the heads target"
            )
        out[i] = _per_group_drop(rows[i], s, m)
    return out


def _per_group_drop(row: torch.Tensor, s, m: int) -> list[int]:
    grid = row.reshape(s.n_kv_heads, s.group_size)
    drop = []
    for g in range(s.n_kv_heads):
        lowest = torch.argsort(grid[g], stable=True)[:m].tolist()
        drop += [g * s.group_size + j for j in lowest]
    return sorted(drop)


def _heads_per_layer(rows, shapes, pool, k, targets, by_groups) -> dict:
    removed_q = 0
    out: dict[int, list[int]] = {}
    if by_groups:
        units = []
        for i in pool:
            g = _group_scores(rows[i], shapes[i])
            units += [(float(g[gi]), i, gi) for gi in range(shapes[i].n_kv_heads)]
        units.sort()
        gone = {i: 0 for i in pool}
        for _, i, gi in units:
            if removed_q >= k:
                break
            s = shapes[i]
            left = s.n_kv_heads - gone[i] - 1
            if left < 1 or left * s.group_size < targets.min_heads:
                continue
            gone[i] += 1
            out.setdefault(i, []).extend(gi * s.group_size + j for j in range(s.group_size))
            removed_q += s.group_size
        return {i: sorted(v) for i, v in out.items()}
    # per_group: grow each layer's per-group removal m_l greedily by the cheapest next step
    m = {i: 0 for i in pool}
    sorted_grid = {
        i: rows[i].reshape(shapes[i].n_kv_heads, shapes[i].group_size).sort(dim=1).values
        for i in pool
    }
    while removed_q < k:
        best, best_cost = None, math.inf
        for i in pool:
            s = shapes[i]
            nxt = m[i] + 1
            if nxt >= s.group_size or s.n_kv_heads * (s.group_size - nxt) < targets.min_heads:
                continue
            cost = float(sorted_grid[i][:, m[i]].mean())
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        m[best] += 1
        removed_q += shapes[best].n_kv_heads
    return {i: _per_group_drop(rows[i], shapes[i], m[i]) for i in pool if m[i]}


# ---- neurons ---------------------------------------------------------------------------------
def round_width(kept: int, width: int, round_to: int) -> int:
    """``kept`` rounded to the nearest multiple of ``round_to``, within [round_to, width]
    (the floor multiple if the nearest exceeds ``width``); unchanged when ``round_to`` is 1 or
    larger than the width."""
    if round_to <= 1 or width < round_to:
        return max(1, min(kept, width))
    r = int(round(kept / round_to)) * round_to
    if r > width:
        r = (width // round_to) * round_to
    return max(round_to, r)


def select_neurons(scores: Scores, targets: Targets, removed_layers: list[int]) -> dict:
    name = get_scorer(targets.neuron_scorer, "neurons").name
    rows = scores.layer_rows(name)
    pool = _pool(scores, targets, removed_layers)
    shapes = scores.shapes
    total = sum(shapes[i].intermediate for i in pool)
    k = count_of(targets.neurons, total)
    if k == 0 or not pool:
        return {}
    if targets.mode == "uniform":
        r = int(round(k / len(pool)))
        if r == 0:
            raise _uniform_step_error("neurons", k, len(pool), "lower the rounding")
        n_remove = {}
        for i in pool:
            width = shapes[i].intermediate
            n_remove[i] = width - round_width(width - r, width, targets.round_to)
    else:
        flat = torch.cat([rows[i].float() for i in pool])
        owner = torch.cat([torch.full((shapes[i].intermediate,), i) for i in pool])
        lowest = owner[torch.argsort(flat, stable=True)[:k]]
        n_remove = {}
        for i in pool:
            width = shapes[i].intermediate
            c = int((lowest == i).sum())
            n_remove[i] = width - round_width(width - c, width, targets.round_to) if c else 0
    out = {}
    for i, c in n_remove.items():
        if c > 0:
            out[i] = sorted(torch.argsort(rows[i], stable=True)[:c].tolist())
    return out


# ---- the API ---------------------------------------------------------------------------------
def select(scores: Scores, targets: Targets, *, layers: list[int] | None = None) -> PrunePlan:
    """Turn scores into a plan of units to remove (see the module doc for the rules).
    ``layers``: layers already chosen (e.g. by iterative re-scoring); selected otherwise."""
    if not scores.shapes:
        raise ValueError("scores carry no layer shapes; make them with prunekit.score")
    if layers is None:
        layers = select_layers(scores, targets) if targets.layers else []
    plan = PrunePlan(
        layers=layers,
        heads=select_heads(scores, targets, layers) if targets.heads else {},
        neurons=select_neurons(scores, targets, layers) if targets.neurons else {},
        meta={"targets": targets.to_dict(), "scorers": targets.scorer_names()},
    )
    if not plan.is_empty():
        plan.validate(scores.shapes)
    return plan


def plan_for(
    model: Any,
    samples: torch.Tensor,
    targets: Targets,
    *,
    progress: bool = True,
    batch_size: int = 8,
    configs: dict[str, Any] | None = None,
) -> tuple[PrunePlan, Scores]:
    """Score exactly what ``targets`` need (one capture pass for the forward-only scorers) and
    select. With ``iterative_layers > 1`` the layers are removed in that many steps, each
    re-scored with the layers chosen so far masked out; the head and neuron scores are then
    computed with all chosen layers masked."""
    from prunekit.core.masking import masked
    from prunekit.core.scores import score

    names = targets.scorer_names()
    if not names:
        raise ValueError("targets remove nothing: set layers, heads or neurons")
    configs = configs or {}

    def run(which: list[str]) -> Scores:
        cfg = {n: configs[n] for n in which if n in configs}
        return score(model, samples, which, batch_size=batch_size, progress=progress, configs=cfg)

    if targets.iterative_layers <= 1 or "layers" not in names:
        scores = run(list(dict.fromkeys(names.values())))
        return select(scores, targets), scores
    from prunekit.plugins import get_adapter

    L = len(get_adapter(model).layers(model))
    k = count_of(targets.layers, L)
    steps = min(targets.iterative_layers, k) or 1
    sizes = [k // steps + (1 if s < k % steps else 0) for s in range(steps)]
    removed: list[int] = []
    history = []
    layer_scores = None
    for size in sizes:
        with masked(model, PrunePlan(layers=removed)):
            layer_scores = run([names["layers"]])
        removed = select_layers(layer_scores, targets, already=removed, count=len(removed) + size)
        history.append(list(removed))
    scores = layer_scores
    others = [n for u, n in names.items() if u != "layers"]
    if others:
        with masked(model, PrunePlan(layers=removed)):
            scores = scores.merge(run(list(dict.fromkeys(others))))
    scores.meta["iterative_layers"] = history
    plan = select(scores, targets, layers=removed)
    plan.meta["iterative_layers"] = history
    return plan, scores


__all__ = ["Targets", "count_of", "plan_for", "round_width", "select", "select_layers"]
