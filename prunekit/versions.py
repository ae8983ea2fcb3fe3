"""Versions recorded in every sidecar, so a result can be audited and re-created."""

from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("prunekit", "torch", "transformers", "safetensors", "pluggy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
