"""Built-in quantizers, registered through ``register_quantizers`` like any plugin."""

from __future__ import annotations

from prunekit.hookspecs import hookimpl


@hookimpl
def register_quantizers(register) -> None:
    """Built-in quantizers are added here as they are implemented."""
