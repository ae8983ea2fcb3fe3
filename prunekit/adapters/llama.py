"""Llama (1/2/3) and SmolLM: GQA, SwiGLU MLP, pre-norm."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter
from prunekit.hookspecs import hookimpl


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama",)


@hookimpl
def register_adapters(register):
    register(LlamaAdapter())
