"""Qwen2: Llama layout with q/k/v biases (sliced with their rows)."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter, adapter_hook


class Qwen2Adapter(DecoderAdapter):
    name = "qwen2"
    model_types = ("qwen2",)


register_adapters = adapter_hook(Qwen2Adapter)
