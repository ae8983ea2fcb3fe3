"""Built-in recovery methods (``lora``, ``full``, ``distill``, ``qlora``), registered through
``register_recoveries`` like any plugin. The training loop that runs them is
:func:`prunekit.core.recovery.recover`; each method says what is trained
(``prepare``) and with which loss (``objective``)::

    from prunekit import RecoveryConfig, recover
    result = recover(pruned, train_ids, RecoveryConfig(method="lora", steps=100))
"""

from __future__ import annotations

from prunekit.core.recovery import RecoveryMethod
from prunekit.hookspecs import hookimpl
from prunekit.recoveries.full import DistillRecovery, FullRecovery
from prunekit.recoveries.lora import (
    LoraRecovery,
    QloraRecovery,
    attach_lora,
    has_lora_modules,
    layers_near_pruning,
    lora_target_names,
    merge_lora,
)

BUILTIN_METHODS: tuple[type[RecoveryMethod], ...] = (
    LoraRecovery,
    FullRecovery,
    DistillRecovery,
    QloraRecovery,
)


@hookimpl
def register_recoveries(register) -> None:
    """The built-in recovery methods: lora, full, distill, qlora."""
    for cls in BUILTIN_METHODS:
        register(cls())


__all__ = [
    "BUILTIN_METHODS",
    "DistillRecovery",
    "FullRecovery",
    "LoraRecovery",
    "QloraRecovery",
    "attach_lora",
    "has_lora_modules",
    "layers_near_pruning",
    "lora_target_names",
    "merge_lora",
]
