"""torchao weight quantization (in memory, no calibration), saved through transformers'
``TorchAoConfig`` so that ``AutoModelForCausalLM.from_pretrained`` reloads it.

Schemes (every ``nn.Linear`` inside the decoder layers; embeddings and the LM head stay in
full precision, so tied embeddings stay tied):

- ``int8_weight_only``: per output channel symmetric int8,
  ``W ≈ s_o · q``, ``q = round(W / s_o) ∈ [-128, 127]``, ``s_o = max|W_o,:| / 127``;
  activations stay in floating point.
- ``int8_dynamic``: the same int8 weights, and activations quantized per token at run time
  (``x ≈ s_t · round(x / s_t)``) so the matmul runs in int8.
- ``int4_grouped``: ``IntxWeightOnlyConfig`` with ``torch.int4`` and one scale per group of
  ``group_size`` input columns, ``W[o, g] ≈ s_{o,g} · q``, ``q ∈ [-8, 7]`` (symmetric) or with
  a zero point (asymmetric). torchao stores these unpacked (one int8 per value), so on disk
  the saving is that of int8; the accuracy is that of 4-bit.

Reference: the torchao quantization API (``quantize_`` with ``Int8WeightOnlyConfig``,
``Int8DynamicActivationInt8WeightConfig``, ``IntxWeightOnlyConfig``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.quantize import QUANTIZATION_INFO_ATTR, check_divisible, missing_modules
from prunekit.plugins import get_adapter
from prunekit.quantizers.checks import check_bool, check_choice, check_group_size

SCHEMES = ("int8_weight_only", "int8_dynamic", "int4_grouped")
_SCHEME_BITS = {"int8_weight_only": 8, "int8_dynamic": 8, "int4_grouped": 4}


@dataclass
class TorchAOConfig:
    """Settings of the ``torchao`` quantizer."""

    scheme: str = field(
        default="int8_weight_only",
        metadata={"help": f"one of {', '.join(SCHEMES)}"},
    )
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "int4_grouped: input columns per scale (power of two, or -1); None: the "
            "largest of 128, 64, 32 dividing every quantized input width (after pruning)"
        },
    )
    sym: bool = field(default=True, metadata={"help": "int4_grouped: symmetric (no zero point)"})
    bits: int | None = field(
        default=None, metadata={"help": "implied by the scheme (8 or 4); checked if given"}
    )

    def __post_init__(self) -> None:
        check_choice("scheme", self.scheme, SCHEMES)
        check_group_size(self.group_size)
        check_bool("sym", self.sym)
        implied = _SCHEME_BITS[self.scheme]
        if self.bits is None:
            self.bits = implied
        elif self.bits != implied:
            raise ValueError(
                f"bits={self.bits} does not match scheme {self.scheme!r} ({implied}-bit); "
                "torchao schemes: int8_weight_only / int8_dynamic (8), int4_grouped (4)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torchao_config(config: TorchAOConfig) -> Any:
    """The torchao config object for ``config.scheme``."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    if config.scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if config.scheme == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    from torchao.quantization.quant_primitives import MappingType

    granularity = PerAxis(0) if config.group_size == -1 else PerGroup(config.group_size)
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int4,
        granularity=granularity,
        mapping_type=MappingType.SYMMETRIC if config.sym else MappingType.ASYMMETRIC,
    )


class TorchAOQuantizer:
    """Weight-only / dynamic int8 and grouped int4 with torchao (no calibration data)."""

    name: ClassVar[str] = "torchao"
    config_class: ClassVar[type] = TorchAOConfig

    def options_from_flags(
        self, bits: int | None = None, group_size: int | None = None, scheme: str | None = None
    ) -> dict[str, Any]:
        """CLI flags: default scheme ``int8_weight_only``; ``bits=4`` alone means
        ``int4_grouped``."""
        options: dict[str, Any] = {}
        if scheme is not None:
            options["scheme"] = scheme
        elif bits == 4:
            options["scheme"] = "int4_grouped"
        elif bits not in (None, 8):
            raise ValueError(
                f"bits={bits} (--quant-bits) is not available with torchao: use 8 "
                "(int8_weight_only, int8_dynamic) or 4 (int4_grouped)"
            )
        for key, value in (("bits", bits), ("group_size", group_size)):
            if value is not None:
                options[key] = value
        return options

    def uses_group_size(self, config: TorchAOConfig) -> bool:
        """Only ``int4_grouped`` quantizes in groups (the int8 schemes are per channel)."""
        return config.scheme == "int4_grouped"

    def available(self) -> tuple[bool, str]:
        missing = missing_modules("torchao")
        if missing:
            return False, "torchao is not installed: pip install 'prunekit[torchao]'"
        from transformers.utils import is_torchao_available

        if not is_torchao_available():
            return False, (
                "transformers does not accept the installed torchao (too old?): "
                "pip install -U 'prunekit[torchao]'"
            )
        return True, "torchao is installed"

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: TorchAOConfig,
    ) -> nn.Module:
        from torchao.quantization import quantize_
        from transformers import TorchAoConfig
        from transformers.quantizers.auto import AutoHfQuantizer

        if self.uses_group_size(config):
            config = replace(config, group_size=check_divisible(model, config.group_size))
        out = copy.deepcopy(model)
        adapter = get_adapter(out)
        layers = adapter.layers(out)
        targets = {id(m) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
        ao_config = torchao_config(config)
        quantize_(out, ao_config, filter_fn=lambda module, fqn: id(module) in targets)
        # The marks transformers sets when it quantizes at load time: they make
        # save_pretrained write torchao's flattened safetensors + quantization_config, and
        # they make prunekit.apply_plan refuse the model.
        hf_config = TorchAoConfig(ao_config)
        out.config.quantization_config = hf_config
        out.hf_quantizer = AutoHfQuantizer.from_config(hf_config, pre_quantized=False)
        out.__dict__[QUANTIZATION_INFO_ATTR] = {"method": self.name, "backend": "torchao"}
        return out.eval()
