"""Architecture adapters. Built-ins register through the same ``register_adapters`` hook as
third-party plugins."""

from prunekit.adapters.base import Adapter, DecoderAdapter, LayerShape, config_global

__all__ = ["Adapter", "DecoderAdapter", "LayerShape", "config_global"]
