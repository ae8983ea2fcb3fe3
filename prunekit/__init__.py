"""prunekit: structured pruning of Hugging Face transformers (layers, GQA-aware heads, MLP
neurons) with a pluggy plugin system for architectures, scorers and quantizers."""

from prunekit.core.io import load_model, load_pretrained, save_pretrained
from prunekit.core.masking import masked
from prunekit.core.pipeline import CompressResult, compress
from prunekit.core.plan import PrunePlan
from prunekit.core.recipe import Recipe
from prunekit.core.recovery import RecoveryConfig, RecoveryResult, recover
from prunekit.core.scores import Scores, score
from prunekit.core.select import Targets, plan_for, select
from prunekit.core.surgery import apply_plan
from prunekit.errors import (
    ModelLoadError,
    OutputExistsError,
    PrunekitError,
    PruningPlanError,
    RegistryError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
)
from prunekit.hookspecs import hookimpl
from prunekit.plugins import get_adapter, get_plugins

__version__ = "0.1.0"

__all__ = [
    "CompressResult",
    "Recipe",
    "compress",
    "ModelLoadError",
    "OutputExistsError",
    "PrunePlan",
    "RecoveryConfig",
    "RecoveryResult",
    "Scores",
    "Targets",
    "PrunekitError",
    "PruningPlanError",
    "RegistryError",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "apply_plan",
    "get_adapter",
    "get_plugins",
    "hookimpl",
    "load_model",
    "load_pretrained",
    "masked",
    "plan_for",
    "recover",
    "save_pretrained",
    "score",
    "select",
]
