"""A real third-party plugin (``tests/plugins/prunekit-gpt2``) registered through the
``prunekit`` entry-point group: discovery, disabling, and GPT-2 surgery (fused ``c_attn``
Conv1D) checked against masking, save/load and generation.

The plugin is installed by ``.ci/run`` and ``make test`` with
``pip install --no-deps -e tests/plugins/prunekit-gpt2``.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunekit
from prunekit import PrunePlan, PruningPlanError
from prunekit.plugins import reset_plugins

try:
    importlib.metadata.distribution("prunekit-gpt2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "the example plugin is not installed: pip install --no-deps -e tests/plugins/prunekit-gpt2",
        allow_module_level=True,
    )

VOCAB = 100
N_LAYER, N_HEAD, N_EMBD = 4, 4, 64
INNER = 4 * N_EMBD  # n_inner=None means 4 * n_embd
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _fresh_plugins():
    reset_plugins()  # another test may have cached a plugin set built without entry points
    yield
    reset_plugins()


def tiny_gpt2(attn: str = "eager", seed: int = 0, bare: bool = False, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_embd=N_EMBD,
        n_head=N_HEAD,
        n_layer=N_LAYER,
        n_inner=None,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **overrides,
    )
    cls = tf.GPT2Model if bare else tf.GPT2LMHeadModel
    model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    # Random init leaves LayerNorms at 1 and biases at 0; perturb them so slicing mistakes show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


_TEMPLATES: dict[str, torch.nn.Module] = {}


def fresh_gpt2(attn: str = "eager"):
    """A copy of one cached tiny model per attention implementation (surgery is in place)."""
    if attn not in _TEMPLATES:
        _TEMPLATES[attn] = tiny_gpt2(attn)
    return copy.deepcopy(_TEMPLATES[attn])


def out(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def masked_vs_pruned(model, plan: PrunePlan, ids: torch.Tensor) -> None:
    with prunekit.masked(model, plan):
        ref = out(model, ids)
    prunekit.apply_plan(model, plan)
    torch.testing.assert_close(out(model, ids), ref, atol=ATOL, rtol=0)


def check_consistent(model) -> None:
    """Modules and config agree after surgery."""
    adapter = prunekit.get_adapter(model)
    layers = adapter.layers(model)
    assert model.config.num_hidden_layers == len(layers)
    for i, layer in enumerate(layers):
        s = adapter.layer_shape(layer)
        assert layer.attn.layer_idx == i
        assert layer.attn.num_heads == s.n_heads
        assert layer.attn.split_size == s.n_heads * s.head_dim
        assert layer.attn.c_attn.nf == 3 * s.n_heads * s.head_dim
        assert layer.attn.c_proj.weight.shape == (s.n_heads * s.head_dim, N_EMBD)
        assert layer.mlp.c_fc.nf == s.intermediate
    if model.config.is_heterogeneous:
        for i, s in enumerate(adapter.shapes(model)):
            layer_config = model.config.per_layer_config[i]
            assert layer_config.n_head == s.n_heads
            assert layer_config.n_inner == s.intermediate


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (2, 9), generator=g)


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


# ---- discovery ------------------------------------------------------------------------------
def test_entry_point_registers_the_adapter():
    reset_plugins()
    plugins = prunekit.get_plugins()
    assert "gpt2" in plugins.adapters
    assert plugins.adapters.origin("gpt2") == "gpt2"  # the entry-point name, not a module path
    assert plugins.provided["gpt2"] == {"register_adapters": ["gpt2"]}
    assert "gpt2" in plugins.model_types()
    adapter = prunekit.get_adapter(tiny_gpt2())
    assert adapter.name == "gpt2"
    assert type(adapter).__module__ == "prunekit_gpt2.adapter"


def test_cli_lists_the_plugin():
    result = subprocess.run(
        [sys.executable, "-m", "prunekit", "plugins"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "gpt2" in lines  # the plugin, by its entry-point name
    assert "adapters: gpt2" in lines[lines.index("gpt2") + 1]
    assert "gpt2" in lines[-1]  # "model types: ..."


def test_disable_plugins_env_removes_the_adapter():
    result = run_python(
        """
        import prunekit, transformers
        assert "gpt2" not in prunekit.get_plugins().adapters
        try:
            prunekit.get_adapter(transformers.GPT2Config())
        except prunekit.UnsupportedArchitectureError as e:
            print("unsupported:", e.model_type)
        """,
        env={"PRUNEKIT_DISABLE_PLUGINS": "gpt2"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unsupported: gpt2"


# ---- surgery == masking ---------------------------------------------------------------------
PLANS = {
    "layers": PrunePlan(layers=[0, 2]),
    "heads-per-layer": PrunePlan(heads={0: [1], 1: [0, 3], 3: [0, 1, 2]}),
    "heads-uniform": PrunePlan(heads={i: [2] for i in range(N_LAYER)}),
    "neurons-uniform": PrunePlan(neurons={i: list(range(0, INNER, 4)) for i in range(N_LAYER)}),
    "all": PrunePlan(
        layers=[1],
        heads={0: [0, 2], 3: [3]},
        neurons={0: list(range(100)), 2: [5, 77, 255], 3: list(range(1, INNER, 2))},
    ),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(PLANS))
def test_surgery_matches_masking(name, attn, ids):
    model = fresh_gpt2(attn)
    masked_vs_pruned(model, PLANS[name], ids)
    check_consistent(model)


@st.composite
def gpt2_plans(draw) -> PrunePlan:
    layers = draw(st.lists(st.integers(0, N_LAYER - 1), unique=True, max_size=N_LAYER - 1))
    heads, neurons = {}, {}
    for i in range(N_LAYER):
        if i in layers:
            continue
        if draw(st.booleans()):
            heads[i] = draw(st.lists(st.integers(0, N_HEAD - 1), unique=True, max_size=N_HEAD - 1))
        if draw(st.booleans()):
            k = draw(st.integers(1, INNER - 1))
            neurons[i] = draw(st.permutations(range(INNER)))[:k]
    plan = PrunePlan(layers=layers, heads=heads, neurons=neurons)
    return plan if not plan.is_empty() else PrunePlan(layers=[N_LAYER - 1])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=gpt2_plans(), attn=st.sampled_from(["eager", "sdpa"]))
def test_surgery_matches_masking_property(plan, attn):
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    model = fresh_gpt2(attn)
    masked_vs_pruned(model, plan, ids)
    check_consistent(model)


def test_bare_gpt2model(ids):
    model = tiny_gpt2(bare=True)
    masked_vs_pruned(model, PrunePlan(layers=[3], heads={1: [1, 2]}, neurons={0: [0, 9]}), ids)
    check_consistent(model)


def test_repeated_pruning_matches_masking(ids):
    model = fresh_gpt2()
    prunekit.apply_plan(model, PrunePlan(heads={0: [1]}, neurons={1: list(range(50))}))
    # Indices of the second plan refer to the already pruned model (3 heads left in layer 0).
    masked_vs_pruned(model, PrunePlan(layers=[2], heads={0: [2], 1: [0]}), ids)
    check_consistent(model)


def test_inverse_layer_idx_scaling_refuses_renumbering(ids):
    model = tiny_gpt2(scale_attn_by_inverse_layer_idx=True)
    before = out(model, ids)
    with pytest.raises(PruningPlanError, match="scale_attn_by_inverse_layer_idx"):
        prunekit.apply_plan(model, PrunePlan(layers=[1]))
    torch.testing.assert_close(out(model, ids), before, atol=0, rtol=0)  # untouched
    masked_vs_pruned(model, PrunePlan(layers=[3]), ids)  # trailing layers keep their index


# ---- save / load ----------------------------------------------------------------------------
def test_per_layer_roundtrip(tmp_path, ids):
    model = fresh_gpt2()
    prunekit.apply_plan(model, PLANS["all"])
    assert model.config.is_heterogeneous
    expected = out(model, ids)
    path = prunekit.save_pretrained(model, tmp_path / "pruned")
    sidecar = json.loads((path / "prunekit.json").read_text())
    assert sidecar["adapter"] == "gpt2" and sidecar["layout"] == "per_layer"
    config = json.loads((path / "config.json").read_text())
    assert config["n_head"] == N_HEAD and config["n_layer"] == N_LAYER - 1  # global kept
    assert config["per_layer_config"]

    loaded, _ = prunekit.load_pretrained(path)
    assert prunekit.get_adapter(loaded).shapes(loaded) == prunekit.get_adapter(model).shapes(model)
    check_consistent(loaded)
    torch.testing.assert_close(out(loaded, ids), expected, atol=ATOL, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_uniform_result_loads_with_stock_transformers(tmp_path, ids):
    from safetensors.torch import load_file, save_file

    model = fresh_gpt2()
    plan = PrunePlan(layers=[1], neurons={i: list(range(0, INNER, 2)) for i in (0, 2, 3)})
    prunekit.apply_plan(model, plan)
    assert not model.config.is_heterogeneous
    path = prunekit.save_pretrained(model, tmp_path / "pruned")
    config = json.loads((path / "config.json").read_text())
    assert "per_layer_config" not in config
    assert (config["n_layer"], config["n_head"], config["n_inner"]) == (3, N_HEAD, INNER // 2)
    save_file({"ids": ids, "logits": out(model, ids)}, tmp_path / "expected.safetensors")

    result = run_python(
        f"""
        import sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()
        ids = load_file({str(tmp_path / "expected.safetensors")!r})["ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        save_file({{"logits": logits}}, {str(tmp_path / "stock.safetensors")!r})
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert "prunekit" not in sys.modules and "prunekit_gpt2" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
    stock = load_file(tmp_path / "stock.safetensors")["logits"]
    expected = load_file(tmp_path / "expected.safetensors")["logits"]
    torch.testing.assert_close(stock, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_and_without_cache_after_removing_layers(attn, ids):
    model = fresh_gpt2(attn)
    plan = PrunePlan(layers=[0, 2], heads={1: [3]})
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    with prunekit.masked(model, plan):
        reference = model.generate(ids, use_cache=False, **kw)
    prunekit.apply_plan(model, plan)
    assert [layer.attn.layer_idx for layer in prunekit.get_adapter(model).layers(model)] == [0, 1]
    cached = model.generate(ids, use_cache=True, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


def test_plugin_package_declares_no_dependencies():
    """Installing the example must never let pip touch torch."""
    dist = importlib.metadata.distribution("prunekit-gpt2")
    assert not dist.requires
    eps = [ep for ep in dist.entry_points if ep.group == "prunekit"]
    assert [(ep.name, ep.value) for ep in eps] == [("gpt2", "prunekit_gpt2.hooks")]
    assert Path(__file__).with_name("plugins").joinpath("prunekit-gpt2", "README.md").is_file()
