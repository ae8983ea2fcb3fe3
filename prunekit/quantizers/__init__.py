"""Built-in quantizers (``awq``, ``gptq``, ``torchao``), registered through
``register_quantizers`` like any plugin. They run last: prune -> recover -> quantize.

The engine that drives them (:func:`quantize`, :func:`save_quantized`, :func:`is_quantized`)
lives in :mod:`prunekit.core.quantize` and is re-exported here for convenience. Backends are
imported only when a quantizer runs, so registering them costs nothing and a missing backend is
reported by ``available()`` with what to install.
"""

from __future__ import annotations

from prunekit.core.quantize import (
    QuantizationError,
    QuantizerUnavailableError,
    get_quantizer,
    is_quantized,
    options_from_flags,
    quantize,
    quantizer_config,
    save_quantized,
)
from prunekit.hookspecs import hookimpl
from prunekit.quantizers.awq import AWQConfig, AWQQuantizer
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
    "get_quantizer",
    "is_quantized",
    "options_from_flags",
    "quantize",
    "quantizer_config",
    "save_quantized",
]
