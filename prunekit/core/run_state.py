"""The data one :func:`prunekit.compress` run passes around and returns: the result
(:class:`CompressResult`), the plugin objects a recipe resolved to (:class:`Plugins`) and
the stage timer (:class:`Timer`). Re-exported by :mod:`prunekit.core.pipeline`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.core.plan import PrunePlan


@dataclass
class CompressResult:
    """What :func:`compress` did: the output directory, the plans applied (each in the
    indices of the model it was applied to), metrics per stage, and timings."""

    output_dir: Path
    plans: list[PrunePlan]
    metrics: dict[str, dict[str, Any]]
    timings: dict[str, float]
    layout: str
    recovery: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    failures: dict[str, str] = field(default_factory=dict)  # optional stage -> what failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "plans": [p.to_dict() for p in self.plans],
            "metrics": self.metrics,
            "timings": self.timings,
            "layout": self.layout,
            "recovery": self.recovery,
            "failures": self.failures,
        }


@dataclass
class Plugins:
    """The plugin objects (and validated configs) a recipe uses, resolved once by
    :func:`preflight`."""

    scorers: dict[str, Any]  # unit -> scorer object
    recovery: Any = None
    recovery_config: Any = None
    quantizer: Any = None
    quantize_config: Any = None
    healer: Any = None
    heal_config: Any = None


class Timer:
    """``with timer("step"):`` adds the block's wall time to ``timings["step"]``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


__all__ = ["CompressResult", "Plugins", "Timer"]
