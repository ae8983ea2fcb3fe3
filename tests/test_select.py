"""Selection: every constraint under property-based tests, plus constructed cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.core.scores import Scores
from prunekit.core.select import (
    Targets,
    count_of,
    resolve_scorers,
    round_width,
    scorer_configs,
    select,
)
from prunekit.core.shapes import LayerShape

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_scores(L, n_heads, n_kv, inter, seed, with_angular=False) -> Scores:
    g = torch.Generator().manual_seed(seed)
    shape = LayerShape(n_heads, n_kv, 8, inter)
    values = {
        "block_influence": torch.rand(L, generator=g),
        "taylor": torch.rand(L, n_heads, generator=g),
        "activation_frequency": torch.rand(L, inter, generator=g),
    }
    units = {"block_influence": "layers", "taylor": "heads", "activation_frequency": "neurons"}
    if with_angular:
        ad = torch.full((L, L), float("nan"))
        for n in range(1, L + 1):
            ad[n - 1, : L - n + 1] = torch.rand(L - n + 1, generator=g)
        values["angular_distance"] = ad
        units["angular_distance"] = "layers"
    return Scores(values, units, [shape] * L, {})


geometry = st.tuples(
    st.integers(3, 10),  # layers
    st.sampled_from([(8, 2), (8, 4), (6, 3), (4, 4), (9, 3)]),  # (heads, kv)
    st.sampled_from([32, 96, 128]),  # intermediate
    st.integers(0, 10_000),  # seed
)
fraction = st.sampled_from([0.0, 0.1, 0.25, 0.4, 0.5])


def _check_plan(plan, scores, t):
    L = scores.n_layers
    s = scores.shapes[0]
    # protection
    for i in plan.layers:
        assert t.protect_first <= i < L - t.protect_last
    kept = [i for i in range(L) if i not in plan.layers]
    # layer count
    assert len(plan.layers) == count_of(t.layers, L)
    # heads never in removed layers; GQA rule; minimums
    for i, heads in plan.heads.items():
        assert i in kept
        r = s.group_size
        per_group = [sum((g * r + j) in heads for j in range(r)) for g in range(s.n_kv_heads)]
        if t.head_removal == "groups" or r == 1:
            assert all(c in (0, r) for c in per_group)
        else:
            assert len(set(per_group)) == 1
        kept_heads = s.n_heads - len(heads)
        assert kept_heads >= t.min_heads
        assert any(c < r for c in per_group)
    for i, neurons in plan.neurons.items():
        assert i in kept
        width = s.intermediate - len(neurons)
        assert width >= 1
        if t.round_to > 1 and s.intermediate >= t.round_to:
            assert width % t.round_to == 0
    if t.mode == "uniform":
        removed_heads = {len(plan.heads.get(i, [])) for i in kept}
        removed_neurons = {len(plan.neurons.get(i, [])) for i in kept}
        assert len(removed_heads) == 1 and len(removed_neurons) == 1
    else:
        protected = set(range(t.protect_first)) | set(range(L - t.protect_last, L))
        assert not (set(plan.heads) | set(plan.neurons)) & protected
    if not plan.is_empty():
        plan.validate(scores.shapes)


@SETTINGS
@given(
    geometry,
    fraction,
    fraction,
    fraction,
    st.sampled_from(["uniform", "per_layer"]),
    st.sampled_from(["groups", "per_group"]),
    st.sampled_from([1, 8, 16, 64]),
    st.integers(0, 2),
    st.integers(0, 2),
    st.integers(1, 4),
)
def test_selection_respects_every_constraint(
    geo, fl, fh, fn, mode, removal, round_to, pf, pl, min_heads
):
    L, (nh, nkv), inter, seed = geo
    scores = make_scores(L, nh, nkv, inter, seed)
    t = Targets(
        layers=fl,
        heads=fh,
        neurons=fn,
        mode=mode,
        head_removal=removal,
        round_to=round_to,
        protect_first=pf,
        protect_last=pl,
        min_heads=min_heads,
    )
    try:
        plan = select(scores, t)
    except ValueError as e:
        # infeasible targets must be refused with a message naming the fix
        assert any(w in str(e) for w in ("target", "lower", "per_layer", "protect"))
        return
    _check_plan(plan, scores, t)
    # removed layers have the lowest scores among the unprotected ones
    bi = scores["block_influence"]
    lo, hi = pf, L - pl
    others = [i for i in range(lo, hi) if i not in plan.layers]
    if plan.layers and others:
        assert max(bi[plan.layers]) <= min(bi[others])


@SETTINGS
@given(geometry, st.integers(1, 4), st.booleans())
def test_contiguous_block(geo, k, angular):
    L, (nh, nkv), inter, seed = geo
    scores = make_scores(L, nh, nkv, inter, seed, with_angular=True)
    t = Targets(
        layers=k,
        layer_scorer="angular_distance" if angular else "block_influence",
        contiguous=not angular,
    )
    if k > L - 2:
        with pytest.raises(ValueError, match="unprotected"):
            select(scores, t)
        return
    plan = select(scores, t)
    assert plan.layers == list(range(plan.layers[0], plan.layers[0] + k))
    assert plan.layers[0] >= 1 and plan.layers[-1] <= L - 2
    # the block is the best one (brute force)
    if angular:
        d = scores["angular_distance"][k - 1]
        best = min(range(1, L - 1 - k + 1), key=lambda s: float(d[s]))
    else:
        bi = scores["block_influence"]
        best = min(range(1, L - 1 - k + 1), key=lambda s: float(bi[s : s + k].sum()))
    assert plan.layers[0] == best


@SETTINGS
@given(st.integers(1, 500), st.integers(1, 500), st.sampled_from([1, 8, 64, 128]))
def test_round_width(kept, width, r):
    kept = min(kept, width)
    out = round_width(kept, width, r)
    assert 1 <= out <= width
    if r > 1 and width >= r:
        assert out % r == 0 and out >= r
        assert abs(out - kept) <= r or out == (width // r) * r


def test_uniform_heads_groups_picks_lowest_group():
    scores = make_scores(4, 8, 2, 32, 0)
    scores.values["taylor"] = torch.tensor([[5.0] * 4 + [1.0] * 4] * 4)
    plan = select(scores, Targets(heads=0.5))
    assert plan.heads == {i: [4, 5, 6, 7] for i in range(4)}


def test_per_group_picks_lowest_in_each_group():
    scores = make_scores(2, 8, 2, 32, 0)
    row = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 7.0])
    scores.values["taylor"] = torch.stack([row, row])
    plan = select(scores, Targets(heads=4, head_removal="per_group"))
    assert plan.heads == {0: [1, 4], 1: [1, 4]}


def test_per_layer_neurons_global_ranking_and_rounding():
    scores = make_scores(4, 8, 2, 16, 0)
    v = torch.ones(4, 16)
    v[2, :10] = 0.0  # ten clearly dead neurons in layer 2
    scores.values["activation_frequency"] = v
    plan = select(
        scores, Targets(neurons=10, mode="per_layer", round_to=1, protect_first=0, protect_last=0)
    )
    assert plan.neurons == {2: list(range(10))}
    plan = select(
        scores, Targets(neurons=10, mode="per_layer", round_to=4, protect_first=0, protect_last=0)
    )
    assert plan.neurons == {2: list(range(8))}  # 6 kept → nearest multiple of 4 is 8


def test_removed_layers_do_not_count_toward_head_target():
    scores = make_scores(6, 8, 4, 32, 1)
    plan = select(scores, Targets(layers=2, heads=0.5))
    assert len(plan.layers) == 2
    assert set(plan.heads) == {i for i in range(6) if i not in plan.layers}
    assert sum(len(v) for v in plan.heads.values()) == 0.5 * 4 * 8


def test_targets_validation_and_roundtrip():
    t = Targets(layers=0.25, heads=3, mode="per_layer")
    assert Targets.from_dict(t.to_dict()) == t
    for bad, match in [
        (dict(layers=1.5), "fraction"),
        (dict(heads=-1), "heads"),
        (dict(neurons=True), "neurons"),
        (dict(mode="x"), "mode"),
        (dict(head_removal="x"), "head_removal"),
        (dict(round_to=0), "round_to"),
        (dict(min_heads=0), "min_heads"),
        (dict(protect_first=-1), "protect_first"),
        (dict(iterative_layers=2, contiguous=True), "contiguous"),
    ]:
        with pytest.raises(ValueError, match=match):
            Targets(**bad)
    with pytest.raises(ValueError, match="unknown target keys"):
        Targets.from_dict({"layer": 1})


def test_uniform_target_too_small_is_explained():
    scores = make_scores(4, 8, 2, 32, 0)
    with pytest.raises(ValueError, match="per_group"):
        select(scores, Targets(heads=2))  # one group per layer = 16 heads
    with pytest.raises(ValueError, match="scores heads, not layers"):
        select(scores, Targets(layers=1, layer_scorer="taylor"))


def test_neuron_scorer_alias():
    scores = make_scores(4, 8, 2, 32, 0)
    scores.values["neuron_taylor"] = scores.values.pop("activation_frequency")
    scores.units["neuron_taylor"] = "neurons"
    plan = select(scores, Targets(neurons=0.5, neuron_scorer="taylor", round_to=1))
    assert all(len(v) == 16 for v in plan.neurons.values())


def test_plan_for_iterative_reuses_masking():
    from conftest import VOCAB, tiny_model

    from prunekit import plan_for

    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    plan, scores = plan_for(
        model,
        ids,
        Targets(
            layers=2, layer_scorer="perplexity_drop", iterative_layers=2, neurons=0.25, round_to=8
        ),
        progress=False,
    )
    assert len(plan.layers) == 2 and plan.meta["layer_steps"][0][0] in plan.layers
    assert set(plan.neurons) == {i for i in range(5) if i not in plan.layers}
    assert "perplexity_drop" in scores and "activation_frequency" in scores


def test_layer_steps_is_the_new_name_of_iterative_layers():
    old = Targets.from_dict({"layers": 2, "iterative_layers": 3})
    assert old == Targets(layers=2, layer_steps=3) == Targets(layers=2, iterative_layers=3)
    assert "iterative_layers" not in old.to_dict() and old.to_dict()["layer_steps"] == 3
    assert Targets.from_dict(old.to_dict()) == old
    with pytest.raises(ValueError, match="contiguous block"):
        resolve_scorers(Targets(layers=2, layer_scorer="angular_distance", layer_steps=2))


def test_scorer_options_in_targets_reach_the_scorers():
    t = Targets(
        layers=1,
        neurons=0.25,
        layer_scorer="angular_distance",
        neuron_scorer="taylor",
        scorer_options={"angular_distance": {"token": "all"}, "taylor": {"granularity": "vector"}},
    )
    scorers = resolve_scorers(t)
    assert {u: s.name for u, s in scorers.items()} == {
        "layers": "angular_distance",
        "neurons": "neuron_taylor",
    }
    assert scorer_configs(t, scorers, {"angular_distance": {"token": "last"}}) == {
        "angular_distance": {"token": "last"},
        "neuron_taylor": {"granularity": "vector"},
    }
    assert Targets.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="no target uses"):
        scorer_configs(Targets(layers=1, scorer_options={"wanda": {}}), scorers)
    with pytest.raises(ValueError, match="scorer_options"):
        Targets(scorer_options={"wanda": 3})


@pytest.mark.parametrize("text, value", [("3", 3), ("3.0", 3), ("0.25", 0.25), ("0", 0.0)])
def test_parse_amount(text, value):
    from prunekit.core.targets import parse_amount

    assert parse_amount(text) == value and type(parse_amount(text)) is type(value)


@pytest.mark.parametrize("text", ["1.5", "-1", "x", "nan"])
def test_parse_amount_rejects(text):
    from prunekit.core.targets import parse_amount

    with pytest.raises(ValueError):
        parse_amount(text)
