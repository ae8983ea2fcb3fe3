"""Apply a :class:`PrunePlan` to a model in place, through its architecture adapter.

The applied plans are data on the model, not hidden state: after :func:`apply_plan` the model
carries them in the public attribute ``model.prunekit_plans`` (a list of :class:`PrunePlan`,
oldest first, each with indices relative to the model it was applied to), which
:func:`prunekit.save_pretrained` writes to the ``prunekit.json`` sidecar.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from prunekit.core.plan import PrunePlan
from prunekit.core.quant_marks import is_quantized
from prunekit.core.shapes import LayerShape
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter

#: public attribute in which :func:`apply_plan` records the plans applied to a model
PLANS_ATTR = "prunekit_plans"


def applied_plans(model: nn.Module) -> list[PrunePlan]:
    """The plans :func:`apply_plan` applied to ``model``, oldest first (``[]`` if none)."""
    return list(getattr(model, PLANS_ATTR, None) or [])


def check_not_quantized(
    model: nn.Module, fix: str = "Prune the unquantized model first, then quantize"
) -> None:
    """Raise :class:`PruningPlanError` when ``model`` is quantized (packed low-bit weights
    cannot be sliced); ``fix`` tells the caller's user what to do instead."""
    if is_quantized(model):
        raise PruningPlanError(
            f"the model is quantized; packed low-bit weights cannot be sliced. {fix} "
            "(prune -> recover -> quantize)",
            entry="model",
        )


def _slice_units(
    adapter: Any,
    layers: nn.ModuleList,
    plan: PrunePlan,
    shapes: list[LayerShape],
    head_keeps: dict[int, tuple[list[int], list[int]]],
) -> None:
    for layer_idx, (keep_q, keep_kv) in head_keeps.items():
        adapter.slice_heads(layers[layer_idx], keep_q, keep_kv)
    for layer_idx, removed in plan.neurons.items():
        if removed:
            gone = set(removed)
            keep = [i for i in range(shapes[layer_idx].intermediate) if i not in gone]
            adapter.slice_neurons(layers[layer_idx], keep)


def _remove_subblocks(adapter: Any, layers: nn.ModuleList, plan: PrunePlan) -> None:
    """Replace the plan's attention / MLP sub-blocks (with their norms) by no-ops."""
    for i in plan.attention:
        adapter.remove_attention(layers[i])
    for i in plan.mlp:
        adapter.remove_mlp(layers[i])


def _check_subblocks_supported(adapter: Any, plan: PrunePlan) -> None:
    if (plan.attention or plan.mlp) and not adapter.subblock_attrs:
        raise PruningPlanError(
            f"the {adapter.name} adapter cannot remove attention/MLP sub-blocks (only pre-norm "
            "decoders can); remove whole layers with `layers` instead",
            entry="attention" if plan.attention else "mlp",
        )


def _drop_layers(adapter: Any, model: nn.Module, removed: list[int]) -> list[int]:
    """Remove layers ``removed``, renumber the rest; return the original indices kept."""
    layers = adapter.layers(model)
    gone = set(removed)
    kept = [i for i in range(len(layers)) if i not in gone]
    if removed:
        new_layers = nn.ModuleList([layers[i] for i in kept])
        for new_idx, layer in enumerate(new_layers):
            adapter.set_layer_index(layer, new_idx)
        adapter.set_layers(model, new_layers)
    return kept


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove the plan's layers, heads, neurons and attention / MLP sub-blocks from ``model``
    in place and return it. A removed sub-block and its norm become no-ops (the residual path
    stays) and the config gets a ``skip`` entry for it in ``per_layer_config``.

    The whole plan is validated against the model's current shapes before any tensor is
    touched; :class:`PruningPlanError` names the offending entry. Afterwards the modules and
    ``model.config`` agree: ``layer_idx`` renumbered, ``layer_types`` sliced,
    ``num_hidden_layers`` / head counts / ``head_dim`` / ``intermediate_size`` rewritten (as a
    stock config when every layer has the same shape, else as ``per_layer_config``). Tied
    input/output embeddings are never touched, so they stay tied. A copy of ``plan`` is
    appended to ``model.prunekit_plans`` (see :func:`applied_plans`).
    """
    adapter = get_adapter(model)
    check_not_quantized(model)
    layers = adapter.layers(model)
    shapes = adapter.shapes(model)
    head_keeps = plan.validate(shapes)
    _check_subblocks_supported(adapter, plan)

    _slice_units(adapter, layers, plan, shapes, head_keeps)
    _remove_subblocks(adapter, layers, plan)
    kept = _drop_layers(adapter, model, plan.layers)
    adapter.rewrite_config(model, kept_layers=kept)
    setattr(model, PLANS_ATTR, [*applied_plans(model), copy.deepcopy(plan)])
    return model


__all__ = ["PLANS_ATTR", "applied_plans", "apply_plan", "check_not_quantized"]
