"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv 2306.00978) with AutoAWQ when it imports, else GPTQModel's AWQ (torch
backend on CPU).

AWQ protects the weight channels that see large activations by scaling them before rounding:
for each group of Linears sharing an input ``X``, with per-input-channel activation magnitude
``s_X = mean|X|``, it searches ``α ∈ [0, 1]`` for the scales ``s = s_X^α`` minimising
``||Q(W · diag(s)) · (diag(s)⁻¹ X) - W X||``, folds ``diag(s)⁻¹`` into the preceding op (the
RMSNorm or the previous Linear) and then rounds ``W · diag(s)`` to ``bits`` per group of
``group_size`` input columns (with a zero point unless ``sym``), optionally clipping the
weight range to minimise the same output error.

Output: AWQ GEMM format (``quantization_config.quant_method = "awq"``), which
``AutoModelForCausalLM.from_pretrained`` reloads when ``gptqmodel`` is installed (also for
AutoAWQ's output: AutoAWQ's own loader needs IPEX on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.quantize import QuantizationError, staged_quantize
from prunekit.plugins import get_adapter
from prunekit.quantizers.gptqmodel_backend import (
    CalibratedConfig,
    GPTQModelQuantizer,
    gptqmodel_missing,
    import_check,
    run_gptqmodel,
)


@dataclass
class AWQConfig(CalibratedConfig):
    """Settings of the ``awq`` quantizer."""

    BITS: ClassVar[tuple[int, ...]] = (4,)
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "autoawq", "gptqmodel")

    bits: int = field(default=4, metadata={"help": "weight bits (AWQ GEMM kernels: 4)"})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "input columns per scale (power of two); None: the largest of 128, 64, 32 "
            "dividing every quantized input width (after pruning)"
        },
    )
    sym: bool = field(
        default=False, metadata={"help": "symmetric grid; False keeps AWQ's zero point"}
    )
    backend: str = field(
        default="auto",
        metadata={"help": "auto (AutoAWQ if it imports, else GPTQModel), autoawq, gptqmodel"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size == -1:
            raise ValueError("group_size must be a power of two >= 8 for AWQ (-1 is GPTQ only)")


def autoawq_usable() -> tuple[bool, str]:
    """AutoAWQ is deprecated upstream; its import may break with new transformers."""
    return import_check("awq", "autoawq")


def _run_autoawq(model: nn.Module, tokenizer: Any, ids: torch.LongTensor, config: AWQConfig):
    from awq import AutoAWQForCausalLM

    dtype = next(model.parameters()).dtype

    def run(src: Path, out: Path) -> None:
        qmodel = AutoAWQForCausalLM.from_pretrained(str(src), torch_dtype=dtype, safetensors=True)
        qmodel.quantize(
            tokenizer,
            quant_config={
                "zero_point": not config.sym,
                "q_group_size": config.group_size,
                "w_bit": config.bits,
                "version": "GEMM",
            },
            # Each window is exactly max_calib_seq_len tokens, so AutoAWQ's re-chunking of
            # the concatenated samples gives back the same windows.
            calib_data=ids.tolist(),
            max_calib_samples=ids.shape[0],
            max_calib_seq_len=ids.shape[1],
            n_parallel_calib_samples=None,
        )
        qmodel.save_quantized(str(out), safetensors=True)
        tokenizer.save_pretrained(out)

    return staged_quantize(model, tokenizer, "awq", run)


class AWQQuantizer(GPTQModelQuantizer):
    """AWQ with AutoAWQ (the package the user named) or GPTQModel's AWQ."""

    name = "awq"
    config_class = AWQConfig
    fallback = "autoawq"
    install_fallback = "pip install 'prunekit[awq]'"

    def without_gptqmodel(self, missing: list[str]) -> tuple[bool, str]:
        return False, (
            f"{' and '.join(missing)} not installed: AWQ checkpoints reload through GPTQModel's "
            "kernels (and GPTQModel also quantizes AWQ): pip install 'prunekit[gptq]' "
            "(optionally 'prunekit[awq]' for AutoAWQ)"
        )

    def with_gptqmodel(self) -> str:
        ok, why = autoawq_usable()
        return ("AutoAWQ" if ok else f"GPTQModel's AWQ ({why})") + " will quantize"

    def fallback_usable(self) -> tuple[bool, str]:
        return autoawq_usable()

    def resolve_backend(self, backend: str) -> str:
        if backend != "auto":
            return backend
        return "autoawq" if autoawq_usable()[0] and not gptqmodel_missing() else "gptqmodel"

    def run_fallback(self, model, tokenizer, ids, config: AWQConfig) -> nn.Module:
        return _run_autoawq(model, tokenizer, ids, config)

    def run_gptqmodel(self, model, tokenizer, ids, config: AWQConfig) -> nn.Module:
        check_awq_clip_rows(model)
        settings = {
            "method": "awq",
            "format": "gemm",
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
        }
        return run_gptqmodel(
            model,
            tokenizer,
            ids,
            settings,
            prefix=self.name,
            quant_backend="awq_torch",
            # GPTQModel's AWQ kernels pack and run in 16-bit only; bf16 is the CPU-friendly one.
            dtype=_awq_dtype(model),
        )


def check_awq_clip_rows(model: nn.Module) -> None:
    """GPTQModel's AWQ clip search walks the output rows of every Linear except the query/key
    projections in blocks of 64 and asserts that they divide evenly (it would otherwise fail
    inside a worker thread, taking the whole process down). Refuse such a model up front.
    The query/key projections are the adapter's, not guessed from module names."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        q_proj, k_proj, _ = adapter.qkv_projections(layer)
        unclipped = {id(q_proj), id(k_proj)}
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or id(module) in unclipped:
                continue
            if module.out_features % 64:
                raise QuantizationError(
                    f"layer {i} {name} has {module.out_features} output features; GPTQModel's "
                    "AWQ needs a multiple of 64 outside the query/key projections. Keep KV "
                    "head counts x head_dim and MLP widths at multiples of 64 (Targets.round_to"
                    "=64), or use backend='autoawq' or the gptq quantizer"
                )


def _awq_dtype(model: nn.Module) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
