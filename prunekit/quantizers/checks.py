"""Validation shared by the built-in quantizers' configs: each raises ``ValueError`` naming
the field and the allowed values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(field_name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(map(repr, allowed))
        raise ValueError(f"{field_name} must be one of {choices}; got {value!r}")


def check_bool(field_name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field_name} must be True or False, got {value!r}")


def check_group_size(group_size: int | None, field_name: str = "group_size") -> None:
    """None (fitted to the model, :mod:`prunekit.core.quant_groups`), -1 or a power of two."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"{field_name} must be an integer, got {group_size!r}")
    if group_size != -1 and (group_size < 8 or group_size & (group_size - 1)):
        raise ValueError(
            f"{field_name} must be -1 (one group per output channel), a power of two >= 8 "
            f"(32, 64, 128...) or None (the largest of 128, 64, 32 that fits the model), "
            f"got {group_size}"
        )


def check_calibration_counts(n_samples: int, seq_len: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
