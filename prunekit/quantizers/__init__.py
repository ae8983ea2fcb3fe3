"""Built-in quantizers (``awq``, ``gptq``, ``torchao``), registered through
``register_quantizers`` like any plugin. They run last: prune -> recover -> quantize.

Backends are imported only when a quantizer runs, so registering them costs nothing and a
missing backend is reported by ``available()`` with what to install.
"""

from __future__ import annotations

from prunekit.hookspecs import hookimpl
from prunekit.quantizers.awq import AWQConfig, AWQQuantizer
from prunekit.quantizers.base import (
    QuantizationError,
    QuantizerUnavailableError,
    dir_size_mb,
    get_quantizer,
    is_quantized,
    quantize,
    quantizer_config_from_args,
    save_quantized,
)
from prunekit.quantizers.gptq import GPTQConfig, GPTQQuantizer
from prunekit.quantizers.torchao import TorchAOConfig, TorchAOQuantizer


@hookimpl
def register_quantizers(register) -> None:
    """Register the built-in quantizers."""
    register(AWQQuantizer())
    register(GPTQQuantizer())
    register(TorchAOQuantizer())


__all__ = [
    "AWQConfig",
    "AWQQuantizer",
    "GPTQConfig",
    "GPTQQuantizer",
    "QuantizationError",
    "QuantizerUnavailableError",
    "TorchAOConfig",
    "TorchAOQuantizer",
    "dir_size_mb",
    "get_quantizer",
    "is_quantized",
    "quantize",
    "quantizer_config_from_args",
    "save_quantized",
]
