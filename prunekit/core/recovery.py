"""Recovery after pruning (LoRA, full fine-tuning, distillation), registered through
``register_recoveries`` like any plugin."""

from __future__ import annotations

from prunekit.hookspecs import hookimpl


@hookimpl
def register_recoveries(register) -> None:
    """Built-in recovery methods are added here as they are implemented."""
