"""Quantization after pruning: the quantizer contract, lookup, calibration and saving.

Order matters: prune -> recover -> quantize. Packed low-bit weights cannot be sliced, so
:func:`prunekit.apply_plan` refuses a quantized model and a quantizer only ever sees the final
(pruned, recovered) shapes.

A quantizer is an object with

- ``name`` (``"awq"``, ``"gptq"``, ``"torchao"``) and ``config_cls`` (a dataclass validated
  in ``__post_init__``, with a ``from_args(bits, group_size, scheme)`` classmethod),
- ``available() -> (ok, reason)``: whether its backend is importable, and what to install,
- ``quantize(model, tokenizer, calib_ids, config) -> model``: a new quantized model (the
  input model is left as it was) that :func:`save_quantized` writes and
  ``transformers.AutoModelForCausalLM.from_pretrained`` reloads.

Backends that only quantize from a directory (GPTQModel, AutoAWQ) get the pruned model staged
in a private temporary directory; their output directory is kept with the returned model
(``model._prunekit_quantized_dir``) and :func:`save_quantized` copies it byte for byte,
because re-serialising a loaded GPTQ model through transformers is not lossless (its
in-memory zero-points are GPTQModel's internal v2 format).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prunekit.core.surgery import PLANS_ATTR, applied_plans
from prunekit.errors import PrunekitError

QUANTIZED_DIR_ATTR = "_prunekit_quantized_dir"
QUANTIZATION_INFO_ATTR = "_prunekit_quantization"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


# ---- errors ------------------------------------------------------------------------------
class QuantizerUnavailableError(PrunekitError, ImportError):
    """A quantizer's backend package is not installed (or not usable on this machine)."""

    def __init__(self, quantizer: str, reason: str):
        self.quantizer = quantizer
        self.reason = reason
        super().__init__(f"quantizer {quantizer!r} is not available: {reason}")


class QuantizationError(PrunekitError, ValueError):
    """A model cannot be quantized as asked (already quantized, per-layer shapes, bad data)."""


# ---- the contract ------------------------------------------------------------------------
@runtime_checkable
class Quantizer(Protocol):
    """What ``register_quantizers`` expects (see the module docstring)."""

    name: str
    config_cls: type

    def available(self) -> tuple[bool, str]: ...

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: Any,
    ) -> nn.Module: ...


def get_quantizer(name: str) -> Quantizer:
    """The registered quantizer ``name``; an unknown name raises
    :class:`prunekit.RegistryError` listing the valid ones."""
    from prunekit.plugins import get_plugins

    return get_plugins().quantizers.get(name)


def quantizer_config_from_args(
    name: str,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str | None = None,
) -> Any:
    """Build ``name``'s config from CLI-style overrides; ``None`` keeps the default.

    Defaults: ``awq`` and ``gptq`` 4-bit, group size 128; ``torchao`` ``int8_weight_only``
    (``bits=4`` alone selects ``int4_grouped``). Inconsistent combinations raise
    ``ValueError`` naming the option (``--quant-scheme`` only applies to torchao, ...).
    """
    quantizer = get_quantizer(name)
    return quantizer.config_cls.from_args(bits=bits, group_size=group_size, scheme=scheme)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` carries any quantization mark transformers or a backend sets:
    ``hf_quantizer``, ``is_quantized``, ``config.quantization_config``, prunekit's staged
    directory, or a torchao tensor subclass as a weight."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return True
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return True
    if model.__dict__.get(QUANTIZED_DIR_ATTR) is not None:
        return True
    # torchao swaps weights for tensor subclasses (still reported as Parameters).
    return any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())


def quantize(
    model: nn.Module,
    tokenizer: Any,
    name: str,
    config: Any = None,
    calib_ids: torch.LongTensor | None = None,
) -> nn.Module:
    """Quantize a pruned (and recovered) ``model`` with quantizer ``name``.

    ``config`` defaults to ``quantizer_config_from_args(name)``; it may also be a dict of
    config fields. ``calib_ids`` (``[n, seq_len]`` token ids, e.g. the pruning calibration
    windows) feeds AWQ/GPTQ; without it, Brown windows are drawn with the config's
    ``n_samples``/``seq_len`` through :func:`prunekit.core.calibration.load_calibration`.
    Returns a new model; ``model`` itself is not modified.
    """
    quantizer = get_quantizer(name)
    if config is None:
        config = quantizer.config_cls()
    elif isinstance(config, dict):
        config = quantizer.config_cls(**config)
    elif not isinstance(config, quantizer.config_cls):
        raise TypeError(
            f"config for quantizer {name!r} must be a {quantizer.config_cls.__name__}, got "
            f"{type(config).__name__}; build one with quantizer_config_from_args({name!r}, ...)"
        )
    ok, reason = quantizer.available()
    if not ok:
        raise QuantizerUnavailableError(name, reason)
    check_quantizable(model)
    plans = applied_plans(model)
    out = quantizer.quantize(model, tokenizer, calib_ids, config)
    setattr(out, PLANS_ATTR, plans)
    info = out.__dict__.setdefault(QUANTIZATION_INFO_ATTR, {})
    info.setdefault("method", name)
    info["config"] = config.to_dict()
    return out.eval()


def check_quantizable(model: nn.Module) -> None:
    """Refuse a model that is already quantized or has per-layer shapes, before any work."""
    from prunekit.plugins import get_adapter

    get_adapter(model)  # an unsupported architecture fails here, with the list of adapters
    if is_quantized(model):
        raise QuantizationError(
            "the model is already quantized; quantize the unquantized (pruned, recovered) "
            "model once, as the last step"
        )
    if getattr(model.config, "is_heterogeneous", False):
        raise QuantizationError(
            "the model has per-layer shapes (per_layer_config), which the quantization "
            "backends and stock from_pretrained cannot load; prune uniformly (the same head "
            "and neuron counts in every layer) to quantize, or save it unquantized"
        )
    if any(p.is_meta for p in model.parameters()):
        raise QuantizationError("the model has parameters on the meta device; load its weights")


# ---- calibration ---------------------------------------------------------------------------
def calibration_ids(
    tokenizer: Any,
    calib_ids: torch.LongTensor | None,
    n_samples: int,
    seq_len: int,
    vocab_size: int | None = None,
) -> torch.LongTensor:
    """``[n, seq_len]`` token ids for AWQ/GPTQ calibration.

    Given ``calib_ids`` (the pruning calibration windows), keep the first ``n_samples`` rows
    and ``seq_len`` columns; otherwise draw Brown windows (the pruning default source).
    """
    if calib_ids is None:
        from prunekit.core.calibration import load_calibration

        ids = load_calibration(None, tokenizer, n_samples=n_samples, seq_len=seq_len)
    else:
        ids = torch.as_tensor(calib_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise QuantizationError(
                f"calib_ids must be integer token ids of shape [n, seq_len], got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        ids = ids[:n_samples, :seq_len].long()
    if ids.shape[1] < 2:
        raise QuantizationError(f"calibration windows hold {ids.shape[1]} token(s); need >= 2")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise QuantizationError(
            f"calibration ids reach {int(ids.max())} but the model's vocabulary has "
            f"{vocab_size} entries; tokenise the calibration text with the model's tokenizer"
        )
    return ids.cpu()


# ---- staging for directory-based backends --------------------------------------------------
def stage_model(model: nn.Module, tokenizer: Any, directory: Path) -> Path:
    """Write ``model`` (safetensors) and ``tokenizer`` where GPTQModel/AutoAWQ can load them."""
    if tokenizer is None:
        raise QuantizationError(
            "this backend loads the model with its tokenizer; pass the tokenizer (the model "
            "directory must hold one)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def new_workdir(prefix: str) -> Path:
    """A private temporary directory (``$PRUNEKIT_TMP`` or the system default)."""
    base = os.environ.get("PRUNEKIT_TMP") or None
    return Path(tempfile.mkdtemp(prefix=f"prunekit-{prefix}-", dir=base))


def attach_quantized_dir(model: nn.Module, directory: Path, workdir: Path) -> nn.Module:
    """Remember the backend's saved output on ``model``; ``workdir`` is removed with it."""
    model.__dict__[QUANTIZED_DIR_ATTR] = Path(directory)
    weakref.finalize(model, shutil.rmtree, str(workdir), True)
    return model


def load_quantized_dir(directory: Path) -> nn.Module:
    """Reload a backend's output the way users will: stock ``from_pretrained`` on CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, device_map="cpu").eval()


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


# ---- saving --------------------------------------------------------------------------------
def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized model that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads
    (with the backend installed), plus the tokenizer and the ``prunekit.json`` sidecar.

    A non-empty ``out_dir`` is refused unless ``overwrite=True``; everything is written to a
    temporary sibling and moved into place only when complete.
    """
    from prunekit.core.io import FORMAT_VERSION, SIDECAR, AtomicDir
    from prunekit.plugins import get_adapter
    from prunekit.versions import versions

    if not is_quantized(model):
        raise QuantizationError(
            "the model is not quantized; quantize it first (prunekit.quantizers.quantize) or "
            "save it with prunekit.save_pretrained"
        )
    adapter = get_adapter(model)
    staged = model.__dict__.get(QUANTIZED_DIR_ATTR)
    with AtomicDir(out_dir, overwrite) as tmp:
        if staged is not None:
            _copy_files(Path(staged), tmp, skip=_TOKENIZER_FILES if tokenizer else ())
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = dict(model.__dict__.get(QUANTIZATION_INFO_ATTR, {}))
        qc = getattr(model.config, "quantization_config", None)
        sidecar = {
            "format": FORMAT_VERSION,
            "layout": "uniform",
            "adapter": adapter.name,
            "model_type": model.config.model_type,
            "layer_shapes": [s.to_dict() for s in adapter.config_shapes(model.config)],
            "plans": [p.to_dict() for p in applied_plans(model)],
            "versions": {**versions(), **backend_versions()},
            "quantization": {
                **info,
                "quant_method": _quant_method(qc),
                "size_on_disk_mb": round(dir_size_mb(tmp), 3),
            },
            **(extra or {}),
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
    return Path(out_dir)


def _quant_method(qc: Any) -> str | None:
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def _copy_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    skipped = set(skip)
    for item in src.iterdir():
        if item.name in skipped:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


def dir_size_mb(path: str | Path) -> float:
    """Size on disk of the files under ``path`` in MiB (apparent size of regular files)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def backend_versions() -> dict[str, str]:
    """Installed versions of the quantization backends (for the sidecar)."""
    from importlib import metadata

    out = {}
    for dist in ("torchao", "gptqmodel", "optimum", "autoawq", "auto-gptq"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def module_available(*modules: str) -> list[str]:
    """Those of ``modules`` that are NOT installed (found without importing them)."""
    import importlib.util

    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(m)
    return missing


def check_choice(field_name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise ValueError(f"{field_name} must be one of {choices}; got {value!r}")


def check_group_size(group_size: int, field_name: str = "group_size") -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"{field_name} must be an integer, got {group_size!r}")
    if group_size != -1 and (group_size < 8 or group_size & (group_size - 1)):
        raise ValueError(
            f"{field_name} must be -1 (one group per output channel) or a power of two >= 8 "
            f"(32, 64, 128...), got {group_size}"
        )


def check_calibration_counts(n_samples: int, seq_len: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def no_scheme(name: str, scheme: str | None) -> None:
    if scheme is not None:
        raise ValueError(
            f"scheme {scheme!r} (--quant-scheme) only applies to the torchao quantizer; "
            f"{name} is configured with bits and group_size"
        )


def check_divisible(model: nn.Module, group_size: int) -> None:
    """Every quantized Linear's input width must be a multiple of ``group_size``."""
    if group_size == -1:
        return
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and module.in_features % group_size:
                raise QuantizationError(
                    f"layer {i} {name} has {module.in_features} input features, not a multiple "
                    f"of group_size {group_size}; choose a group size dividing it (e.g. "
                    f"{_largest_pow2_divisor(module.in_features)}) or prune to multiples of "
                    f"{group_size}"
                )


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


__all__ = [
    "QuantizationError",
    "Quantizer",
    "QuantizerUnavailableError",
    "calibration_ids",
    "check_quantizable",
    "dir_size_mb",
    "get_quantizer",
    "is_quantized",
    "quantize",
    "quantizer_config_from_args",
    "save_quantized",
]
