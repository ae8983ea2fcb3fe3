"""The quantization engine: quantize a pruned (and recovered) model with a quantizer plugin
object, and save the result with its ``prunekit.json`` sidecar.

Order matters: prune -> recover -> quantize. Packed low-bit weights cannot be sliced, so
:func:`prunekit.apply_plan` refuses a quantized model and a quantizer only ever sees the final
(pruned, recovered) shapes.

A quantizer (registered through ``register_quantizers``) implements the plugin contract of
:mod:`prunekit.contracts` plus one method:

- ``name``, ``config_class`` (a dataclass of its options), ``available() -> (ok, why)``;
- ``quantize(model, tokenizer, calib_ids, config) -> model``: a new quantized model (the
  input model is left as it was) that :func:`save_quantized` writes and
  ``transformers.AutoModelForCausalLM.from_pretrained`` reloads;
- optionally ``options_from_flags(bits, group_size, scheme) -> dict``: how the CLI's
  ``--quant-bits`` / ``--quant-group-size`` / ``--quant-scheme`` map onto its options
  (without it, each flag sets the config field of the same name);
- optionally ``uses_group_size(config) -> bool``: whether a config with a ``group_size``
  field quantizes in groups (default True; torchao: ``int4_grouped`` only). The engine fits
  ``group_size`` to the model before ``quantize`` is called (None: the largest of 128, 64, 32
  dividing every quantized input width; an explicit size must divide them,
  :mod:`prunekit.core.quant_groups`), so ``quantize`` always sees an integer.

A name is resolved to the quantizer object once, at the edge (:func:`get_quantizer`); the
engine takes the object::

    quantizer = get_quantizer("torchao")
    config = quantizer_config(quantizer, {"scheme": "int8_dynamic"})
    quantized = quantize(model, tokenizer, quantizer, config)
    save_quantized(quantized, "out", tokenizer)

Backends that only quantize from a directory (GPTQModel, AutoAWQ) get the pruned model staged
in a private temporary directory (:func:`stage_model`); their output directory is kept with
the returned model (:func:`attach_quantized_dir`) and :func:`save_quantized` copies it byte for
byte, because re-serialising a loaded GPTQ model through transformers is not lossless (its
in-memory zero-points are GPTQModel's internal v2 format).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from prunekit.contracts import build_config, option_fields
from prunekit.core.calibration import load_calibration
from prunekit.core.io import AtomicDir, build_sidecar, weights_size_mb, write_sidecar
from prunekit.core.quant_groups import (
    GroupSizeError,
    GroupSizeFit,
    fit_config,
    fit_group_size,
    model_widths,
)
from prunekit.core.quant_marks import (
    QUANTIZATION_INFO_ATTR,
    QUANTIZED_DIR_ATTR,
    QuantizationError,
    is_quantized,
)
from prunekit.core.surgery import PLANS_ATTR, applied_plans
from prunekit.errors import PluginUnavailableError
from prunekit.plugins import get_adapter, get_plugins
from prunekit.versions import versions

#: tokenizer files a backend writes next to its weights (replaced by the caller's tokenizer)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
#: the CLI flags :func:`options_from_flags` maps onto quantizer options
QUANT_FLAGS = {
    "bits": "--quant-bits",
    "group_size": "--quant-group-size",
    "scheme": "--quant-scheme",
}


# ---- errors ------------------------------------------------------------------------------
class QuantizerUnavailableError(PluginUnavailableError, ImportError):
    """A quantizer's backend package is not installed (or not usable on this machine)."""

    def __init__(self, quantizer: str, reason: str):
        self.quantizer = quantizer
        self.reason = reason
        super().__init__("quantizer", quantizer, reason)


# ---- the contract ------------------------------------------------------------------------
@runtime_checkable
class Quantizer(Protocol):
    """What ``register_quantizers`` expects (see the module docstring)."""

    name: str
    config_class: type

    def available(self) -> tuple[bool, str]: ...

    def quantize(
        self,
        model: nn.Module,
        tokenizer: Any,
        calib_ids: torch.LongTensor | None,
        config: Any,
    ) -> nn.Module: ...


def get_quantizer(name: str) -> Quantizer:
    """The registered quantizer ``name`` (the edge where a name becomes an object); an
    unknown name raises :class:`prunekit.RegistryError` listing the valid ones."""
    return get_plugins().quantizers.get(name)


def options_from_flags(
    quantizer: Any,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str | None = None,
) -> dict[str, Any]:
    """The options the CLI flags ``--quant-bits/--quant-group-size/--quant-scheme`` stand
    for (``None``: flag not given). A quantizer with its own ``options_from_flags`` method
    decides (torchao: ``bits=4`` means scheme ``int4_grouped``); otherwise each flag given sets
    the config field of the same name, and a flag without such a field raises ``ValueError``."""
    own = getattr(quantizer, "options_from_flags", None)
    if own is not None:
        return dict(own(bits=bits, group_size=group_size, scheme=scheme))
    given = {"bits": bits, "group_size": group_size, "scheme": scheme}
    fields = option_fields(quantizer.config_class)
    out = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in fields:
            raise ValueError(
                f"{QUANT_FLAGS[key]} ({key}) is not an option of quantizer {quantizer.name!r}; "
                f"its options: {', '.join(sorted(fields)) or '(none)'} (--quant-opt key=value)"
            )
        out[key] = value
    return out


def quantizer_config(
    quantizer: Any,
    options: Mapping[str, Any] | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str | None = None,
    section: str = "quantize.options",
) -> Any:
    """``quantizer``'s validated config: the CLI flags (:func:`options_from_flags`), then
    ``options`` (the recipe's ``quantize.options`` / ``--quant-opt key=value``) on top.
    Errors name the field (``ValueError``) or list the valid options."""
    merged = {**options_from_flags(quantizer, bits, group_size, scheme), **dict(options or {})}
    return build_config(quantizer, merged, section=section)


# ---- checks ------------------------------------------------------------------------------
def check_quantizable(model: nn.Module) -> None:
    """Refuse a model that is already quantized or has per-layer shapes, before any work."""
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


def check_divisible(model: nn.Module, group_size: int | None) -> int:
    """The group size to use on ``model``: every Linear in the decoder layers must have an
    input width that is a multiple of it. ``None`` (the default): the largest of 128, 64, 32
    that divides them all; ``-1`` (one group per output channel) always fits; an explicit
    size that does not divide a width is refused naming the width and the size that fits
    (:func:`prunekit.core.quant_groups.fit_group_size`)."""
    return fit_group_size(group_size, model_widths(model)).used


def missing_modules(*modules: str) -> list[str]:
    """Those of ``modules`` that are NOT installed (found without importing them)."""
    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(m)
    return missing


# ---- the engine --------------------------------------------------------------------------
def quantize(
    model: nn.Module,
    tokenizer: Any,
    quantizer: Quantizer,
    config: Any = None,
    calib_ids: torch.LongTensor | None = None,
) -> nn.Module:
    """Quantize a pruned (and recovered) ``model`` with the ``quantizer`` object (see
    :func:`get_quantizer`).

    ``config``: an instance of ``quantizer.config_class``, a mapping of its options, or
    ``None`` for its defaults. ``calib_ids`` (``[n, seq_len]`` token ids, e.g. the pruning
    calibration windows) feeds AWQ/GPTQ; without it, Brown windows are drawn (see
    :func:`calibration_ids`). Returns a new model; ``model`` itself is not modified.
    """
    if isinstance(quantizer, str):
        raise TypeError(
            f"quantize() takes the quantizer object, got the name {quantizer!r}; resolve it "
            f"once with get_quantizer({quantizer!r})"
        )
    config = build_config(quantizer, config, section=f"{quantizer.name} config")
    ok, reason = quantizer.available()
    if not ok:
        raise QuantizerUnavailableError(quantizer.name, reason)
    check_quantizable(model)
    config, fit = group_size_fit(model, quantizer, config)
    plans = applied_plans(model)
    out = quantizer.quantize(model, tokenizer, calib_ids, config)
    setattr(out, PLANS_ATTR, plans)
    info = out.__dict__.setdefault(QUANTIZATION_INFO_ATTR, {})
    info.setdefault("method", quantizer.name)
    info["config"] = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    if fit is not None:
        info["group_size"] = fit.to_dict()
    return out.eval()


def group_size_fit(
    model: nn.Module, quantizer: Quantizer, config: Any = None
) -> tuple[Any, GroupSizeFit | None]:
    """``quantizer``'s ``config`` with the group size that fits ``model`` (see
    :mod:`prunekit.core.quant_groups`), and the fit (``fit.note`` says what and why; None
    when the config does not quantize in groups)."""
    config = build_config(quantizer, config, section=f"{quantizer.name} config")
    return fit_config(quantizer, config, model_widths(model))


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
    """Write ``model`` (safetensors) and ``tokenizer`` where a backend can load them."""
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


def staged_quantize(
    model: nn.Module,
    tokenizer: Any,
    prefix: str,
    run: Callable[[Path, Path], None],
) -> nn.Module:
    """The flow of a backend that quantizes from a directory: stage ``model`` and
    ``tokenizer`` in a private directory ``src``, call ``run(src, out)`` (the backend loads
    ``src`` and writes its quantized checkpoint, with a tokenizer, to ``out``), reload ``out``
    with stock transformers and return it with ``out`` attached (see
    :func:`save_quantized`). Nothing is left behind on failure."""
    work = new_workdir(prefix)
    out_dir = work / "out"
    try:
        src = stage_model(model, tokenizer, work / "src")
        run(src, out_dir)
        shutil.rmtree(src, ignore_errors=True)
        out = load_quantized_dir(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return attach_quantized_dir(out, out_dir, work)


# ---- saving --------------------------------------------------------------------------------
def save_quantized(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write a quantized model that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads
    (with the backend installed), plus the tokenizer and the ``prunekit.json`` sidecar
    (:func:`prunekit.core.io.build_sidecar`, with a ``quantization`` entry and ``extra``; a
    callable ``extra`` is called with the directory once the weights are in it).

    A non-empty ``out_dir`` is refused unless ``overwrite=True``; everything is written to a
    temporary sibling and moved into place only when complete.
    """
    if not is_quantized(model):
        raise QuantizationError(
            "the model is not quantized; quantize it first (prunekit.core.quantize.quantize) "
            "or save it with prunekit.save_pretrained"
        )
    adapter = get_adapter(model)
    staged = model.__dict__.get(QUANTIZED_DIR_ATTR)
    with AtomicDir(out_dir, overwrite, inputs=(model,)) as tmp:
        if staged is not None:
            copy_files(Path(staged), tmp, skip=TOKENIZER_FILES if tokenizer else ())
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        quantization = {
            **model.__dict__.get(QUANTIZATION_INFO_ATTR, {}),
            "quant_method": _quant_method(getattr(model.config, "quantization_config", None)),
            "size_on_disk_mb": round(weights_size_mb(tmp) or 0.0, 3),
        }
        sidecar = build_sidecar(
            model,
            # packed weights: read the shapes from the config, not the modules
            shapes=adapter.config_shapes(model.config),
            extra={
                "versions": {**versions(), **backend_versions()},
                "quantization": quantization,
                **(extra(tmp) if callable(extra) else extra or {}),
            },
        )
        write_sidecar(tmp, sidecar)
    return Path(out_dir)


def _quant_method(qc: Any) -> str | None:
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def copy_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Copy the files and folders of ``src`` into ``dst``, except the names in ``skip``."""
    skipped = set(skip)
    for item in src.iterdir():
        if item.name in skipped:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)


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


__all__ = [
    "GroupSizeError",
    "GroupSizeFit",
    "QUANTIZATION_INFO_ATTR",
    "QUANTIZED_DIR_ATTR",
    "QuantizationError",
    "Quantizer",
    "QuantizerUnavailableError",
    "attach_quantized_dir",
    "calibration_ids",
    "check_divisible",
    "check_quantizable",
    "get_quantizer",
    "group_size_fit",
    "is_quantized",
    "load_quantized_dir",
    "missing_modules",
    "new_workdir",
    "options_from_flags",
    "quantize",
    "quantizer_config",
    "save_quantized",
    "stage_model",
    "staged_quantize",
]
