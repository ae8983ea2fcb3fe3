"""The plugin system: registries, built-ins registered as plugins, blocking, the CLI listing,
and meta-tests that every hookspec is documented and exercised."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from conftest import VOCAB, tiny_model

import prunekit
from prunekit import hookspecs
from prunekit.contracts import Plugin, build_config
from prunekit.errors import RegistryError, UnsupportedArchitectureError
from prunekit.plugins import DEFAULT_PLUGINS, HOOKS, Plugins, Registry


class _Named:
    def __init__(self, name: str):
        self.name = name


def test_registry_rejects_duplicates_and_bad_names():
    reg: Registry[_Named] = Registry("scorer")
    reg.add("wanda", _Named("wanda"), origin="pkg_a")
    with pytest.raises(RegistryError, match="registered twice: by pkg_a and by pkg_b"):
        reg.add("wanda", _Named("wanda"), origin="pkg_b")
    for bad in ("", "Upper", "has space", "1digit", None):
        with pytest.raises(RegistryError, match="invalid scorer name"):
            reg.add(bad, _Named(str(bad)))
    assert reg.names() == ["wanda"]


def test_registry_miss_lists_valid_names():
    reg: Registry[_Named] = Registry("quantizer")
    for n in ("gptq", "awq"):
        reg.add(n, _Named(n))
    with pytest.raises(RegistryError) as info:
        reg.get("gtpq")
    assert "unknown quantizer 'gtpq'; valid quantizers: awq, gptq" in str(info.value)
    assert info.value.valid == ["awq", "gptq"]
    assert isinstance(info.value, KeyError)


def test_builtins_are_registered_as_plugins():
    plugins = Plugins(load_entrypoints=False)
    names = [plugins.pm.get_name(p) for p in plugins.pm.get_plugins()]
    assert set(DEFAULT_PLUGINS) <= set(names)
    for arch in ("llama", "mistral", "qwen2", "qwen3", "bert"):
        assert plugins.adapters.origin(arch) == f"prunekit.adapters.{arch}"
    assert plugins.provided["prunekit.adapters.llama"]["register_adapters"] == ["llama"]


def test_extra_plugin_object_registers_through_the_same_hooks():
    class Extra:
        @hookspecs.hookimpl
        def register_scorers(self, register):
            register(_Named("my_scorer"))

        @hookspecs.hookimpl
        def register_quantizers(self, register):
            register(_Named("my_quant"))

    plugins = Plugins(load_entrypoints=False, extra=(Extra(),))
    assert plugins.scorers.get("my_scorer").name == "my_scorer"
    assert plugins.quantizers.get("my_quant").name == "my_quant"


def registering(hook_name: str, *objects) -> types.SimpleNamespace:
    """A plugin whose ``hook_name`` implementation registers ``objects``."""

    @hookspecs.hookimpl(specname=hook_name)
    def hook(register):
        for obj in objects:
            register(obj)

    return types.SimpleNamespace(hook=hook)


def test_duplicate_across_plugins_is_refused():
    from prunekit.adapters.llama import LlamaAdapter

    clash = registering("register_adapters", LlamaAdapter())
    with pytest.raises(RegistryError, match="'llama' is registered twice"):
        Plugins(load_entrypoints=False, extra=(clash,))


def test_model_type_claimed_twice_is_refused():
    from prunekit.adapters.llama import LlamaAdapter

    class Other(LlamaAdapter):
        name = "llama_variant"

    clash = registering("register_adapters", Other())
    with pytest.raises(RegistryError, match="model_type 'llama' is claimed by adapters"):
        Plugins(load_entrypoints=False, extra=(clash,))


def test_disable_builtin_plugin(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DISABLE_PLUGINS", "prunekit.adapters.bert, prunekit.scorers")
    plugins = Plugins(load_entrypoints=False)
    assert "bert" not in plugins.model_types()
    assert "llama" in plugins.model_types()
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError) as info:
        plugins.adapter_for(BertConfig())
    message = str(info.value)
    assert "no prunekit adapter for model_type 'bert'" in message
    assert "llama" in message and "register_adapters" in message


def test_trace_mode_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_TRACE_PLUGINS", "1")
    Plugins(load_entrypoints=False)
    err = capsys.readouterr().err
    assert "calling register_adapters of prunekit.adapters.llama" in err


def test_cli_plugins_lists_every_plugin():
    out = subprocess.run(
        [sys.executable, "-m", "prunekit", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    for name in DEFAULT_PLUGINS:
        assert name in out
    assert "adapters: llama" in out
    assert "model types:" in out and "qwen3" in out


@pytest.mark.parametrize("hook_name", HOOKS)
def test_every_hookspec_is_documented_with_an_example(hook_name):
    spec = getattr(hookspecs, hook_name)
    assert list(inspect.signature(spec).parameters) == ["register"]
    assert spec.__annotations__ == {"register": "Callable[[Any], None]", "return": "None"}
    doc = inspect.getdoc(spec)
    assert doc and "Example::" in doc and f"def {hook_name}(register)" in doc


def hookspec_example(hook_name: str, monkeypatch) -> types.ModuleType:
    """The example of a hookspec's docstring (everything after ``Example::``), run as a
    module of its own."""
    doc = inspect.getdoc(getattr(hookspecs, hook_name))
    code = textwrap.dedent(doc.split("Example::", 1)[1])
    module = types.ModuleType(f"prunekit_example_{hook_name}")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(code, f"<{hook_name} example>", "exec"), module.__dict__)
    return module


def _check_adapter_example(plugins, adapter):
    from transformers import LlamaConfig

    config = LlamaConfig(model_type="my_decoder")
    config.model_type = "my_decoder"
    assert plugins.adapter_for(config) is adapter
    model = tiny_model("llama")
    assert len(adapter.layers(model)) == model.config.num_hidden_layers


def _check_scorer_example(plugins, scorer):
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    cfg = {scorer.name: {"offset": "1.5"}}
    scores = prunekit.score(tiny_model("llama"), ids, [scorer], configs=cfg, progress=False)
    torch.testing.assert_close(scores[scorer.name], torch.full((5,), 96 + 1.5))
    with pytest.raises(ValueError, match="offset must be >= 0"):
        build_config(scorer, {"offset": "-1"})


def _check_quantizer_example(plugins, quantizer):
    from prunekit.core.quantize import is_quantized, quantize

    ok, why = quantizer.available()
    if not ok:
        assert why.startswith("pip install torchao")
        pytest.skip(f"torchao is not installed ({why})")
    model = tiny_model("llama")
    out = quantize(model, None, quantizer, {"dynamic": "false"})
    assert is_quantized(out) and not is_quantized(model)
    assert out._prunekit_quantization["config"] == {"dynamic": False}


def _check_recovery_example(plugins, method):
    from prunekit.core.recovery import recovery_config

    model = tiny_model("llama")
    model.model.embed_tokens.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    options = {"steps": "1", "n_layers": "1", "seq_len": "8", "batch_size": "2"}
    config = recovery_config(method, {**options, "eval_every": "1", "eval_samples": "1"})
    ids = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))
    result = prunekit.recover(model, ids, config, method=method, progress=False)
    last = model.model.layers[-1]
    assert result.trainable_params == sum(p.numel() for p in last.parameters())
    assert result.config["n_layers"] == 1
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # restored
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        recovery_config(method, {"n_layers": "0"})


_EXAMPLE_CHECKS = {
    "register_adapters": ("adapters", _check_adapter_example),
    "register_scorers": ("scorers", _check_scorer_example),
    "register_quantizers": ("quantizers", _check_quantizer_example),
    "register_recoveries": ("recoveries", _check_recovery_example),
}


def test_every_hookspec_has_an_example_check():
    assert set(_EXAMPLE_CHECKS) == set(HOOKS)


@pytest.mark.parametrize("hook_name", HOOKS)
def test_hookspec_example_runs(hook_name, monkeypatch):
    """Each docstring example is a working plugin: it registers through a fresh plugin
    manager, follows the one contract (name, config_class with documented options,
    available()), and does its job."""
    module = hookspec_example(hook_name, monkeypatch)
    plugins = Plugins(load_entrypoints=False, extra=(module,))
    (name,) = plugins.provided[module.__name__][hook_name]
    registry, check = _EXAMPLE_CHECKS[hook_name]
    plugin = getattr(plugins, registry).get(name)
    assert isinstance(plugin, Plugin) and dataclasses.is_dataclass(plugin.config_class)
    ok, why = plugin.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    own = [f for f in dataclasses.fields(plugin.config_class) if f.init]
    assert all(f.metadata.get("help") for f in own), "every option needs help text"
    build_config(plugin, {})  # the defaults are valid
    check(plugins, plugin)


def test_hooks_list_matches_hookspecs_module():
    specs = {
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and name.startswith("register_")
    }
    assert specs == set(HOOKS)


def test_hookimpl_is_reexported():
    assert prunekit.hookimpl is hookspecs.hookimpl


def test_package_root_exports_are_sorted_and_complete():
    public = {
        name
        for name, obj in vars(prunekit).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
    }
    assert prunekit.__all__ == sorted(prunekit.__all__)
    assert set(prunekit.__all__) == public
    from prunekit.core.pipeline import compress
    from prunekit.core.recipe import Recipe

    assert prunekit.compress is compress and prunekit.Recipe is Recipe


def test_check_resolves_a_name_once_and_checks_availability():
    from prunekit.contracts import PluginBase
    from prunekit.errors import PluginUnavailableError

    class Missing(PluginBase):
        name = "needs_backend"

        def available(self):
            return False, "pip install some-backend"

    extra = registering("register_quantizers", Missing())
    plugins = Plugins(load_entrypoints=False, extra=(extra,))
    assert plugins.check("recoveries", "lora") is plugins.recoveries.get("lora")
    with pytest.raises(PluginUnavailableError, match="pip install some-backend") as info:
        plugins.check("quantizers", "needs_backend")
    assert info.value.name == "needs_backend"
    with pytest.raises(RegistryError, match="valid scorers: .*block_influence"):
        plugins.check("scorers", "nope")
    with pytest.raises(ValueError, match="unknown plugin kind 'scorer'; kinds: adapters"):
        plugins.check("scorer", "taylor")


def test_cli_plugins_lists_options_on_request():
    def run(*args):
        cmd = [sys.executable, "-m", "prunekit", "plugins", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    plain, detailed = run(), run("--options")
    assert detailed.startswith(plain.rstrip("\n"))
    assert "options:" not in plain
    assert "scorer angular_distance options:\n    token: " in detailed
    assert "recovery method lora options:" in detailed and "    lora_r: LoRA rank r" in detailed
