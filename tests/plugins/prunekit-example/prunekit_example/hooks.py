"""The entry point: ``[project.entry-points.prunekit] example = "prunekit_example.hooks"``."""

from __future__ import annotations

from prunekit.hookspecs import hookimpl
from prunekit_example.quantizer import RoundToNearest
from prunekit_example.recovery import NormRecovery
from prunekit_example.scorer import WeightNormLayers


@hookimpl
def register_scorers(register) -> None:
    register(WeightNormLayers())


@hookimpl
def register_quantizers(register) -> None:
    register(RoundToNearest())


@hookimpl
def register_recoveries(register) -> None:
    register(NormRecovery())
