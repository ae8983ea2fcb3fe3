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

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.quantizers.base import (
    QUANTIZATION_INFO_ATTR,
    QuantizerUnavailableError,
    attach_quantized_dir,
    calibration_ids,
    check_calibration_counts,
    check_choice,
    check_divisible,
    check_group_size,
    limit_gptqmodel_workers,
    load_quantized_dir,
    module_available,
    new_workdir,
    no_scheme,
    stage_model,
)

GPTQ_BACKENDS = ("auto", "gptqmodel", "auto_gptq")


@dataclass
class GPTQConfig:
    """Settings of the ``gptq`` quantizer."""

    bits: int = field(default=4, metadata={"help": "weight bits: 2, 3, 4 or 8"})
    group_size: int = field(
        default=128, metadata={"help": "input columns per scale (power of two), -1: per channel"}
    )
    sym: bool = field(default=True, metadata={"help": "symmetric grid (no zero point)"})
    desc_act: bool = field(
        default=False,
        metadata={"help": "quantize columns in decreasing activation order (act-order)"},
    )
    damp_percent: float = field(
        default=0.05, metadata={"help": "Hessian damping as a fraction of its mean diagonal"}
    )
    n_samples: int = field(default=64, metadata={"help": "calibration windows used (>= 1)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration window (>= 2)"})
    backend: str = field(
        default="auto",
        metadata={"help": "auto (GPTQModel, else a usable AutoGPTQ), gptqmodel, auto_gptq"},
    )

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (2, 3, 4, 8))
        check_group_size(self.group_size)
        for name in ("sym", "desc_act"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent!r}")
        check_calibration_counts(self.n_samples, self.seq_len)
        check_choice("backend", self.backend, GPTQ_BACKENDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(
        cls, bits: int | None = None, group_size: int | None = None, scheme: str | None = None
    ) -> GPTQConfig:
        """CLI defaults: 4-bit, group size 128."""
        no_scheme("gptq", scheme)
        return cls(bits=4 if bits is None else bits, group_size=group_size or 128)


# ---- backend checks ------------------------------------------------------------------------
def gptqmodel_missing() -> list[str]:
    """Packages missing for quantizing with GPTQModel and reloading through transformers."""
    return module_available("gptqmodel", "optimum")


def auto_gptq_usable() -> tuple[bool, str]:
    """AutoGPTQ 0.7 does not import with transformers 5 and only quantizes with CUDA."""
    if module_available("auto_gptq"):
        return False, "auto-gptq is not installed"
    try:
        import auto_gptq  # noqa: F401
    except Exception as e:  # its import fails in many ways with transformers 5
        return False, f"auto-gptq is installed but does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "auto-gptq is installed but quantizes only on a CUDA GPU"
    return True, "auto-gptq is usable"


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        if not gptqmodel_missing():
            return "gptqmodel"
        if auto_gptq_usable()[0]:
            return "auto_gptq"
        return "gptqmodel"  # the error then says what to install
    return backend


def calibration_examples(ids: torch.LongTensor) -> list[dict[str, torch.Tensor]]:
    """One ``{"input_ids", "attention_mask"}`` example of shape ``[1, seq_len]`` per window."""
    return [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]


# ---- the GPTQModel flow (shared with the awq quantizer) -----------------------------------
def run_gptqmodel(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.LongTensor,
    quantize_config: dict[str, Any],
    *,
    prefix: str,
    quant_backend: str = "auto",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Stage ``model`` in a temporary directory, quantize it with GPTQModel on CPU, save,
    reload with transformers; the saved directory travels with the returned model.
    ``dtype``: the dtype GPTQModel loads and packs in (default: the model's)."""
    missing = gptqmodel_missing()
    if missing:
        raise QuantizerUnavailableError(
            prefix, f"{' and '.join(missing)} not installed: pip install 'prunekit[gptq]'"
        )
    limit_gptqmodel_workers()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.backend import BACKEND

    work = new_workdir(prefix)
    try:
        src = stage_model(model, tokenizer, work / "src")
        qc = QuantizeConfig(**quantize_config, offload_to_disk=False, device="cpu")
        dtype = dtype or next(model.parameters()).dtype
        qmodel = GPTQModel.load(str(src), qc, dtype=dtype)
        calib = calibration_examples(ids)
        qmodel.quantize(
            calib,
            batch_size=1,
            backend=BACKEND(quant_backend) if quant_backend != "auto" else BACKEND.AUTO,
            calibration_data_min_length=min(10, ids.shape[1]),
        )
        qmodel.save(str(work / "out"))
        del qmodel
        shutil.rmtree(src, ignore_errors=True)
        out = load_quantized_dir(work / "out")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return attach_quantized_dir(out, work / "out", work)


def _run_auto_gptq(model: nn.Module, tokenizer: Any, ids: torch.LongTensor, config: GPTQConfig):
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    work = new_workdir("gptq")
    try:
        src = stage_model(model, tokenizer, work / "src")
        qc = BaseQuantizeConfig(
            bits=config.bits,
            group_size=config.group_size,
            sym=config.sym,
            desc_act=config.desc_act,
            damp_percent=config.damp_percent,
        )
        qmodel = AutoGPTQForCausalLM.from_pretrained(str(src), qc)
        calib = calibration_examples(ids)
        qmodel.quantize(calib, batch_size=1)
        out_dir = work / "out"
        qmodel.save_quantized(str(out_dir), use_safetensors=True)
        tokenizer.save_pretrained(out_dir)
        del qmodel
        shutil.rmtree(src, ignore_errors=True)
        out = load_quantized_dir(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return attach_quantized_dir(out, Path(out_dir), work)


class GPTQQuantizer:
    """GPTQ with GPTQModel (CPU or GPU), or AutoGPTQ where it is usable."""

    name: ClassVar[str] = "gptq"
    config_cls: ClassVar[type] = GPTQConfig

    def available(self) -> tuple[bool, str]:
        missing = gptqmodel_missing()
        if not missing:
            return True, "gptqmodel and optimum are installed"
        ok, why = auto_gptq_usable()
        if ok:
            return True, why
        return False, (
            f"{' and '.join(missing)} not installed (needed to quantize and to reload GPTQ "
            f"checkpoints with transformers); {why}. Install: pip install 'prunekit[gptq]'"
        )

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: GPTQConfig,
    ) -> nn.Module:
        check_divisible(model, config.group_size)
        vocab = model.get_input_embeddings().num_embeddings
        ids = calibration_ids(tokenizer, calib_ids, config.n_samples, config.seq_len, vocab)
        backend = resolve_backend(config.backend)
        if backend == "auto_gptq":
            ok, why = auto_gptq_usable()
            if not ok:
                raise QuantizerUnavailableError(
                    self.name, f"{why}; use backend='gptqmodel' (pip install 'prunekit[gptq]')"
                )
            out = _run_auto_gptq(model, tokenizer, ids, config)
        else:
            out = run_gptqmodel(
                model,
                tokenizer,
                ids,
                {
                    "method": "gptq",
                    "bits": config.bits,
                    "group_size": config.group_size,
                    "sym": config.sym,
                    "desc_act": config.desc_act,
                    "damp_percent": config.damp_percent,
                },
                prefix=self.name,
            )
        out.__dict__[QUANTIZATION_INFO_ATTR] = {
            "method": self.name,
            "backend": backend,
            "calibration": list(ids.shape),
        }
        return out
