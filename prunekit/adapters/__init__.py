"""Architecture adapters. Built-ins register through the same ``register_adapters`` hook as
third-party plugins. ``LayerShape`` and ``config_global`` live in :mod:`prunekit.core.shapes`
and are re-exported here for adapter authors."""

from prunekit.adapters.base import Adapter, DecoderAdapter
from prunekit.adapters.slicing import head_rows, slice_linear, slice_weight
from prunekit.core.shapes import LayerShape, config_global

__all__ = [
    "Adapter",
    "DecoderAdapter",
    "LayerShape",
    "config_global",
    "head_rows",
    "slice_linear",
    "slice_weight",
]
