"""Mistral: Llama layout with a global sliding window."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter, adapter_hook


class MistralAdapter(DecoderAdapter):
    name = "mistral"
    model_types = ("mistral",)


register_adapters = adapter_hook(MistralAdapter)
