"""perplexity_drop with cached layer inputs (SLEB at a usable cost) against the naive
one-masked-pass-per-layer reference."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

import prunekit


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(5))


def _drop(model, calib, **options) -> torch.Tensor:
    s = prunekit.score(
        model,
        calib,
        ["perplexity_drop"],
        configs={"perplexity_drop": options},
        batch_size=4,
        progress=False,
    )
    return s["perplexity_drop"]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cached_scores_equal_naive(arch, calib):
    model = tiny_model(arch).double()
    fast = _drop(model, calib, samples=0)
    naive = _drop(model, calib, samples=0, cache=False)
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=0)
    assert fast.abs().min() > 0  # every layer of a random model changes the loss


def test_subset_uses_the_first_samples(calib):
    model = tiny_model("llama").double()
    torch.testing.assert_close(
        _drop(model, calib, samples=2), _drop(model, calib[:2], samples=0, cache=False)
    )


def test_masked_layer_scores_zero(calib):
    model = tiny_model("llama").double()
    with prunekit.masked(model, prunekit.PrunePlan(layers=[2])):
        fast = _drop(model, calib)
        naive = _drop(model, calib, cache=False)
    assert float(fast[2]) == 0.0
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=0)


def test_iterative_selection_equals_naive(calib):
    """SLEB-style ``layer_steps``: the fast scorer picks the same layers in the same order."""
    model = tiny_model("llama").double()
    targets = prunekit.Targets(layers=2, layer_scorer="perplexity_drop", layer_steps=2)

    def plan(cache: bool):
        return prunekit.plan_for(
            model,
            calib,
            targets,
            progress=False,
            batch_size=4,
            configs={"perplexity_drop": {"cache": cache, "samples": 0}},
        )[0]

    fast, naive = plan(True), plan(False)
    assert fast.layers == naive.layers
    assert fast.meta["layer_steps"] == naive.meta["layer_steps"]
    assert len(fast.meta["layer_steps"]) == 2


def test_config_validation():
    from prunekit.scorers.perplexity import PerplexityDropConfig

    with pytest.raises(ValueError, match="samples"):
        PerplexityDropConfig(samples=-1)
    assert PerplexityDropConfig(cache="false").cache is False
