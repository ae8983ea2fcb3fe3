"""Where a model runs and in which dtype: ``device`` (``auto|cpu|cuda|cuda:N``), ``dtype``
(``auto|bfloat16|float16|float32``) and ``device_map`` / ``max_memory`` (accelerate), checked
before any work so that a bad value is a clear error, not a crash half way through.

``dtype="auto"`` is the checkpoint's own dtype (the dtype most of its safetensors bytes are
stored in, else ``config.json``'s ``dtype``); a dequantised GGUF model is float32 unless asked.
Statistics and scores always accumulate in float32 whatever the model dtype (see
:func:`stat_dtype`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunekit.core.checkpoint import checkpoint_dtype
from prunekit.errors import DeviceError

DEVICE_HELP = "auto|cpu|cuda|cuda:N (auto: CUDA when available)"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DTYPE_HELP = "auto|bfloat16|float16|float32 (auto: the checkpoint's own dtype)"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` / ``"auto"``: ``cuda`` when available,
    else ``cpu``. Raises :class:`DeviceError` for an unknown device or CUDA asked for on a
    machine without it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError("device", device, f"unknown device; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError("device", device, f"unsupported device type; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise DeviceError(
            "device", device, "CUDA was asked for but this machine has none; use --device cpu"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(
            "device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def resolve_dtype(
    dtype: str | torch.dtype | None, source: str | Path | None = None, *, gguf: bool = False
) -> torch.dtype:
    """``dtype`` as a :class:`torch.dtype`. ``None`` / ``"auto"``: the checkpoint's own dtype
    when ``source`` is a local model directory, float32 for a GGUF file (``gguf=True``) or when
    nothing says otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if gguf or source is None or not Path(source).is_dir():
            return torch.float32
        return checkpoint_dtype(source)
    if dtype not in DTYPE_CHOICES:
        raise DeviceError("dtype", dtype, f"unknown dtype; use {DTYPE_HELP}")
    return getattr(torch, dtype)


def check_device_map(device_map: Any, max_memory: dict[Any, Any] | None) -> None:
    """Fail early on a ``device_map`` / ``max_memory`` accelerate would reject later."""
    if device_map is None:
        if max_memory:
            raise DeviceError("max_memory", max_memory, "needs --device-map auto")
        return
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
        raise DeviceError("device_map", device_map, "use auto, balanced or sequential")
    for key in max_memory or {}:
        if key not in ("cpu", "disk") and not str(key).isdigit():
            raise DeviceError("max_memory", key, "keys are GPU indices, 'cpu' or 'disk'")
        if str(key).isdigit():
            resolve_device(f"cuda:{key}")


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """``"0=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", "cpu": "60GiB"}`` (the CLI's ``--max-memory``)."""
    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise DeviceError("max_memory", part, "write DEVICE=SIZE, e.g. 0=20GiB,cpu=60GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the input device of a dispatched model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def stat_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is a 16-bit float: statistics accumulate in fp32."""
    if tensor.is_floating_point() and tensor.element_size() < 4:
        return tensor.float()
    return tensor


__all__ = [
    "DEVICE_HELP",
    "DTYPE_CHOICES",
    "DTYPE_HELP",
    "check_device_map",
    "model_device",
    "parse_max_memory",
    "resolve_device",
    "resolve_dtype",
    "stat_dtype",
]
