"""Apply a :class:`PrunePlan` to a model in place, through its architecture adapter."""

from __future__ import annotations

from torch import nn

from prunekit.core.plan import PrunePlan
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter


def _check_not_quantized(model: nn.Module) -> None:
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise PruningPlanError(
            "the model is quantized; packed low-bit weights cannot be sliced. Prune the "
            "unquantized model first, then quantize (prune -> recover -> quantize)",
            entry="model",
        )


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove the plan's layers, heads and neurons from ``model`` in place and return it.

    The whole plan is validated against the model's current shapes before any tensor is
    touched; :class:`PruningPlanError` names the offending entry. Afterwards the modules and
    ``model.config`` agree: ``layer_idx`` renumbered, ``layer_types`` sliced,
    ``num_hidden_layers`` / head counts / ``head_dim`` / ``intermediate_size`` rewritten (as a
    stock config when every layer has the same shape, else as ``per_layer_config``). Tied
    input/output embeddings are never touched, so they stay tied.
    """
    adapter = get_adapter(model)
    _check_not_quantized(model)
    layers = adapter.layers(model)
    shapes = adapter.shapes(model)
    head_keeps = plan.validate(shapes)

    for layer_idx, (keep_q, keep_kv) in head_keeps.items():
        adapter.slice_heads(layers[layer_idx], keep_q, keep_kv)
    for layer_idx, removed in plan.neurons.items():
        if removed:
            gone = set(removed)
            keep = [i for i in range(shapes[layer_idx].intermediate) if i not in gone]
            adapter.slice_neurons(layers[layer_idx], keep)

    kept = [i for i in range(len(layers)) if i not in set(plan.layers)]
    if plan.layers:
        new_layers = nn.ModuleList([layers[i] for i in kept])
        for new_idx, layer in enumerate(new_layers):
            adapter.set_layer_index(layer, new_idx)
        adapter.set_layers(model, new_layers)
    adapter.rewrite_config(model, kept_layers=kept)
    history = model.__dict__.setdefault("_prunekit_plans", [])
    history.append(plan.to_dict())
    return model
