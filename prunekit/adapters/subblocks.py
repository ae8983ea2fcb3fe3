"""Stand-ins for removed sub-blocks of a pre-norm decoder layer.

A layer computes ``h = x + attn(norm1(x))`` then ``y = h + mlp(norm2(h))``. Removing a
sub-block replaces it by a module that adds nothing to the residual stream and its norm by
``nn.Identity``: the layer then computes ``h = x`` (or ``y = h``). The stand-ins hold no
weights. A removed attention keeps no KV cache: it turns its cache slot into transformers'
``DummyLayer`` (which ``Cache.get_seq_length`` skips), as the ``trust_remote_code`` module of a
saved result does, so layer indices (and with them Qwen2's sliding/full layer types) keep
their meaning.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DummyLayer


class RemovedAttention(nn.Module):
    """Attention sub-block removed by a plan's ``attention`` entry: output zero, no cache.
    Keeps ``layer_idx`` (renumbered with the layers) and the model's ``head_dim``."""

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        # transformers >= 5.25 passes the cache as ``cache``, earlier 5.x as ``past_key_values``
        cache = cache if cache is not None else past_key_values
        cache_layers = getattr(cache, "layers", None)
        if cache_layers is not None and 0 <= self.layer_idx < len(cache_layers):
            if not isinstance(cache_layers[self.layer_idx], DummyLayer):
                # one class for prunekit's models and the trust_remote_code module shipped with
                # every output; imported here, not at module level, because that module imports
                # transformers' model classes (modeling_utils, and through it every installed
                # quantization backend): resolving an adapter or validating a plan must not
                from prunekit.core.remote_code.modeling_prunekit import SkippedCacheLayer

                cache_layers[self.layer_idx] = SkippedCacheLayer(cache)
        return hidden_states.new_zeros(hidden_states.shape), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, removed"


class RemovedMLP(nn.Module):
    """MLP sub-block removed by a plan's ``mlp`` entry: output zero."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros(hidden_states.shape)

    def extra_repr(self) -> str:
        return "removed"


__all__ = ["RemovedAttention", "RemovedMLP"]
