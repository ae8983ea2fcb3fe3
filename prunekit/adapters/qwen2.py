"""Qwen2: Llama layout with q/k/v biases (sliced with their rows)."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter
from prunekit.hookspecs import hookimpl


class Qwen2Adapter(DecoderAdapter):
    name = "qwen2"
    model_types = ("qwen2",)


@hookimpl
def register_adapters(register):
    register(Qwen2Adapter())
