"""The engine of ``perplexity_drop``: the loss with each layer skipped, reusing the cached
input of the skipped layer so that only the layers above it are recomputed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.masking import masked
from prunekit.core.plan import PrunePlan


@dataclass
class PerplexityDropConfig:
    samples: int = field(
        default=16,
        metadata={
            "help": "calibration samples used (the first N; 0: all): the loss differences "
            "rank layers long before the mean loss itself is precise"
        },
    )
    cache: bool = field(
        default=True,
        metadata={
            "help": "reuse each layer's cached input and recompute only the layers above the "
            "skipped one (same scores as one full masked pass per layer, about half the cost)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or int(self.samples) < 0:
            raise ValueError(f"samples must be an integer >= 0, got {self.samples!r}")
        self.samples = int(self.samples)
        if isinstance(self.cache, str):
            self.cache = self.cache.lower() in ("1", "true", "yes", "on")
        self.cache = bool(self.cache)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "cache": self.cache}


def _loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy of one batch."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return float(loss) * ids.shape[0] * (ids.shape[1] - 1)


class _StandIn(nn.Module):
    """Stands in for a layer below the skipped one: the first returns the cached hidden state
    (``value``), the others pass their input through."""

    def __init__(self, layer: nn.Module, value: torch.Tensor | None):
        super().__init__()
        for attr in ("attention_type", "layer_idx"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.value = value

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.value is None else self.value


@contextlib.contextmanager
def _inputs_recorded(layers: Sequence[nn.Module], store: list) -> Iterator[None]:
    def hook(i):
        def record(module, args, kwargs):
            store[i] = args[0] if args else kwargs["hidden_states"]

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _cached_batch(model, adapter, ids: torch.Tensor, losses: torch.Tensor) -> float:
    """Base loss of one batch; adds to ``losses[i]`` the batch loss with layer ``i`` skipped.

    One normal pass records every layer's input ``x_i``; the pass without layer ``i`` then
    starts from ``x_i`` at layer ``i + 1`` (stand-ins replace layers ``0..i``). A layer whose
    input equals its output (already masked) changes nothing: its loss is the base loss."""
    layers = adapter.layers(model)
    inputs: list = [None] * len(layers)
    with _inputs_recorded(layers, inputs):
        base = _loss(model, ids)
    try:
        for i in range(len(layers)):
            nxt = inputs[i + 1] if i + 1 < len(layers) else None
            if nxt is not None and torch.equal(inputs[i], nxt):
                losses[i] += base
                continue
            stand = [_StandIn(layers[j], inputs[i] if j == 0 else None) for j in range(i + 1)]
            adapter.set_layers(model, nn.ModuleList([*stand, *layers[i + 1 :]]))
            losses[i] += _loss(model, ids)
    finally:
        adapter.set_layers(model, layers)
    return base


@torch.no_grad()
def layer_drop_losses(
    model: nn.Module, samples: torch.Tensor, adapter: Any, *, batch_size: int, cache: bool = True
) -> tuple[float, torch.Tensor]:
    """Mean next-token loss of ``model`` on ``samples`` and, per layer ``i``, the mean loss
    with layer ``i`` skipped (``[L]`` float64). ``cache=False``: one full masked pass per layer
    (the reference)."""
    device = next(p.device for p in model.parameters())
    n_layers = len(adapter.layers(model))
    losses = torch.zeros(n_layers, dtype=torch.float64)
    base, tokens = 0.0, 0
    for s in range(0, len(samples), batch_size):
        ids = samples[s : s + batch_size].to(device)
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        if cache:
            base += _cached_batch(model, adapter, ids, losses)
            continue
        base += _loss(model, ids)
        for i in range(n_layers):
            with masked(model, PrunePlan(layers=[i])):
                losses[i] += _loss(model, ids)
    return base / tokens, losses / tokens
