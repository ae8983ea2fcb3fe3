"""The ``--device`` / ``--dtype`` / ``--device-map`` / ``--max-memory`` flags every model command
shares, and the keyword arguments of :func:`prunekit.load_model` they become. Values are
checked before any work (:class:`prunekit.errors.DeviceError`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_device_args(
    p: argparse.ArgumentParser, *, device_map: bool = True, recipe: bool = False
) -> None:
    """Add ``--device`` and ``--dtype`` (and ``--device-map`` / ``--max-memory``) to ``p``.
    ``recipe``: the command reads a recipe, whose ``placement`` section applies to the flags
    not given (their default is then ``None``)."""
    g = p.add_argument_group("device and dtype")
    default = None if recipe else "auto"
    first = "the recipe's placement, else " if recipe else ""
    g.add_argument(
        "--device",
        default=default,
        help=f"auto|cpu|cuda|cuda:N (default: {first}auto: CUDA when available)",
    )
    g.add_argument(
        "--dtype",
        default=default,
        help=f"auto|bfloat16|float16|float32 (default: {first}auto: the checkpoint's own "
        "dtype; a GGUF file loads as float32); the output is saved in it",
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
    resolved and checked now (before any loading); a flag left unset (``None``) is ``auto``.
    A bad value is a :class:`~prunekit.errors.DeviceError` naming the flag."""
    from prunekit.core.devices import (
        check_device_map,
        parse_max_memory,
        resolve_device,
        resolve_dtype,
    )
    from prunekit.errors import DeviceError

    device_map = getattr(args, "device_map", None)
    try:
        max_memory = parse_max_memory(getattr(args, "max_memory", None))
        check_device_map(device_map, max_memory)
        dtype = args.dtype or "auto"
        if dtype != "auto":
            resolve_dtype(dtype)
        device = None if device_map else resolve_device(args.device or "auto")
    except DeviceError as e:
        raise DeviceError(f"--{e.option.replace('_', '-')}", e.value, e.why) from None
    return {"device": device, "dtype": dtype, "device_map": device_map, "max_memory": max_memory}


def device_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line (``None``: not given, the recipe's ``placement``
    decides), checked now like :func:`device_kwargs`: ``compress()``'s keywords."""
    checked = device_kwargs(args)
    return {
        "device": args.device,
        "dtype": args.dtype,
        "device_map": checked["device_map"],
        "max_memory": checked["max_memory"],
    }


__all__ = ["add_device_args", "device_kwargs", "device_overrides"]
