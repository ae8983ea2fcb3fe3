"""The one contract every plugin kind implements (adapters, scorers, quantizers, recovery
methods), and the helpers that turn user options into a plugin's config.

A plugin is an object with

- ``name``: its registry name (lower case, ``[a-z][a-z0-9_-]*``);
- ``config_class``: a ``@dataclass`` whose fields are the plugin's options, each with
  ``field(metadata={"help": ...})`` and validation in ``__post_init__`` that raises
  ``ValueError`` naming the field;
- ``available() -> (ok, why)``: whether its backend is usable here, and if not what to install
  or change.

Options reach a plugin generically, whatever the plugin: the recipe section
``{method: NAME, options: {...}}`` and the CLI's ``--quant-opt key=value`` /
``--recover-opt key=value`` / ``--scorer-opt key=value`` all end in :func:`build_config`, so a
third-party plugin's own options work without touching core.

This module depends on nothing in prunekit but :mod:`prunekit.errors`: ``core`` and every
plugin package may import it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import yaml

from prunekit.errors import PluginUnavailableError


@runtime_checkable
class Plugin(Protocol):
    """What every registered plugin provides (see the module docstring)."""

    name: str
    config_class: type

    def available(self) -> tuple[bool, str]: ...


@dataclass
class NoOptions:
    """The config of a plugin without options."""

    def to_dict(self) -> dict[str, Any]:
        return {}


class PluginBase:
    """Convenience base class: no options, always available. Subclasses set ``name`` and
    override what they need."""

    name: ClassVar[str]
    config_class: ClassVar[type] = NoOptions

    def available(self) -> tuple[bool, str]:
        return True, ""

    def make_config(self, options: Any = None, *, section: str | None = None) -> Any:
        return build_config(self, options, section=section)


def option_fields(config_class: type) -> dict[str, dataclasses.Field]:
    """The user-settable fields of a plugin config (``init=True`` dataclass fields)."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class {config_class!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(config_class) if f.init}


def option_help(config_class: type) -> dict[str, str]:
    """``{field: help text}`` of a plugin config, for ``--help`` and ``prunekit plugins``."""
    return {
        name: str(f.metadata.get("help", "")) for name, f in option_fields(config_class).items()
    }


def coerce_option(value: Any, annotation: Any) -> Any:
    """Turn a CLI string into the type a config field declares (``int``, ``float``, ``bool``,
    ``None``, lists/dicts via YAML); non-strings pass through unchanged."""
    if not isinstance(value, str):
        return value
    if annotation is str or annotation == "str":
        return value
    text = str(annotation)
    if text in ("str | None", "Optional[str]", "typing.Optional[str]") and value.lower() not in (
        "none",
        "null",
    ):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and "float" in text:  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return parsed


def build_config(plugin: Any, options: Any = None, *, section: str | None = None) -> Any:
    """``plugin.config_class(**options)``, with CLI strings coerced to the field types.

    ``options`` may be ``None``, a mapping, or an instance of the config class (returned as
    is). Unknown keys raise ``ValueError`` listing the valid ones; the config's own
    ``ValueError`` is re-raised prefixed by ``section`` (e.g. ``quantize.options``)."""
    config_class = plugin.config_class
    where = section or f"{getattr(plugin, 'name', plugin)!s} options"
    if options is None:
        options = {}
    if isinstance(options, config_class):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(
            f"{where}: expected a mapping or a {config_class.__name__}, "
            f"got {type(options).__name__}"
        )
    fields = option_fields(config_class)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {', '.join(unknown)} for {plugin.name!r}; valid: "
            f"{', '.join(sorted(fields)) or '(none)'}"
        )
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = {name: f.type for name, f in fields.items()}
    kwargs = {k: coerce_option(v, hints.get(k, fields[k].type)) for k, v in options.items()}
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def parse_options(pairs: Iterable[str] | None, flag: str) -> dict[str, str]:
    """``["lr=1e-4", "lora_r=8"]`` -> ``{"lr": "1e-4", "lora_r": "8"}`` (values stay strings
    until :func:`build_config` coerces them to the field types)."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag}: expected key=value, got {pair!r}")
        out[key] = value.strip()
    return out


def check_available(plugin: Any, kind: str) -> None:
    """Raise :class:`PluginUnavailableError` when ``plugin.available()`` says no."""
    ok, why = plugin.available()
    if not ok:
        raise PluginUnavailableError(kind, plugin.name, why)


__all__ = [
    "NoOptions",
    "Plugin",
    "PluginBase",
    "build_config",
    "check_available",
    "coerce_option",
    "option_fields",
    "option_help",
    "parse_options",
]
