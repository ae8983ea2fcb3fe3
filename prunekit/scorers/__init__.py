"""Built-in importance scorers, registered through ``register_scorers`` like any plugin."""

from __future__ import annotations

from prunekit.hookspecs import hookimpl


@hookimpl
def register_scorers(register) -> None:
    """Built-in scorers are added here as they are implemented."""
