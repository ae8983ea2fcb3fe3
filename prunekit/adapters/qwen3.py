"""Qwen3: Llama layout with per-head q/k RMSNorm (over head_dim, so shared by every head and
untouched by head slicing) and auto-filled ``layer_types``."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter, adapter_hook


class Qwen3Adapter(DecoderAdapter):
    name = "qwen3"
    model_types = ("qwen3",)


register_adapters = adapter_hook(Qwen3Adapter)
