"""The plugin system: registries, built-ins registered as plugins, blocking, the CLI listing,
and meta-tests that every hookspec is documented and exercised."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import prunekit
from prunekit import hookspecs
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


def test_duplicate_across_plugins_is_refused():
    class Clash:
        @hookspecs.hookimpl
        def register_adapters(self, register):
            from prunekit.adapters.llama import LlamaAdapter

            register(LlamaAdapter())

    with pytest.raises(RegistryError, match="'llama' is registered twice"):
        Plugins(load_entrypoints=False, extra=(Clash(),))


def test_model_type_claimed_twice_is_refused():
    from prunekit.adapters.llama import LlamaAdapter

    class Other(LlamaAdapter):
        name = "llama_variant"

    class Clash:
        @hookspecs.hookimpl
        def register_adapters(self, register):
            register(Other())

    with pytest.raises(RegistryError, match="model_type 'llama' is claimed by adapters"):
        Plugins(load_entrypoints=False, extra=(Clash(),))


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
    doc = inspect.getdoc(spec)
    assert doc and "Example::" in doc and f"def {hook_name}(register)" in doc


def test_hooks_list_matches_hookspecs_module():
    specs = {
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and name.startswith("register_")
    }
    assert specs == set(HOOKS)


def test_hookimpl_is_reexported():
    assert prunekit.hookimpl is hookspecs.hookimpl
