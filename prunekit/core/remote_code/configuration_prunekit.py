"""Configuration classes of a prunekit per-layer or sub-block result, for
``AutoConfig.from_pretrained(path, trust_remote_code=True)``.

prunekit copies this file next to the weights of every per-layer result. It needs only
``transformers`` (5.x, which has ``per_layer_config``), never prunekit. ``config.json`` keeps
transformers' own format: global values plus ``per_layer_config`` (per layer
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size`` and ``skip``:
``["attention"]`` / ``["mlp"]``), so a transformers release with heterogeneous modeling loads it
natively; these classes only bridge the releases that have the config side alone.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class _PerLayerConfigMixin:
    """Build the config from its global values, then attach ``per_layer_config``.

    The stock validators (``LlamaConfig.validate_architecture``) read global head counts, which
    a heterogeneous config refuses; the global values are the unpruned ones and valid."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        config_dict = dict(config_dict)
        per_layer = config_dict.pop("per_layer_config", None)
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if per_layer:
            config.per_layer_config = {int(k): dict(v) for k, v in per_layer.items()}
        return result


class PrunekitLlamaConfig(_PerLayerConfigMixin, LlamaConfig):
    """A Llama config whose layers may differ (``per_layer_config``)."""


class PrunekitMistralConfig(_PerLayerConfigMixin, MistralConfig):
    """A Mistral config whose layers may differ (``per_layer_config``)."""


class PrunekitQwen2Config(_PerLayerConfigMixin, Qwen2Config):
    """A Qwen2 config whose layers may differ (``per_layer_config``)."""


class PrunekitQwen3Config(_PerLayerConfigMixin, Qwen3Config):
    """A Qwen3 config whose layers may differ (``per_layer_config``)."""
