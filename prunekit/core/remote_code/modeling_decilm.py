"""``DeciLMForCausalLM`` for a prunekit DeciLM / Nemotron-NAS export, for
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` in transformers 5
(vLLM serves the same directory with its own ``DeciLMForCausalLM``).

``block_configs`` is turned into transformers' own ``per_layer_config`` (per layer
``num_key_value_heads = num_attention_heads // n_heads_in_group``, ``intermediate_size`` from
``ffn_mult`` or as written, ``skip: ["attention"]`` / ``["mlp"]`` for a no-op) and the model is
the per-layer Llama of ``modeling_prunekit`` (stock Llama classes, each layer built at its own
shape). Weight names are Llama's. Needs only transformers.
"""

from __future__ import annotations

from typing import Any

from .configuration_decilm import DeciLMConfig
from .configuration_prunekit import PrunekitLlamaConfig
from .modeling_prunekit import PrunekitLlamaForCausalLM, PrunekitLlamaModel


def _width(ffn: dict[str, Any], hidden_size: int) -> int:
    if ffn.get("ffn_mult") is not None:
        width = int(2 * ffn["ffn_mult"] * hidden_size / 3)
        return width if width % 256 == 0 else width + 256 - width % 256
    return ffn["intermediate_size"]


def per_layer_config(config: DeciLMConfig) -> PrunekitLlamaConfig:
    """The per-layer Llama config equivalent to a DeciLM config."""
    data = config.to_dict()
    blocks = data.pop("block_configs")
    n_heads, hidden = data["num_attention_heads"], data["hidden_size"]
    layers: dict[str, dict[str, Any]] = {}
    for i, block in enumerate(blocks):
        attention, ffn = block["attention"], block["ffn"]
        entry: dict[str, Any] = {}
        if attention["no_op"]:
            entry["skip"] = ["attention"]
        else:
            entry["num_key_value_heads"] = n_heads // attention["n_heads_in_group"]
        if ffn["no_op"]:
            entry["skip"] = [*entry.get("skip", []), "mlp"]
        else:
            entry["intermediate_size"] = _width(ffn, hidden)
        layers[str(i)] = entry
    kv = [e["num_key_value_heads"] for e in layers.values() if "num_key_value_heads" in e]
    widths = [e["intermediate_size"] for e in layers.values() if "intermediate_size" in e]
    for key in ("auto_map", "rope_scaling", "rope_theta", "torch_dtype"):
        data.pop(key, None)
    data.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=max(kv, default=n_heads),
        intermediate_size=max(widths, default=1),
        rope_parameters=config.rope_parameters,
        per_layer_config=layers,
    )
    out = PrunekitLlamaConfig.from_dict(data)
    out._attn_implementation = config._attn_implementation
    return out


def _converted(config: Any) -> Any:
    # by attribute: the config class may come from another copy of this module
    return per_layer_config(config) if getattr(config, "block_configs", None) else config


class DeciLMModel(PrunekitLlamaModel):
    """The decoder of a DeciLM export (a per-layer Llama)."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(_converted(config))


class DeciLMForCausalLM(PrunekitLlamaForCausalLM):
    """A DeciLM export as a causal LM (a per-layer Llama; ``model.config`` is its per-layer
    Llama config)."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(_converted(config))
