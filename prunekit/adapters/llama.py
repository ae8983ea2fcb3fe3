"""Llama (1/2/3) and SmolLM: GQA, SwiGLU MLP, pre-norm."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter, adapter_hook


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama",)
    # LlamaConfig.validate_architecture (transformers 5) rejects hidden_size % n_heads != 0
    heads_divide_hidden = True


register_adapters = adapter_hook(LlamaAdapter)
