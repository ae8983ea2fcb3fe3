"""Hypothesis strategies for valid pruning plans."""

from __future__ import annotations

from hypothesis import strategies as st

from prunekit import PrunePlan
from prunekit.core.shapes import LayerShape


@st.composite
def head_removals(draw, s: LayerShape) -> list[int]:
    """Either whole KV groups, or the same number of query heads from every kept group, or
    both; never every head."""
    r = s.group_size
    groups = list(range(s.n_kv_heads))
    dropped = draw(st.lists(st.sampled_from(groups), unique=True, max_size=s.n_kv_heads - 1))
    per_group = draw(st.integers(0, r - 1))
    removed = [g * r + i for g in dropped for i in range(r)]
    for g in groups:
        if g not in dropped and per_group:
            removed += [g * r + i for i in draw(st.permutations(range(r)))[:per_group]]
    return sorted(removed)


@st.composite
def plans(draw, shapes: list[LayerShape]) -> PrunePlan:
    n = len(shapes)
    layers = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1))
    heads, neurons = {}, {}
    for i, s in enumerate(shapes):
        if i in layers:
            continue
        if draw(st.booleans()):
            heads[i] = draw(head_removals(s))
        if draw(st.booleans()):
            k = draw(st.integers(1, s.intermediate - 1))
            neurons[i] = draw(st.permutations(range(s.intermediate)))[:k]
    plan = PrunePlan(layers=layers, heads=heads, neurons=neurons)
    if plan.is_empty():
        plan = PrunePlan(layers=[n - 1])
    return plan
