"""What the ``gptq`` and ``awq`` quantizers share: GPTQModel (the maintained successor of
AutoGPTQ, which quantizes GPTQ and AWQ on CPU and whose kernels let transformers reload both
formats), the calibrated config fields, and the quantize flow (check, calibrate, pick a
backend, run it from a staged directory, record what ran).

Each quantizer says only what differs: its config, its fallback backend (AutoGPTQ / AutoAWQ)
and the GPTQModel settings of its method.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.core.quantize import (
    QUANTIZATION_INFO_ATTR,
    QuantizerUnavailableError,
    calibration_ids,
    check_divisible,
    missing_modules,
    staged_quantize,
)
from prunekit.quantizers.checks import (
    check_bool,
    check_calibration_counts,
    check_choice,
    check_group_size,
)


# ---- the config fields both methods have ---------------------------------------------------
@dataclass
class CalibratedConfig:
    """Options of a calibrated weight quantizer run through GPTQModel (or its fallback)."""

    BITS: ClassVar[tuple[int, ...]] = (4,)
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "gptqmodel")

    bits: int = field(default=4, metadata={"help": "weight bits"})
    group_size: int | None = field(
        default=None,
        metadata={
            "help": "input columns per scale (power of two), -1: per channel; None: the "
            "largest of 128, 64, 32 dividing every quantized input width (after pruning)"
        },
    )
    sym: bool = field(default=True, metadata={"help": "symmetric grid (no zero point)"})
    n_samples: int = field(default=64, metadata={"help": "calibration windows used (>= 1)"})
    seq_len: int = field(default=512, metadata={"help": "tokens per calibration window (>= 2)"})
    backend: str = field(default="auto", metadata={"help": "auto, or the backend to use"})

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, self.BITS)
        check_group_size(self.group_size)
        check_bool("sym", self.sym)
        check_calibration_counts(self.n_samples, self.seq_len)
        check_choice("backend", self.backend, self.BACKENDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- GPTQModel -----------------------------------------------------------------------------
def gptqmodel_missing() -> list[str]:
    """Packages missing for quantizing with GPTQModel and reloading through transformers."""
    return missing_modules("gptqmodel", "optimum")


def import_check(module: str, dist: str, why_it_may_fail: str = "") -> tuple[bool, str]:
    """``(ok, why)``: whether ``module`` (PyPI ``dist``) is installed and imports."""
    if missing_modules(module):
        return False, f"{dist} is not installed"
    try:
        __import__(module)
    except Exception as e:  # deprecated backends break on import in many ways
        return False, f"{dist} is installed but does not import ({type(e).__name__}: {e})"
    return True, f"{dist} imports"


def cpu_workers() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def limit_gptqmodel_workers() -> None:
    """GPTQModel starts ``GPTQMODEL_CPU_WORKERS`` threads per CPU at import; more than the
    cores only thrashes. Set it (before the first import) to at most the core count."""
    cores = cpu_workers()
    current = os.environ.get("GPTQMODEL_CPU_WORKERS")
    try:
        too_many = current is not None and int(current) > cores
    except ValueError:
        too_many = True
    if current is None or too_many:
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(cores)


def calibration_examples(ids: torch.LongTensor) -> list[dict[str, torch.Tensor]]:
    """One ``{"input_ids", "attention_mask"}`` example of shape ``[1, seq_len]`` per window."""
    return [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in ids]


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
    """Quantize ``model`` with GPTQModel from a staged directory, on the model's device (CPU or
    a CUDA device), and reload the result with transformers
    (:func:`prunekit.core.quantize.staged_quantize`). ``quantize_config``: GPTQModel
    ``QuantizeConfig`` fields; ``dtype``: the dtype GPTQModel loads and packs in (default: the
    model's)."""
    missing = gptqmodel_missing()
    if missing:
        raise QuantizerUnavailableError(
            prefix, f"{' and '.join(missing)} not installed: pip install 'prunekit[gptq]'"
        )
    limit_gptqmodel_workers()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.utils.backend import BACKEND

    dtype = dtype or next(model.parameters()).dtype
    where = next(model.parameters()).device
    device = "cpu" if where.type == "cpu" else f"{where.type}:{where.index or 0}"

    def run(src: Path, out: Path) -> None:
        qc = QuantizeConfig(**quantize_config, offload_to_disk=False, device=device)
        qmodel = GPTQModel.load(str(src), qc, dtype=dtype)
        qmodel.quantize(
            calibration_examples(ids),
            batch_size=1,
            backend=BACKEND(quant_backend) if quant_backend != "auto" else BACKEND.AUTO,
            calibration_data_min_length=min(10, ids.shape[1]),
        )
        qmodel.save(str(out))

    return staged_quantize(model, tokenizer, prefix, run)


# ---- the shared quantizer flow -------------------------------------------------------------
class GPTQModelQuantizer:
    """Base of ``gptq`` and ``awq``. Subclasses set ``name``, ``config_class`` and
    ``fallback`` (the other backend's name) and implement :meth:`resolve_backend`,
    :meth:`fallback_usable`, :meth:`run_fallback` and :meth:`gptqmodel_settings`."""

    name: ClassVar[str]
    config_class: ClassVar[type[CalibratedConfig]]
    fallback: ClassVar[str]
    install_fallback: ClassVar[str]

    def options_from_flags(
        self, bits: int | None = None, group_size: int | None = None, scheme: str | None = None
    ) -> dict[str, Any]:
        """``--quant-bits`` / ``--quant-group-size`` set the fields of the same name;
        ``--quant-scheme`` is torchao's and is refused."""
        if scheme is not None:
            raise ValueError(
                f"scheme {scheme!r} (--quant-scheme) only applies to the torchao quantizer; "
                f"{self.name} is configured with bits and group_size"
            )
        return {k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None}

    def available(self) -> tuple[bool, str]:
        missing = gptqmodel_missing()
        if not missing:
            return True, self.with_gptqmodel()
        return self.without_gptqmodel(missing)

    def with_gptqmodel(self) -> str:
        """What will quantize when GPTQModel is installed."""
        raise NotImplementedError

    def without_gptqmodel(self, missing: list[str]) -> tuple[bool, str]:
        """``available()`` when ``missing`` (GPTQModel's packages) are not installed."""
        raise NotImplementedError

    def fallback_usable(self) -> tuple[bool, str]:
        raise NotImplementedError

    def resolve_backend(self, backend: str) -> str:
        raise NotImplementedError

    def run_fallback(self, model, tokenizer, ids, config) -> nn.Module:
        raise NotImplementedError

    def run_gptqmodel(self, model, tokenizer, ids, config) -> nn.Module:
        raise NotImplementedError

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: CalibratedConfig,
    ) -> nn.Module:
        config = replace(config, group_size=check_divisible(model, config.group_size))
        vocab = model.get_input_embeddings().num_embeddings
        ids = calibration_ids(tokenizer, calib_ids, config.n_samples, config.seq_len, vocab)
        backend = self.resolve_backend(config.backend)
        if backend == self.fallback:
            ok, why = self.fallback_usable()
            if not ok:
                raise QuantizerUnavailableError(
                    self.name, f"{why}; use backend='gptqmodel' or {self.install_fallback}"
                )
            out = self.run_fallback(model, tokenizer, ids, config)
        else:
            out = self.run_gptqmodel(model, tokenizer, ids, config)
        out.__dict__[QUANTIZATION_INFO_ATTR] = {
            "method": self.name,
            "backend": backend,
            "calibration": list(ids.shape),
        }
        return out


__all__ = [
    "CalibratedConfig",
    "GPTQModelQuantizer",
    "calibration_examples",
    "cpu_workers",
    "gptqmodel_missing",
    "import_check",
    "limit_gptqmodel_workers",
    "run_gptqmodel",
]
