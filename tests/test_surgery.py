"""apply_plan must equal masking the same units in the dense model, keep config and modules in
agreement, keep tied embeddings tied and keep KV-cache generation correct."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, DECODERS, logits, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import plans

import prunekit
from prunekit import PrunePlan, PruningPlanError, apply_plan, get_adapter

ATOL = 1e-5  # fp32: slicing only drops exact zeros from sums, so differences are rounding


def _check_equivalent(model, plan, ids):
    with prunekit.masked(model, plan):
        ref = logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    out = logits(pruned, ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    return pruned


@pytest.mark.parametrize("arch", ARCHS)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_apply_equals_masking(arch, data, ids):
    model = _models(arch)
    plan = data.draw(plans(get_adapter(model).shapes(model)))
    pruned = _check_equivalent(model, plan, ids)
    _check_config_agrees(pruned)


_CACHE: dict[str, torch.nn.Module] = {}


def _models(arch: str):
    if arch not in _CACHE:
        _CACHE[arch] = tiny_model(arch)
    return _CACHE[arch]


def _check_config_agrees(model):
    """The config says exactly what the modules are."""
    adapter = get_adapter(model)
    config = model.config
    shapes = adapter.shapes(model)
    assert config.num_hidden_layers == len(adapter.layers(model))
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == len(shapes)
    for i, layer in enumerate(adapter.layers(model)):
        assert adapter.attention(layer).layer_idx == i
    from_config = adapter.layer_shapes_from_config(config)
    if from_config is None:  # stock config
        s = shapes[0]
        assert config.num_attention_heads == s.n_heads
        assert config.intermediate_size == s.intermediate
        if adapter.config_keys["n_kv_heads"]:
            assert config.num_key_value_heads == s.n_kv_heads
            assert config.head_dim == s.head_dim
    else:
        assert from_config == shapes
    for layer, s in zip(adapter.layers(model), shapes, strict=True):
        attn = adapter.attention(layer)
        if hasattr(attn, "num_key_value_groups"):
            assert attn.num_key_value_groups == s.n_heads // s.n_kv_heads


@pytest.mark.parametrize("arch", DECODERS)
def test_sdpa_matches_masking(arch, ids):
    """SDPA uses num_key_value_groups / enable_gqa: check the attributes surgery rewrites."""
    model = tiny_model(arch, attn="sdpa")
    plan = PrunePlan(layers=[2], heads={0: [0, 1, 2, 3], 1: [1, 5], 3: [0, 4]}, neurons={4: [3]})
    _check_equivalent(model, plan, ids)


def test_gqa_whole_group_and_uniform_per_group(ids):
    model = tiny_model("llama")
    # layer 0: drop KV group 1 (heads 4-7); layer 1: drop one query head from each group
    plan = PrunePlan(heads={0: [4, 5, 6, 7], 1: [0, 7]})
    pruned = _check_equivalent(model, plan, ids)
    shapes = get_adapter(pruned).shapes(pruned)
    assert (shapes[0].n_heads, shapes[0].n_kv_heads) == (4, 1)
    assert (shapes[1].n_heads, shapes[1].n_kv_heads) == (6, 2)
    assert pruned.config.is_heterogeneous


def test_uniform_plan_gives_stock_config(ids):
    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    plan = PrunePlan(
        layers=[1, 3],
        heads={i: [2, 3] for i in (0, 2, 4)},  # group 0 loses heads 2,3 ... not uniform per group
    )
    with pytest.raises(PruningPlanError):
        apply_plan(copy.deepcopy(model), plan)
    plan = PrunePlan(
        layers=[1, 3],
        heads={i: [4, 5, 6, 7] for i in (0, 2, 4)},
        neurons={i: list(range(0, 96, 3)) for i in (0, 2, 4)},
    )
    pruned = _check_equivalent(model, plan, ids)
    c = pruned.config
    assert not c.is_heterogeneous
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (n - 2, 4, 1)
    assert (c.head_dim, c.intermediate_size) == (8, 64)


def test_tied_embeddings_stay_tied():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_plan(model, PrunePlan(layers=[0], heads={1: [0, 1, 2, 3]}, neurons={2: [1, 2]}))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_with_cache_after_layer_removal(arch, attn):
    """KV cache is indexed by layer_idx; sliding-window layer_types must follow their layers."""
    model = tiny_model(arch, attn=attn)
    apply_plan(model, PrunePlan(layers=[0, 3], heads={1: [0, 1, 2, 3]}, neurons={2: [5]}))
    if arch == "qwen3":  # auto-filled layer_types: full, full, sliding... sliced with the layers
        assert model.config.layer_types == [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
        ]
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 9 + 12


def test_invalid_plan_touches_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    bad = PrunePlan(layers=[0], heads={1: [0, 4]}, neurons={2: [1000]})  # neuron out of range
    with pytest.raises(PruningPlanError, match=r"neurons\[2\]"):
        apply_plan(model, bad)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.to_dict() == config_before


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        (PrunePlan(), "removes nothing"),
        (PrunePlan(layers=[0, 1, 2, 3, 4]), "all 5 layers"),
        (PrunePlan(layers=[7]), r"layers\[7\].*out of range"),
        (PrunePlan(heads={0: list(range(8))}), r"heads\[0\].*all 8 heads"),
        (PrunePlan(heads={0: [0, 4, 5]}), r"heads\[0\].*GQA-inconsistent"),
        (PrunePlan(heads={0: [0]}), r"heads\[0\].*GQA-inconsistent"),
        (PrunePlan(heads={9: [0]}), r"heads\[9\].*out of range"),
        (PrunePlan(neurons={1: list(range(96))}), r"neurons\[1\].*all 96"),
        (PrunePlan(layers=[2], heads={2: [0, 4]}), r"heads\[2\].*removed whole"),
    ],
)
def test_bad_plans_name_the_entry(plan, match):
    with pytest.raises(PruningPlanError, match=match):
        apply_plan(tiny_model("llama"), plan)


def test_bert_heads_are_their_own_groups(ids):
    model = tiny_model("bert")
    pruned = _check_equivalent(model, PrunePlan(heads={0: [1], 1: [0, 2, 3]}), ids)
    assert [s.n_heads for s in get_adapter(pruned).shapes(pruned)][:2] == [3, 1]
    # BERT has no head_dim in its config: even uniform head removal needs the per-layer format
    pruned = apply_plan(tiny_model("bert"), PrunePlan(heads={i: [0] for i in range(5)}))
    assert pruned.config.is_heterogeneous


def test_refuses_quantized_model():
    model = tiny_model("llama")
    model.is_quantized = True
    with pytest.raises(PruningPlanError, match="quantized"):
        apply_plan(model, PrunePlan(layers=[0]))


def test_refuses_model_whose_config_says_quantized():
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(PruningPlanError, match="quantized"):
        apply_plan(model, PrunePlan(layers=[0]))
    assert len(get_adapter(model).layers(model)) == 5  # refused before any change


def test_applied_plans_are_public_data():
    """apply_plan records copies of the plans in ``model.prunekit_plans``, oldest first; no
    private attribute carries them."""
    from prunekit.core.surgery import applied_plans

    model = tiny_model("llama")
    assert applied_plans(model) == []
    first = PrunePlan(layers=[0], meta={"by": "test"})
    second = PrunePlan(neurons={0: [1, 2]})
    apply_plan(model, first)
    apply_plan(model, second)
    assert model.prunekit_plans == [first, second] == applied_plans(model)
    first.meta["by"] = "changed later"
    assert model.prunekit_plans[0].meta == {"by": "test"}
    assert "_prunekit_plans" not in model.__dict__


class _PackedLinear(torch.nn.Module):
    """Stands for a quantized linear (GPTQModel, AWQ): packed ``qweight``, no ``weight``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(linear.in_features // 8, linear.out_features))


def test_feature_counts_do_not_need_weight():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    dense = adapter.shapes(model)
    for layer in adapter.layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, _PackedLinear(getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(mlp, name, _PackedLinear(getattr(mlp, name)))
    assert adapter.shapes(model) == dense


def test_linear_layout_hooks_default_to_nn_linear():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    proj = adapter.layers(model)[0].mlp.down_proj
    assert adapter.linear_weight(proj) is proj.weight
    grad = torch.ones_like(proj.weight)
    assert adapter.linear_weight(proj, grad) is grad
    assert (adapter.out_features(proj), adapter.in_features(proj)) == tuple(proj.weight.shape)
    adapter.slice_projection(proj, [0, 2], "in")
    assert proj.weight.shape[1] == proj.in_features == 2
    with pytest.raises(ValueError, match="dim"):
        adapter.slice_projection(proj, [0], "rows")


def test_gpt2_plugin_gives_conv1d_in_linear_layout():
    """The third-party GPT-2 adapter owns the Conv1D layout: core sees ``[out, in]`` weights
    and feature counts, for Conv1D projections and for the nn.Linear lm_head alike."""
    pytest.importorskip("prunekit_gpt2")
    import transformers as tf

    from prunekit.core.evaluate import flops_breakdown
    from prunekit.plugins import reset_plugins

    reset_plugins()
    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=50, n_positions=16)
    model = tf.GPT2LMHeadModel(config).eval()
    try:
        adapter = get_adapter(model)
        c_fc = adapter.layers(model)[0].mlp.c_fc
        weight = adapter.linear_weight(c_fc)
        assert weight.shape == (adapter.out_features(c_fc), adapter.in_features(c_fc)) == (128, 32)
        x = torch.randn(3, 32)
        expected = torch.nn.functional.linear(x, weight, c_fc.bias)
        torch.testing.assert_close(c_fc(x), expected, atol=1e-6, rtol=0)
        assert flops_breakdown(model, 8)["lm_head"] == 2.0 * 50 * 32
    finally:
        reset_plugins()
