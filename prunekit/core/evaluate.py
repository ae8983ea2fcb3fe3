"""Evaluation of dense and pruned models in one call (:func:`evaluate`): perplexity or
embedding similarity (:mod:`prunekit.core.quality`), latency and memory
(:mod:`prunekit.core.speed`), parameters and FLOPs (:mod:`prunekit.core.flops`). The functions
of those modules are re-exported here."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from prunekit.core.flops import flops_breakdown, flops_per_token, param_count
from prunekit.core.quality import (
    embedding_similarity,
    is_causal,
    perplexity,
    read_text,
    sentences_from_text,
)
from prunekit.core.speed import latency, peak_memory, weights_memory_mb

__all__ = [
    "embedding_similarity",
    "evaluate",
    "flops_breakdown",
    "flops_per_token",
    "latency",
    "param_count",
    "peak_memory",
    "perplexity",
    "read_text",
    "sentences_from_text",
    "weights_memory_mb",
]


# ---- bundle -------------------------------------------------------------------------------
def evaluate(
    model: nn.Module | str | os.PathLike,
    tokenizer: Any = None,
    *,
    text: str | os.PathLike | None = None,
    dense_model: nn.Module | None = None,
    context_len: int = 2048,
    max_tokens: int | None = None,
    max_chars: int | None = None,
    latency_kwargs: dict[str, Any] | None = None,
    measure_latency: bool = True,
    n_sentences: int = 64,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
) -> dict[str, Any]:
    """Everything the before/after table needs, in one dict::

        {"model_type", "n_layers", "params", "params_no_embeddings",
         "flops_per_token", "flops_seq_len",
         "perplexity": {...perplexity()...}          # causal LMs, when text is given
         "embedding_similarity": {"cosine", "sentences", "text"}   # encoders, with dense_model
         "latency": {...latency()...}}                # unless measure_latency=False

    Decoders get the perplexity on ``text`` (``context_len``, ``max_tokens``, ``max_chars``).
    Encoders (no LM head) get the embedding similarity to ``dense_model`` on the first
    ``n_sentences`` sentences of ``text`` (cut to ``max_chars``). ``flops_per_token`` is taken
    at ``context_len``; ``latency_kwargs`` go to :func:`latency`.

    ``model`` may be a path (directory, hub id, ``.gguf``): it is loaded with ``device``
    (default ``"auto"``: CUDA when available), ``dtype`` (default: the checkpoint's own),
    ``device_map`` / ``max_memory`` (:func:`prunekit.load_model`), with its own tokenizer
    unless ``tokenizer`` is given. An in-memory model keeps its own device and dtype (asking
    for another is a :class:`~prunekit.errors.DeviceError`).
    """
    from prunekit.core.devices import load_or_check
    from prunekit.plugins import get_adapter

    placement = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    model, own_tokenizer = load_or_check(model, **placement)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer

    adapter = get_adapter(model)
    causal = is_causal(model)
    result: dict[str, Any] = {
        "model_type": model.config.model_type,
        "n_layers": len(adapter.layers(model)),
        "params": param_count(model),
        "params_no_embeddings": param_count(model, embeddings=False),
        "flops_per_token": flops_per_token(model, context_len),
        "flops_seq_len": context_len,
    }
    if text is not None and causal:
        result["perplexity"] = perplexity(
            model,
            tokenizer,
            text,
            context_len=context_len,
            max_tokens=max_tokens,
            max_chars=max_chars,
            progress=progress,
        )
    elif text is not None and dense_model is not None:
        content, label = read_text(text, max_chars)
        sentences = sentences_from_text(content, n_sentences)
        result["embedding_similarity"] = {
            "cosine": embedding_similarity(
                model, dense_model, tokenizer, sentences, progress=progress
            ),
            "sentences": len(sentences),
            "text": label,
            "max_chars": max_chars,
        }
    if measure_latency:
        result["latency"] = latency(model, **(latency_kwargs or {}))
    return result
