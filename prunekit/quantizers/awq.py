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

import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.quantizers.base import (
    QUANTIZATION_INFO_ATTR,
    QuantizationError,
    QuantizerUnavailableError,
    attach_quantized_dir,
    calibration_ids,
    check_calibration_counts,
    check_choice,
    check_divisible,
    check_group_size,
    load_quantized_dir,
    module_available,
    new_workdir,
    no_scheme,
    stage_model,
)
from prunekit.quantizers.gptq import gptqmodel_missing, run_gptqmodel

AWQ_BACKENDS = ("auto", "autoawq", "gptqmodel")


@dataclass
class AWQConfig:
    """Settings of the ``awq`` quantizer."""

    bits: int = field(default=4, metadata={"help": "weight bits (AWQ GEMM kernels: 4)"})
    group_size: int = field(
        default=128, metadata={"help": "input columns per scale (power of two)"}
    )
    sym: bool = field(
        default=False, metadata={"help": "symmetric grid; False keeps AWQ's zero point"}
    )
    n_samples: int = field(default=64, metadata={"help": "calibration windows used (>= 1)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration window (>= 2)"})
    backend: str = field(
        default="auto",
        metadata={"help": "auto (AutoAWQ if it imports, else GPTQModel), autoawq, gptqmodel"},
    )

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (4,))
        check_group_size(self.group_size)
        if self.group_size == -1:
            raise ValueError("group_size must be a power of two >= 8 for AWQ (-1 is GPTQ only)")
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be True or False, got {self.sym!r}")
        check_calibration_counts(self.n_samples, self.seq_len)
        check_choice("backend", self.backend, AWQ_BACKENDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(
        cls, bits: int | None = None, group_size: int | None = None, scheme: str | None = None
    ) -> AWQConfig:
        """CLI defaults: 4-bit, group size 128."""
        no_scheme("awq", scheme)
        return cls(bits=4 if bits is None else bits, group_size=group_size or 128)


def autoawq_usable() -> tuple[bool, str]:
    if module_available("awq"):
        return False, "autoawq is not installed"
    try:
        import awq  # noqa: F401
    except Exception as e:  # deprecated upstream; its import may break with new transformers
        return False, f"autoawq is installed but does not import ({type(e).__name__}: {e})"
    return True, "autoawq imports"


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "autoawq" if autoawq_usable()[0] and not gptqmodel_missing() else "gptqmodel"
    return backend


def _run_autoawq(model: nn.Module, tokenizer: Any, ids: torch.LongTensor, config: AWQConfig):
    from awq import AutoAWQForCausalLM

    work = new_workdir("awq")
    try:
        src = stage_model(model, tokenizer, work / "src")
        dtype = next(model.parameters()).dtype
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
        out_dir = work / "out"
        qmodel.save_quantized(str(out_dir), safetensors=True)
        tokenizer.save_pretrained(out_dir)
        del qmodel
        shutil.rmtree(src, ignore_errors=True)
        out = load_quantized_dir(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return attach_quantized_dir(out, out_dir, work)


class AWQQuantizer:
    """AWQ with AutoAWQ (the package the user named) or GPTQModel's AWQ."""

    name: ClassVar[str] = "awq"
    config_cls: ClassVar[type] = AWQConfig

    def available(self) -> tuple[bool, str]:
        missing = gptqmodel_missing()
        if not missing:
            ok, why = autoawq_usable()
            return True, ("AutoAWQ" if ok else f"GPTQModel's AWQ ({why})") + " will quantize"
        return False, (
            f"{' and '.join(missing)} not installed: AWQ checkpoints reload through GPTQModel's "
            "kernels (and GPTQModel also quantizes AWQ): pip install 'prunekit[gptq]' "
            "(optionally 'prunekit[awq]' for AutoAWQ)"
        )

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: AWQConfig,
    ) -> nn.Module:
        check_divisible(model, config.group_size)
        vocab = model.get_input_embeddings().num_embeddings
        ids = calibration_ids(tokenizer, calib_ids, config.n_samples, config.seq_len, vocab)
        backend = resolve_backend(config.backend)
        if backend == "autoawq":
            ok, why = autoawq_usable()
            if not ok:
                raise QuantizerUnavailableError(
                    self.name, f"{why}; use backend='gptqmodel' or pip install 'prunekit[awq]'"
                )
            out = _run_autoawq(model, tokenizer, ids, config)
        else:
            check_awq_clip_rows(model)
            out = run_gptqmodel(
                model,
                tokenizer,
                ids,
                {
                    "method": "awq",
                    "format": "gemm",
                    "bits": config.bits,
                    "group_size": config.group_size,
                    "sym": config.sym,
                },
                prefix=self.name,
                quant_backend="awq_torch",
                # GPTQModel's AWQ kernels pack and run in 16-bit only; bf16 is the CPU-friendly one.
                dtype=_awq_dtype(model),
            )
        out.__dict__[QUANTIZATION_INFO_ATTR] = {
            "method": self.name,
            "backend": backend,
            "calibration": list(ids.shape),
        }
        return out


def check_awq_clip_rows(model: nn.Module) -> None:
    """GPTQModel's AWQ clip search walks the output rows of every Linear except the query/key
    projections in blocks of 64 and asserts that they divide evenly (it would otherwise fail
    inside a worker thread, taking the whole process down). Refuse such a model up front."""
    from prunekit.plugins import get_adapter

    for i, layer in enumerate(get_adapter(model).layers(model)):
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear) or any(k in name for k in _AWQ_NO_CLIP):
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


#: Linears GPTQModel's AWQ does not clip (its ``avoid_clipping`` list).
_AWQ_NO_CLIP = ("q_", "k_", "query", "key", "Wqkv")
