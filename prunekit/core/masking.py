"""Mask units of a dense model without changing its shapes (the reference that surgery must
match, and the cheap way to evaluate "what if these units were gone")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from prunekit.core.plan import PrunePlan
from prunekit.plugins import get_adapter


def _zero_inputs(features: torch.Tensor):
    def hook(module: nn.Module, args: tuple):
        x = args[0].clone()
        x[..., features.to(x.device)] = 0
        return (x, *args[1:])

    return hook


def _identity(module: nn.Module, args: tuple, kwargs: dict, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _zero_output(module: nn.Module, args: tuple, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@contextlib.contextmanager
def masked(model: nn.Module, plan: PrunePlan) -> Iterator[nn.Module]:
    """Within the context, ``model`` behaves as if the plan's units were removed: head outputs
    are zeroed before the output projection, neuron activations are zeroed before the down
    projection, removed layers pass their input through unchanged, removed attention / MLP
    sub-blocks add zero to the residual stream (the attention still fills its KV cache)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    handles = []
    try:
        for i, heads in plan.heads.items():
            if heads:
                proj = adapter.head_output_projection(layers[i])
                features = adapter.head_features(layers[i], heads)
                handles.append(proj.register_forward_pre_hook(_zero_inputs(features)))
        for i, neurons in plan.neurons.items():
            if neurons:
                proj = adapter.neuron_output_projection(layers[i])
                idx = torch.as_tensor(neurons, dtype=torch.long)
                handles.append(proj.register_forward_pre_hook(_zero_inputs(idx)))
        for i in plan.layers:
            handles.append(layers[i].register_forward_hook(_identity, with_kwargs=True))
        for i in plan.attention:
            attention = adapter.attention(layers[i])
            handles.append(attention.register_forward_hook(_zero_output))
        for i in plan.mlp:
            handles.append(
                adapter.neuron_output_projection(layers[i]).register_forward_hook(_zero_output)
            )
        yield model
    finally:
        for h in handles:
            h.remove()
