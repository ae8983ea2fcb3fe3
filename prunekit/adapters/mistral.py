"""Mistral: Llama layout with a global sliding window."""

from __future__ import annotations

from prunekit.adapters.base import DecoderAdapter
from prunekit.hookspecs import hookimpl


class MistralAdapter(DecoderAdapter):
    name = "mistral"
    model_types = ("mistral",)


@hookimpl
def register_adapters(register):
    register(MistralAdapter())
