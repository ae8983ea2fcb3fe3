"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323) through GPTQModel, the maintained successor of
AutoGPTQ (AutoGPTQ is used only where it imports and CUDA is present).

For each Linear with calibration inputs ``X`` GPTQ minimises ``||W X - Q(W) X||²`` one column
at a time: with ``H = 2 X Xᵀ + λI`` (damping ``λ = damp_percent · mean diag H``), column ``j``
is rounded to its group's grid, ``q_j = Q(w_j)``, and the error is spread over the columns
not yet quantized, ``W_{:, j+1:} -= (w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_{j, j+1:}`` (computed from
the Cholesky factor of ``H⁻¹``). Groups of ``group_size`` input columns share a scale (and a
zero point unless ``sym``). Layers are processed in order, each seeing the already-quantized
outputs of the previous ones.

The output directory is GPTQ format (``quantization_config.quant_method = "gptq"``) and loads
with ``AutoModelForCausalLM.from_pretrained`` when ``gptqmodel`` and ``optimum`` are installed
(on CPU through GPTQModel's torch kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.quantize import staged_quantize
from prunekit.quantizers.checks import check_bool
from prunekit.quantizers.gptqmodel_backend import (
    CalibratedConfig,
    GPTQModelQuantizer,
    calibration_examples,
    gptqmodel_missing,
    import_check,
    run_gptqmodel,
)


@dataclass
class GPTQConfig(CalibratedConfig):
    """Settings of the ``gptq`` quantizer."""

    BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "gptqmodel", "auto_gptq")

    bits: int = field(default=4, metadata={"help": "weight bits: 2, 3, 4 or 8"})
    desc_act: bool = field(
        default=False,
        metadata={"help": "quantize columns in decreasing activation order (act-order)"},
    )
    damp_percent: float = field(
        default=0.05, metadata={"help": "Hessian damping as a fraction of its mean diagonal"}
    )
    backend: str = field(
        default="auto",
        metadata={"help": "auto (GPTQModel, else a usable AutoGPTQ), gptqmodel, auto_gptq"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("desc_act", self.desc_act)
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")


def auto_gptq_usable() -> tuple[bool, str]:
    """AutoGPTQ 0.7 does not import with transformers 5 and only quantizes with CUDA."""
    ok, why = import_check("auto_gptq", "auto-gptq")
    if ok and not torch.cuda.is_available():
        return False, "auto-gptq is installed but quantizes only on a CUDA GPU"
    return ok, why


class GPTQQuantizer(GPTQModelQuantizer):
    """GPTQ with GPTQModel (CPU or GPU), or AutoGPTQ where it is usable."""

    name = "gptq"
    config_class = GPTQConfig
    fallback = "auto_gptq"
    install_fallback = "pip install 'prunekit[gptq]'"

    def with_gptqmodel(self) -> str:
        return "gptqmodel and optimum are installed"

    def without_gptqmodel(self, missing: list[str]) -> tuple[bool, str]:
        ok, why = auto_gptq_usable()
        if ok:
            return True, why
        return False, (
            f"{' and '.join(missing)} not installed (needed to quantize and to reload GPTQ "
            f"checkpoints with transformers); {why}. Install: pip install 'prunekit[gptq]'"
        )

    def fallback_usable(self) -> tuple[bool, str]:
        return auto_gptq_usable()

    def resolve_backend(self, backend: str) -> str:
        if backend != "auto":
            return backend
        if not gptqmodel_missing() or not auto_gptq_usable()[0]:
            return "gptqmodel"  # when missing, the error then says what to install
        return "auto_gptq"

    def run_fallback(self, model, tokenizer, ids, config: GPTQConfig) -> nn.Module:
        return _run_auto_gptq(model, tokenizer, ids, config)

    def run_gptqmodel(self, model, tokenizer, ids, config: GPTQConfig) -> nn.Module:
        settings = {
            "method": "gptq",
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
            "desc_act": config.desc_act,
            "damp_percent": config.damp_percent,
        }
        return run_gptqmodel(model, tokenizer, ids, settings, prefix=self.name)


def _run_auto_gptq(model: nn.Module, tokenizer: Any, ids: torch.LongTensor, config: GPTQConfig):
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    def run(src: Path, out: Path) -> None:
        qc = BaseQuantizeConfig(
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            desc_act=config.desc_act,
            damp_percent=config.damp_percent,
        )
        qmodel = AutoGPTQForCausalLM.from_pretrained(str(src), qc)
        qmodel.quantize(calibration_examples(ids), batch_size=1)
        qmodel.save_quantized(str(out), use_safetensors=True)
        tokenizer.save_pretrained(out)

    return staged_quantize(model, tokenizer, "gptq", run)
