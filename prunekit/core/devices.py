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


def parse_device(device: str | torch.device | None, option: str = "device") -> torch.device | None:
    """The form of ``device`` alone (whether this machine has it is :func:`resolve_device`'s
    question): ``None`` for ``None`` / ``"auto"``, else a CPU or CUDA :class:`torch.device`."""
    if device is None or device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(option, device, f"unknown device; use {DEVICE_HELP}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(option, device, f"unsupported device type; use {DEVICE_HELP}")
    return dev


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` / ``"auto"``: ``cuda`` when available,
    else ``cpu``. Raises :class:`DeviceError` for an unknown device or CUDA asked for on a
    machine without it."""
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        return dev
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


def check_model_placement(model: torch.nn.Module, device: Any = None, dtype: Any = None) -> None:
    """An in-memory model keeps its own device and dtype (only a path is loaded with them):
    a ``device`` / ``dtype`` asked for that is not the model's is a :class:`DeviceError`
    saying how to fix it. ``None`` / ``"auto"`` accept any."""
    if device not in (None, "auto"):
        want, have = resolve_device(device), model_device(model)
        spread = len(set(getattr(model, "hf_device_map", {}).values())) > 1
        if spread or want.type != have.type or want.index not in (None, have.index):
            where = "spread by a device_map" if spread else f"on {have}"
            raise DeviceError(
                "device",
                str(device),
                f"the model is {where} and an in-memory model keeps its device; move it first "
                f"(model.to({str(want)!r})) or pass its directory to load it there",
            )
    if dtype not in (None, "auto"):
        want_dtype = resolve_dtype(dtype)
        have_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if have_dtype not in (None, want_dtype):
            name = str(want_dtype).removeprefix("torch.")
            raise DeviceError(
                "dtype",
                str(dtype),
                f"the model is {str(have_dtype).removeprefix('torch.')} and an in-memory model "
                f"keeps its dtype; convert it first (model.to(torch.{name})) or pass its "
                "directory to load it so",
            )


def move_real_tensors(model: torch.nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers of ``model`` that hold data (not ``meta``) to ``device``
    in place, keeping tied parameters tied: a layer-by-layer skeleton whose layers stay meta
    until each is loaded straight onto ``device``."""
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.is_meta or t.device == device:
                    continue
                if id(t) not in moved:
                    data = t.data.to(device)
                    is_param = isinstance(t, torch.nn.Parameter)
                    moved[id(t)] = torch.nn.Parameter(data, t.requires_grad) if is_param else data
                store[name] = moved[id(t)]


def load_or_check(model: Any, **placement: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)``: a path (directory, hub id, ``.gguf``) loaded with ``placement``
    (``device``, ``dtype``, ``device_map``, ``max_memory``: :func:`prunekit.load_model`'s
    keywords; ``device=None`` is ``"auto"``, as on the command line); an in-memory model as it
    is (tokenizer ``None``), after :func:`check_model_placement` (a ``device_map`` cannot apply
    to it)."""
    if isinstance(model, (str, Path)):
        from prunekit.core.io import load_model

        kwargs = {k: v for k, v in placement.items() if v is not None}
        if placement.get("device_map") is None:
            kwargs.setdefault("device", "auto")
        return load_model(model, **kwargs)
    if placement.get("device_map") is not None or placement.get("max_memory"):
        raise DeviceError(
            "device_map",
            placement.get("device_map"),
            "an in-memory model is placed already; pass its directory to load it with a "
            "device_map, or dispatch it yourself (accelerate.dispatch_model)",
        )
    check_model_placement(model, placement.get("device"), placement.get("dtype"))
    return model, None


def check_not_offloaded(model: torch.nn.Module) -> None:
    """Pruning slices the weights in memory: a model whose ``device_map`` offloaded weights to
    CPU or disk (``meta`` parameters) is a :class:`DeviceError` saying what to do instead."""
    if any(p.is_meta for p in model.parameters()):
        placed = set(getattr(model, "hf_device_map", {}).values())
        raise DeviceError(
            "device_map",
            sorted(str(d) for d in placed & {"cpu", "disk"}),
            "weights offloaded beyond max_memory cannot be pruned in memory; give --max-memory "
            "room for the whole model, or use --sequential (scores layer by layer and streams "
            "the plan: a model larger than memory); prunekit score and eval take it offloaded",
        )


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
    "check_not_offloaded",
    "check_model_placement",
    "load_or_check",
    "model_device",
    "move_real_tensors",
    "parse_device",
    "parse_max_memory",
    "resolve_device",
    "resolve_dtype",
    "stat_dtype",
]
