"""Llama (1/2/3) and SmolLM: GQA, SwiGLU MLP, pre-norm.

transformers 5's ``LlamaConfig.validate_architecture`` rejects ``hidden_size %
num_attention_heads != 0`` even with an explicit ``head_dim`` (on save and on load), so most
head prunings of real Llamas (Llama-3-8B: 32 heads in 8 KV groups leave 28, 24, 20 -- none
divides 4096) have no stock Llama config. The same tensors are then written under
``MistralForCausalLM``: its modeling equals Llama's when ``sliding_window`` is null and there
are no attention/MLP biases, and ``MistralConfig`` has no such validator, so the result stays
loadable by stock transformers and servers. A Llama with biases keeps the per-layer format.
"""

from __future__ import annotations

from typing import Any

from prunekit.adapters.base import DecoderAdapter, adapter_hook
from prunekit.core.shapes import LayerShape, config_global

#: LlamaConfig keys MistralConfig has no use for (both False when the modelings agree)
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")


def mistral_can_hold(config: Any) -> bool:
    """Whether a Llama config's model is exactly a Mistral model (no biases)."""
    return not any(config_global(config, key) for key in ("attention_bias", "mlp_bias"))


def as_mistral_config(config: Any) -> Any:
    """The ``MistralConfig`` (``sliding_window`` null) that builds the same model as the Llama
    ``config``, rope settings (``rope_parameters``) and every other field carried over."""
    from transformers import MistralConfig

    data = config.to_dict()
    for key in (*_LLAMA_ONLY_KEYS, "model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data.update(sliding_window=None, architectures=["MistralForCausalLM"])
    return MistralConfig(**data)


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama",)
    # LlamaConfig.validate_architecture (transformers 5) rejects hidden_size % n_heads != 0
    heads_divide_hidden = True

    def stock_expressible(self, shapes: list[LayerShape], config: Any) -> bool:
        uniform = len(set(shapes)) <= 1 and all(s.has_attention and s.has_mlp for s in shapes)
        return uniform and (super().stock_expressible(shapes, config) or mistral_can_hold(config))

    def saved_config(self, config: Any) -> Any:
        """A uniform head count LlamaConfig rejects is written as the equivalent Mistral."""
        if getattr(config, "is_heterogeneous", False) or not mistral_can_hold(config):
            return config
        hidden = config_global(config, "hidden_size")
        if hidden % config_global(config, "num_attention_heads") == 0:
            return config
        return as_mistral_config(config)


register_adapters = adapter_hook(LlamaAdapter)
