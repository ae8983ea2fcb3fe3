"""Model classes of a prunekit per-layer or sub-block result, for
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Each class subclasses the stock transformers one and differs in one thing: every decoder layer
is built from its own ``config.per_layer_config[i]`` (head counts, MLP width), and a layer whose
``skip`` names ``"attention"`` or ``"mlp"`` gets a no-op in place of that sub-block and its norm
(the residual stream passes through unchanged; no weights, no KV cache for a skipped attention).
Weights load as saved: no random init, no ``ignore_mismatched_sizes``. Needs only transformers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers import (
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers.cache_utils import DummyLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from .configuration_prunekit import (
    PrunekitLlamaConfig,
    PrunekitMistralConfig,
    PrunekitQwen2Config,
    PrunekitQwen3Config,
)

_HETEROGENEITY_LOG = "transformers.integrations.heterogeneity.configuration_utils"


@contextlib.contextmanager
def _global_values(config) -> Iterator[None]:
    """Let the stock constructors read the global (unpruned) values of a per-layer config;
    the layers are rebuilt from their own configs right after."""
    if not getattr(config, "is_heterogeneous", False):
        yield
        return
    before = config.allow_global_per_layer_attribute_access
    log = logging.getLogger(_HETEROGENEITY_LOG)
    level = log.level
    config.allow_global_per_layer_attribute_access = True
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config.allow_global_per_layer_attribute_access = before
        log.setLevel(level)


class SkippedCacheLayer(DummyLayer):
    """The KV-cache slot of a removed attention: stores nothing. transformers reads the
    sequence length and mask sizes from one layer (layer 0 by default; 5.25 no longer skips a
    ``DummyLayer`` there), so anything else it asks is answered by the first layer that
    caches."""

    def __init__(self, cache):
        super().__init__()
        self._cache = cache

    def _first_real(self):
        return next((x for x in self._cache.layers if not isinstance(x, DummyLayer)), None)

    def get_seq_length(self) -> int:
        real = self._first_real()
        return real.get_seq_length() if real is not None else 0

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        real = self._first_real()
        if real is None:
            raise AttributeError(name)
        return getattr(real, name)


class SkippedAttention(nn.Module):
    """A removed attention sub-block: adds nothing to the residual stream and keeps no KV cache
    (its cache slot becomes transformers' ``DummyLayer``, which ``get_seq_length`` skips)."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, cache=None, past_key_values=None, **kwargs):
        # transformers >= 5.25 passes the cache as ``cache``, earlier 5.x as ``past_key_values``
        cache = cache if cache is not None else past_key_values
        layers = getattr(cache, "layers", None)
        if layers is not None and self.layer_idx < len(layers):
            if not isinstance(layers[self.layer_idx], DummyLayer):
                layers[self.layer_idx] = SkippedCacheLayer(cache)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """A removed MLP sub-block: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _build_layers(model: nn.Module, config, layer_cls: type[nn.Module]) -> None:
    """Replace the homogeneous layers by layers built at their own shapes."""
    if not getattr(config, "is_heterogeneous", False):
        return
    layers = []
    for i, layer_config in enumerate(config.per_layer_config):
        layer = layer_cls(layer_config, i)
        skip = set(getattr(layer_config, "skip", None) or ())
        if "attention" in skip:
            layer.self_attn = SkippedAttention(i)
            layer.input_layernorm = nn.Identity()
        else:
            # the attention implementation is chosen on the model's config after init
            layer.self_attn.config = config
        if "mlp" in skip:
            layer.mlp = SkippedMLP()
            layer.post_attention_layernorm = nn.Identity()
        layers.append(layer)
    model.layers = nn.ModuleList(layers)
    model.post_init()


def _model_classes(stem: str, model_base, causal_base, layer_cls, config_cls):
    """``Prunekit<stem>Model`` and ``Prunekit<stem>ForCausalLM``: the stock classes with every
    decoder layer built by :func:`_build_layers`."""

    def model_init(self, config):
        with _global_values(config):
            model_base.__init__(self, config)
            _build_layers(self, config, layer_cls)

    model_cls = type(
        f"Prunekit{stem}Model",
        (model_base,),
        {"config_class": config_cls, "__init__": model_init, "__module__": __name__},
    )

    def causal_init(self, config):
        # causal_base.__init__ with the decoder built by model_cls
        with _global_values(config):
            super(causal_base, self).__init__(config)
            self.model = model_cls(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    causal_cls = type(
        f"Prunekit{stem}ForCausalLM",
        (causal_base,),
        {"config_class": config_cls, "__init__": causal_init, "__module__": __name__},
    )
    return model_cls, causal_cls


PrunekitLlamaModel, PrunekitLlamaForCausalLM = _model_classes(
    "Llama", LlamaModel, LlamaForCausalLM, LlamaDecoderLayer, PrunekitLlamaConfig
)
PrunekitMistralModel, PrunekitMistralForCausalLM = _model_classes(
    "Mistral", MistralModel, MistralForCausalLM, MistralDecoderLayer, PrunekitMistralConfig
)
PrunekitQwen2Model, PrunekitQwen2ForCausalLM = _model_classes(
    "Qwen2", Qwen2Model, Qwen2ForCausalLM, Qwen2DecoderLayer, PrunekitQwen2Config
)
PrunekitQwen3Model, PrunekitQwen3ForCausalLM = _model_classes(
    "Qwen3", Qwen3Model, Qwen3ForCausalLM, Qwen3DecoderLayer, PrunekitQwen3Config
)
