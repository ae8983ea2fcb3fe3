"""Whether a model is quantized: the one check, read by surgery (packed weights cannot be
sliced), the pipeline (compress an unquantized model) and the quantization engine; and the
engine's error class, shared with :mod:`prunekit.core.quant_groups`.

It lives in a module of its own, below :mod:`prunekit.core.surgery` and
:mod:`prunekit.core.quantize`, because surgery needs the check and the engine needs surgery.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError

#: where the quantization engine keeps a backend's saved output directory on the model
QUANTIZED_DIR_ATTR = "_prunekit_quantized_dir"
#: where it keeps what the quantizer did (method, backend, config) for the sidecar
QUANTIZATION_INFO_ATTR = "_prunekit_quantization"


class QuantizationError(PrunekitError, ValueError):
    """A model cannot be quantized as asked (already quantized, per-layer shapes, bad data, a
    group size that does not divide its widths)."""


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` carries any quantization mark transformers or a backend sets:
    ``hf_quantizer``, ``is_quantized``, ``config.quantization_config``, the quantization
    engine's staged directory, or a weight that is a tensor subclass (torchao swaps weights
    for subclasses that still report themselves as Parameters)."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return True
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return True
    if model.__dict__.get(QUANTIZED_DIR_ATTR) is not None:
        return True
    return any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())


__all__ = ["QUANTIZATION_INFO_ATTR", "QUANTIZED_DIR_ATTR", "QuantizationError", "is_quantized"]
