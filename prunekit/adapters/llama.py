"""Llama (1/2/3) and SmolLM: GQA, SwiGLU MLP, pre-norm."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter, adapter_hook


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama",)


register_adapters = adapter_hook(LlamaAdapter)
