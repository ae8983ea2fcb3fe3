"""The ``--device`` / ``--dtype`` / ``--device-map`` / ``--max-memory`` flags every model command
shares, and the keyword arguments of :func:`prunekit.load_model` they become. Values are
checked before any work (:class:`prunekit.errors.DeviceError`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_device_args(p: argparse.ArgumentParser, *, device_map: bool = True) -> None:
    """Add ``--device`` and ``--dtype`` (and ``--device-map`` / ``--max-memory``) to ``p``."""
    g = p.add_argument_group("device and dtype")
    g.add_argument(
        "--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto: CUDA when available)"
    )
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto|bfloat16|float16|float32 (default auto: the checkpoint's own dtype; "
        "a GGUF file loads as float32)",
    )
    if device_map:
        g.add_argument(
            "--device-map",
            choices=("auto", "balanced", "sequential"),
            help="spread a model larger than one device over GPUs, CPU and disk (accelerate)",
        )
        g.add_argument(
            "--max-memory", help="with --device-map: per-device budget, e.g. 0=20GiB,cpu=60GiB"
        )


def device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``device`` / ``dtype`` / ``device_map`` / ``max_memory`` for :func:`prunekit.load_model`,
    resolved and checked now (before any loading)."""
    from prunekit.core.devices import (
        check_device_map,
        parse_max_memory,
        resolve_device,
        resolve_dtype,
    )

    device_map = getattr(args, "device_map", None)
    max_memory = parse_max_memory(getattr(args, "max_memory", None))
    check_device_map(device_map, max_memory)
    if args.dtype != "auto":
        resolve_dtype(args.dtype)
    return {
        "device": None if device_map else resolve_device(args.device),
        "dtype": args.dtype,
        "device_map": device_map,
        "max_memory": max_memory,
    }


__all__ = ["add_device_args", "device_kwargs"]
