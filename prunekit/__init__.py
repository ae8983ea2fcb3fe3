"""prunekit: structured pruning of Hugging Face transformers (layers, GQA-aware heads, MLP
neurons) with a pluggy plugin system for architectures, scorers, quantizers and recovery
methods.

One call compresses a model with a recipe (the CLI ``prunekit compress`` is a thin layer over
it)::

    import prunekit

    recipe = prunekit.Recipe.from_dict({"targets": {"layers": 4, "heads": 0.25}})
    result = prunekit.compress("HuggingFaceTB/SmolLM2-135M-Instruct", recipe, "out")

The steps are public too: :func:`score` -> :func:`plan_for` / :func:`select` ->
:func:`apply_plan` -> :func:`recover` -> :func:`save_pretrained`.
"""

from prunekit.core.io import load_model, load_pretrained, save_pretrained
from prunekit.core.masking import masked
from prunekit.core.pipeline import CompressResult, compress
from prunekit.core.plan import PrunePlan
from prunekit.core.recipe import Recipe
from prunekit.core.recovery import RecoveryConfig, RecoveryResult, recover
from prunekit.core.scores import Scores, score
from prunekit.core.select import plan_for, select
from prunekit.core.surgery import apply_plan
from prunekit.core.targets import Targets
from prunekit.errors import (
    ModelLoadError,
    OutputExistsError,
    PluginUnavailableError,
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
    "ModelLoadError",
    "OutputExistsError",
    "PluginUnavailableError",
    "PrunePlan",
    "PrunekitError",
    "PruningPlanError",
    "Recipe",
    "RecoveryConfig",
    "RecoveryResult",
    "RegistryError",
    "Scores",
    "Targets",
    "UnsafeCheckpointError",
    "UnsupportedArchitectureError",
    "apply_plan",
    "compress",
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
