"""Plugin manager and registries.

Built-in plugins (``DEFAULT_PLUGINS``) are registered exactly like third-party ones; third-party
plugins are loaded from the ``prunekit`` entry-point group. ``PRUNEKIT_DISABLE_PLUGINS=a,b``
blocks plugins by name (built-in names are their module paths, entry points their entry name);
``PRUNEKIT_TRACE_PLUGINS=1`` prints every hook call.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from prunekit import hookspecs
from prunekit.contracts import check_available, option_help
from prunekit.errors import RegistryError, UnsupportedArchitectureError

DEFAULT_PLUGINS: tuple[str, ...] = (
    "prunekit.adapters.llama",
    "prunekit.adapters.mistral",
    "prunekit.adapters.qwen2",
    "prunekit.adapters.qwen3",
    "prunekit.adapters.bert",
    "prunekit.scorers",
    "prunekit.quantizers",
    "prunekit.recoveries",
)
ENTRY_POINT_GROUP = "prunekit"
HOOKS = (
    "register_adapters",
    "register_scorers",
    "register_quantizers",
    "register_recoveries",
)

#: the registries of a :class:`Plugins`, in the order of ``HOOKS``
REGISTRIES = ("adapters", "scorers", "quantizers", "recoveries")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
T = TypeVar("T")


@dataclass
class Registry(Generic[T]):
    """Named objects of one kind (adapters, scorers, quantizers), owned by a :class:`Plugins`."""

    kind: str
    _items: dict[str, T] = field(default_factory=dict)
    _origin: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, obj: T, *, origin: str = "<direct>") -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistryError(
                f"invalid {self.kind} name {name!r} (from {origin}): use lower-case letters, "
                "digits, '_' or '-', starting with a letter",
                name=str(name),
            )
        if name in self._items:
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: by {self._origin[name]} and by "
                f"{origin}; disable one with PRUNEKIT_DISABLE_PLUGINS",
                name=name,
                valid=self.names(),
            )
        self._items[name] = obj
        self._origin[name] = origin

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: "
                f"{', '.join(self.names()) or '(none)'}",
                name=name,
                valid=self.names(),
            ) from None

    def origin(self, name: str) -> str:
        return self._origin[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


class Plugins:
    """A plugin manager with its four registries, filled once at construction."""

    def __init__(self, *, load_entrypoints: bool = True, extra: tuple[Any, ...] = ()):
        self.pm = pluggy.PluginManager("prunekit")
        self.pm.add_hookspecs(hookspecs)
        blocked = [n.strip() for n in os.environ.get("PRUNEKIT_DISABLE_PLUGINS", "").split(",")]
        for name in filter(None, blocked):
            self.pm.set_blocked(name)
        self._trace = os.environ.get("PRUNEKIT_TRACE_PLUGINS", "") not in ("", "0")
        for modname in DEFAULT_PLUGINS:
            if self.pm.is_blocked(modname):
                continue
            module = __import__(modname, fromlist=["_"])
            self.pm.register(module, name=modname)
        if load_entrypoints:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in extra:
            self.pm.register(plugin)
        self.pm.check_pending()

        self.adapters: Registry[Any] = Registry("adapter")
        self.scorers: Registry[Any] = Registry("scorer")
        self.quantizers: Registry[Any] = Registry("quantizer")
        self.recoveries: Registry[Any] = Registry("recovery method")
        self._model_types: dict[str, str] = {}
        #: plugin name -> hook name -> names it registered
        self.provided: dict[str, dict[str, list[str]]] = {}
        self._collect()

    def _collect(self) -> None:
        registries = [self.registry(kind) for kind in REGISTRIES]
        for hook_name, registry in zip(HOOKS, registries, strict=True):
            hook = getattr(self.pm.hook, hook_name)
            # get_hookimpls() lists in registration order (built-ins, then entry points).
            for impl in hook.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                names = self.provided.setdefault(plugin_name, {}).setdefault(hook_name, [])

                def register(obj: Any, _names=names, _origin=plugin_name, _reg=registry) -> None:
                    name = getattr(obj, "name", None)
                    _reg.add(name, obj, origin=_origin)
                    _names.append(name)
                    if _reg is self.adapters:
                        self._add_model_types(obj, _origin)

                if self._trace:
                    print(f"prunekit: calling {hook_name} of {plugin_name}", file=sys.stderr)
                impl.function(register=register)

    def _add_model_types(self, adapter: Any, origin: str) -> None:
        for model_type in adapter.model_types:
            if model_type in self._model_types:
                raise RegistryError(
                    f"model_type {model_type!r} is claimed by adapters "
                    f"{self._model_types[model_type]!r} and {adapter.name!r} (from {origin})",
                    name=model_type,
                )
            self._model_types[model_type] = adapter.name

    def adapter_for(self, model_or_config: Any) -> Any:
        """The adapter serving a model (or config) by its ``model_type``."""
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        if model_type not in self._model_types:
            raise UnsupportedArchitectureError(str(model_type), list(self._model_types))
        return self.adapters.get(self._model_types[model_type])

    def model_types(self) -> list[str]:
        return sorted(self._model_types)

    def registry(self, kind: str) -> Registry[Any]:
        """The registry of ``kind``: ``adapters``, ``scorers``, ``quantizers`` or
        ``recoveries``."""
        if kind not in REGISTRIES:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(REGISTRIES)}")
        return getattr(self, kind)

    def check(self, kind: str, name: str) -> Any:
        """The plugin object called ``name`` in registry ``kind``, checked usable here: the
        edge where a name becomes an object. Raises :class:`RegistryError` (unknown name, with
        the valid ones) or :class:`prunekit.errors.PluginUnavailableError` (its ``available()``
        said no, with what to install)."""
        registry = self.registry(kind)
        plugin = registry.get(name)
        check_available(plugin, registry.kind)
        return plugin

    def describe(self, *, options: bool = False) -> list[str]:
        """Lines for ``prunekit plugins``: each plugin module and what it registers; with
        ``options``, each registered plugin's options (its ``config_class`` fields)."""
        lines = []
        for plugin_name, provided in self.provided.items():
            parts = [
                f"{hook.removeprefix('register_')}: {', '.join(provided[hook])}"
                for hook in HOOKS
                if provided.get(hook)
            ]
            lines += [plugin_name, f"    {'; '.join(parts) or '(registers nothing)'}"]
        lines += ["", f"model types: {', '.join(self.model_types())}"]
        if options:
            lines += self._option_lines()
        return lines

    def _option_lines(self) -> list[str]:
        lines = []
        for kind in REGISTRIES:
            registry = self.registry(kind)
            for name in registry.names():
                config_class = getattr(registry.get(name), "config_class", None)
                helps = option_help(config_class) if config_class is not None else {}
                if helps:
                    lines += ["", f"{registry.kind} {name} options:"]
                    lines += [
                        f"    {key}: {text}" if text else f"    {key}"
                        for key, text in helps.items()
                    ]
        return lines


@functools.lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide plugin set, built on first use."""
    return Plugins()


def reset_plugins() -> None:
    """Forget the cached plugin set (after installing a plugin, or in tests)."""
    get_plugins.cache_clear()


def get_adapter(model_or_config: Any) -> Any:
    return get_plugins().adapter_for(model_or_config)
