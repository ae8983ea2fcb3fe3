"""``DeciLMConfig`` for a prunekit DeciLM / Nemotron-NAS export, for
``AutoConfig.from_pretrained(path, trust_remote_code=True)`` (vLLM reads the config this way and
serves the weights with its native ``DeciLMForCausalLM``).

``block_configs`` is a list of ``{"attention": {...}, "ffn": {...}}`` dicts, exposed as objects
with attribute access (``block.attention.no_op``, ``block.ffn.ffn_mult``). An ``ffn`` entry has
either ``ffn_mult`` (width ``roundup(int(2 * ffn_mult * hidden_size / 3), 256)``) or
``intermediate_size``, and only the keys it has are attributes. Needs only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class _Section:
    """Attribute view of one ``attention`` / ``ffn`` dict (only the keys it has)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BlockConfig:
    """One layer of a DeciLM model: its ``attention`` and ``ffn`` sections."""

    def __init__(self, attention: dict[str, Any], ffn: dict[str, Any]):
        self.attention = _Section(attention)
        self.ffn = _Section(ffn)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(LlamaConfig):
    """A Llama config with per-layer ``block_configs`` (model type ``nemotron-nas``)."""

    model_type = "nemotron-nas"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        config_dict = dict(config_dict)
        blocks = config_dict.pop("block_configs", None) or []
        nulls = [
            k for k in ("intermediate_size", "num_key_value_heads") if config_dict.get(k) is None
        ]
        for key in nulls:
            config_dict.pop(key, None)
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.block_configs = [
            b if isinstance(b, BlockConfig) else BlockConfig(b["attention"], b["ffn"])
            for b in blocks
        ]
        for key in nulls:  # global sizes do not exist in a DeciLM model: read block_configs
            config.__dict__[key] = None
        return result

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [
            b.to_dict() if isinstance(b, BlockConfig) else b
            for b in getattr(self, "block_configs", [])
        ]
        return out
