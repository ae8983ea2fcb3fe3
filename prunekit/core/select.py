"""From scores and targets to a :class:`~prunekit.core.plan.PrunePlan`.

Rules (each enforced, each covered by property-based tests):

- **Counts.** A float in [0, 1) is a fraction of the total, an int ≥ 1 a count. Heads are
  counted in query heads, of the *kept* layers when layers are removed too (a removed layer's
  units count toward nothing): ``heads=0.25`` removes a quarter of the kept layers' heads.
- **Protection.** The first ``protect_first`` and last ``protect_last`` layers are never
  removed. In ``per_layer`` mode their heads and neurons are left whole too; ``uniform`` mode
  prunes every kept layer by the same amount (that is what makes the result loadable by a
  stock config), so protection there applies to whole-layer removal only.
- **Layers.** The lowest-scoring unprotected layers go. A block scorer (``block = True`` in
  its metadata, e.g. ``angular_distance``) and ``contiguous=True`` select one contiguous block
  of the requested size: the start l minimising ``D[n-1, l]`` for a block scorer's matrix
  (Gromov et al.), the minimal score sum otherwise.
- **Heads (GQA).** ``head_removal="groups"`` removes whole KV groups (a group's score is the
  sum of its query heads' scores); ``"per_group"`` removes the same number of query heads from
  every KV group of a layer (the lowest-scoring ones in each group). Either way every layer
  keeps at least one KV group and at least ``min_heads`` query heads. For multi-head attention
  (one query head per KV head) both are the same: heads are removed one by one.
- **Uniform mode** removes the same number of units from every kept layer; a target off the
  step (query heads per removed unit × layers) is rounded to the nearest achievable count
  (``plan.meta["adjusted"]`` says asked vs removed and why); zero or too many is an error.
  **Per-layer mode** ranks units globally across layers and removes the lowest.
- **Rounding.** Kept MLP widths are rounded to the nearest multiple of ``round_to`` (never
  above the layer's width and never below ``round_to``; ``round_to=1`` disables it).
- **Layer steps** (SLEB, Song et al. 2024): ``layer_steps=k > 1`` makes :func:`plan_for`
  remove the layers of one selection in k steps, re-scoring an unmodified model with the
  chosen layers masked before each; the recipe's ``iterative`` is the outer score → select →
  prune (→ recover) loop. ``iterative_layers`` is the old name of ``layer_steps``.
- **Serving** (``serve="decilm"``): only shapes the format expresses (one query-head count,
  ``ffn_mult`` widths), see :mod:`prunekit.core.serve_shapes`.

Scorer names are resolved once (:func:`resolve_scorers`); the selection reads metadata only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from prunekit.core.plan import PrunePlan
from prunekit.core.scores import Scores, get_scorer, group_sums, is_block
from prunekit.core.serve_shapes import serve_heads, serve_targets
from prunekit.core.subblocks import select_subblocks
from prunekit.core.targets import Targets, count_of, resolve_scorers, scorer_configs


# ---- layers ----------------------------------------------------------------------------------
def _layer_vector(values: torch.Tensor) -> torch.Tensor:
    """Per-layer scores; for a block matrix (angular distance) its n = 1 row."""
    return values[0] if values.dim() == 2 else values


def select_layers(
    scores: Scores,
    targets: Targets,
    *,
    already: list[int] | None = None,
    count: int | None = None,
    scorer: Any = None,
) -> list[int]:
    """Layers to remove (sorted), ``already`` removed ones included, ``count`` in total.
    ``scorer``: the resolved layer scorer (resolved from ``targets`` when not given)."""
    L = scores.n_layers
    already = sorted(already or [])
    k = count_of(targets.layers, L) if count is None else count
    scorer = scorer or get_scorer(targets.layer_scorer, "layers")
    values = scores[scorer.name]
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
    if targets.contiguous or is_block(scorer):
        if already:
            raise ValueError("contiguous block selection does not combine with removed layers")
        return _best_block(values, k, lo, hi)
    vec = _layer_vector(values)
    order = sorted(allowed, key=lambda i: (float(vec[i]), i))
    return sorted(already + order[:need])


def _best_block(values: torch.Tensor, k: int, lo: int, hi: int) -> list[int]:
    """The ``k`` contiguous layers within [lo, hi) cheapest to remove: by a block matrix's
    ``D[k-1, start]``, or by the sum of per-layer scores."""
    best, best_cost = None, math.inf
    for start in range(lo, hi - k + 1):
        block = values[k - 1, start] if values.dim() == 2 else values[start : start + k].sum()
        cost = float(block)
        if not math.isnan(cost) and cost < best_cost:
            best, best_cost = start, cost
    if best is None:
        raise ValueError(f"no block of {k} unprotected layers has a finite score")
    return list(range(best, best + k))


# ---- heads -----------------------------------------------------------------------------------
def _pool(L: int, targets: Targets, removed: list[int], unit: str = "neurons") -> list[int]:
    """The layers that may lose heads or neurons (``serve``: every layer loses heads)."""
    kept = [i for i in range(L) if i not in set(removed)]
    if targets.mode == "per_layer" and not (unit == "heads" and targets.serve):
        kept = [i for i in kept if targets.protect_first <= i < L - targets.protect_last]
    return kept


def _unit_pool(
    scores: Scores, targets: Targets, removed: list[int], scorer: Any, unit: str
) -> tuple[list[torch.Tensor], list[int], int]:
    """For heads or neurons: the per-layer score rows of ``scorer`` (resolved from the
    targets if ``None``), the layers that may lose units, how many to remove (0: none may)."""
    scorer = scorer or get_scorer(targets.scorer_name(unit), unit)
    rows = scores.layer_rows(scorer.name)
    pool = _pool(scores.n_layers, targets, removed, unit)
    total = _unit_total(scores.shapes, pool, unit)
    k = count_of(getattr(targets, unit), total)
    if pool and k >= total and (unit == "neurons" or k > total):
        raise ValueError(
            f"{unit} target asks to remove {k} of the {total} {_UNIT_WORDS[unit]} in the "
            f"{len(pool)} layers that may lose them; every layer keeps at least one -- lower "
            f"the target (a fraction in [0, 1) or a count below {total})"
        )
    return rows, pool, k if pool else 0


_UNIT_WORDS = {"heads": "query heads", "neurons": "MLP neurons"}


def _unit_total(shapes, pool: list[int], unit: str) -> int:
    size = "n_heads" if unit == "heads" else "intermediate"
    return sum(getattr(shapes[i], size) for i in pool)


def _uniform_step_error(what: str, asked: int, step: int, hint: str) -> ValueError:
    return ValueError(
        f"{what} target ({asked}) is below half the smallest uniform step ({step}: one unit in "
        f"every kept layer); {hint}, use mode='per_layer', or ask for more"
    )


def select_heads(
    scores: Scores, targets: Targets, removed_layers: list[int], scorer: Any = None
) -> dict:
    """Query heads to remove per kept layer (see the module doc for the GQA rules)."""
    rows, pool, k = _unit_pool(scores, targets, removed_layers, scorer, "heads")
    if k == 0:
        return {}
    shapes = scores.shapes
    if targets.serve and targets.mode == "per_layer":  # one query-head count in every layer
        return serve_heads(rows, shapes, pool, k, targets)
    by_groups = targets.head_removal == "groups" or any(shapes[i].group_size == 1 for i in pool)
    if targets.mode == "uniform":
        return _heads_uniform(rows, shapes, pool, k, targets, by_groups)
    return _heads_per_layer(rows, shapes, pool, k, targets, by_groups)


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
            g = group_sums(rows[i], s)
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
            g = group_sums(rows[i], shapes[i])
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
    """``kept`` rounded to the nearest multiple of ``round_to`` within [round_to, width] (else
    the floor multiple); unchanged when ``round_to`` is 1 or larger than the width."""
    if round_to <= 1 or width < round_to:
        return max(1, min(kept, width))
    r = int(round(kept / round_to)) * round_to
    if r > width:
        r = (width // round_to) * round_to
    return max(round_to, r)


def select_neurons(
    scores: Scores, targets: Targets, removed_layers: list[int], scorer: Any = None
) -> dict:
    """MLP neurons to remove per kept layer, kept widths rounded to ``targets.round_to``."""
    shapes = scores.shapes
    rows, pool, k = _unit_pool(scores, targets, removed_layers, scorer, "neurons")
    if not k:
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
def select(
    scores: Scores,
    targets: Targets,
    *,
    layers: list[int] | None = None,
    scorers: Mapping[str, Any] | None = None,
) -> PrunePlan:
    """Turn scores into a plan of units to remove (see the module doc for the rules).
    ``layers``: layers already chosen (e.g. by re-scoring in steps); selected otherwise.
    ``scorers``: unit → scorer object from :func:`resolve_scorers` (resolved here if not
    given)."""
    if not scores.shapes:
        raise ValueError("scores carry no layer shapes; make them with prunekit.score")
    scorers = resolve_scorers(targets) if scorers is None else scorers
    targets = serve_targets(targets)  # a serving format's MLP width multiple
    if layers is None:
        layers = select_layers(scores, targets, scorer=scorers["layers"]) if targets.layers else []
    attention, mlp = select_subblocks(scores, targets, layers, scorers)
    no_heads, no_neurons = [*layers, *attention], [*layers, *mlp]
    plan = PrunePlan(
        layers=layers,
        heads=select_heads(scores, targets, no_heads, scorers["heads"]) if targets.heads else {},
        neurons=(
            select_neurons(scores, targets, no_neurons, scorers["neurons"])
            if targets.neurons
            else {}
        ),
        attention=attention,
        mlp=mlp,
        meta={
            "targets": targets.to_dict(),
            "scorers": {unit: obj.name for unit, obj in scorers.items()},
        },
    )
    if not plan.is_empty():
        plan.validate(scores.shapes)
    notes = adjustments(plan, scores.shapes, targets)
    if notes:
        plan.meta["adjusted"] = notes
    return plan


def _why_adjusted(unit: str, targets: Targets) -> str:
    if unit == "neurons":
        rounding = f"kept MLP widths are multiples of round_to={targets.round_to}"
        if targets.mode == "uniform":
            return f"uniform mode removes the same count from every kept layer and {rounding}"
        return rounding
    if targets.mode == "per_layer":
        if targets.serve:
            return f"serve={targets.serve!r} removes one query-head count from every layer"
        return f"every layer keeps at least one KV group and min_heads={targets.min_heads}"
    if targets.head_removal == "groups":
        return "uniform mode removes whole KV groups, the same number from every kept layer"
    return "uniform mode removes the same count from every KV group of every kept layer"


def adjustments(plan: PrunePlan, shapes: list, targets: Targets) -> list[str]:
    """One line per unit whose removed count differs from the count asked for (uniform
    steps, GQA groups, MLP width rounding): what was asked, what is removed, and why."""
    notes = []
    for unit in ("heads", "neurons"):
        amount = getattr(targets, unit)
        if not amount:
            continue
        gone = plan.attention if unit == "heads" else plan.mlp  # as select() pools them
        kept = _pool(len(shapes), targets, [*plan.layers, *gone], unit)
        total = _unit_total(shapes, kept, unit)
        asked = count_of(amount, total)
        got = sum(len(v) for v in getattr(plan, unit).values())
        if total and got != asked:
            shown = f"{amount:.0%} = {asked}" if isinstance(amount, float) else str(asked)
            notes.append(
                f"{unit}: asked {shown} of {total} {_UNIT_WORDS[unit]}, removing {got} "
                f"({got / total:.0%}) because {_why_adjusted(unit, targets)}"
            )
    return notes


def check_targets(shapes: list, targets: Targets, scorers: Mapping[str, Any] | None = None):
    """Run the selection on placeholder scores for a model of ``shapes`` (read from its
    config): every count, protection and GQA rule that :func:`select` enforces raises here,
    before any weight is loaded or scored, and a unit whose target rounds to nothing is an
    error. Returns the placeholder plan (its counts are those the real selection removes)."""
    scorers = resolve_scorers(targets) if scorers is None else scorers
    values: dict[str, Any] = {}
    units: dict[str, str] = {}
    n = len(shapes)
    for unit, obj in scorers.items():
        if unit in ("heads", "neurons"):
            size = "n_heads" if unit == "heads" else "intermediate"
            values[obj.name] = [torch.zeros(getattr(s, size)) for s in shapes]
        else:  # layers, attention, mlps: one score per layer (a block matrix for a block scorer)
            values[obj.name] = torch.zeros(n, n) if is_block(obj) else torch.zeros(n)
        units[obj.name] = unit
    plan = select(Scores(values, units, list(shapes)), targets, scorers=scorers)
    for unit in scorers:
        if not getattr(plan, "mlp" if unit == "mlps" else unit):
            raise ValueError(
                f"{unit} target {getattr(targets, unit)!r} removes nothing from this model "
                f"({n} layers); ask for more"
            )
    return plan


__all__ = [
    "Targets",
    "adjustments",
    "check_targets",
    "count_of",
    "plan_for",
    "resolve_scorers",
    "round_width",
    "scorer_configs",
    "select",
    "select_layers",
]

# plan_for (score what the targets need, then select) lives in core/planning.py, imported
# last so that `from prunekit.core.select import plan_for` keeps working
from prunekit.core.planning import plan_for  # noqa: E402
