"""Checks of a model input before any weight is read (issue 13): a user waits seconds, not
minutes, for an error that the config, the recipe and the installed packages already show.

:func:`check_model_input` is the one entry the ``compress`` pipeline and the ``score`` /
``eval`` commands call. From ``config.json`` alone (headers only, no tensor) it refuses a
missing or unsupported model, a quantized checkpoint (``quantization_config``), a sequence
length beyond the model's positions, targets that the model's layer/head/neuron counts
and protections cannot meet (the selection itself runs on placeholder scores, so every rule
it enforces fails here the same way it would after scoring), and a quantizer group size that
does not divide the widths the plan leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import ModelLoadError, PruningPlanError


def model_config(model_or_path: Any, gguf_file: str | None = None) -> Any:
    """The config of an in-memory model or a local model directory (read without its
    weights); None for a GGUF file or a hub id, which are checked when loaded."""
    from prunekit.core.io import read_config

    if isinstance(model_or_path, nn.Module):
        return getattr(model_or_path, "config", None)
    text = str(model_or_path)
    if gguf_file is not None or text.endswith(".gguf"):
        return None
    path = Path(text).expanduser()
    if path.exists():
        return read_config(path)  # ModelLoadError names a missing or damaged config.json
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelLoadError(
            f"model directory {path} does not exist; pass a local model directory or a hub id"
        )
    return None


def refuse_quantized_config(config: Any) -> None:
    """A checkpoint whose config carries a ``quantization_config`` holds packed low-bit
    weights, which cannot be sliced: refuse it before transformers tries its backend."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    method = method or getattr(quant, "quant_method", None) or "unknown method"
    raise PruningPlanError(
        f"the model is quantized ({getattr(method, 'value', method)}, quantization_config in "
        "config.json); packed low-bit weights cannot be sliced. Compress the unquantized "
        "model and add --quantize (prune -> recover -> quantize)",
        entry="model",
    )


def check_seq_len(config: Any, seq_lens: Mapping[str, int | None]) -> None:
    """Each named sequence length (e.g. ``{"calibration.seq_len": 1024}``) fits the model's
    ``max_position_embeddings`` (when the config states it)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for name, value in seq_lens.items():
        if value is not None and value > limit:
            raise ValueError(
                f"{name}={value}: longer than the model's max_position_embeddings ({limit}); "
                f"use a seq_len of at most {limit} (CLI: --seq-len {limit})"
            )


def check_model_input(
    model_or_path: Any,
    *,
    targets: Any = None,
    scorers: Mapping[str, Any] | None = None,
    seq_lens: Mapping[str, int | None] | None = None,
    gguf_file: str | None = None,
    quantized_ok: bool = False,
    quantize: tuple[Any, Any] | None = None,
) -> Any:
    """Check a model input against what will be asked of it, from its config alone: the
    architecture has an adapter, the checkpoint is not quantized, ``seq_lens`` fit its
    positions and ``targets`` (with their resolved ``scorers``) can be met by its layer, head
    and neuron counts. Returns the per-layer shapes, or None when the config is only known
    after loading (a GGUF file, a hub id). ``quantized_ok``: a quantized checkpoint is fine
    (evaluation). ``quantize``: ``(quantizer, config)`` whose group size must fit the widths
    the targets leave (:func:`prunekit.core.quant_groups.check_planned`)."""
    from prunekit.core.quant_groups import check_planned, shapes_after
    from prunekit.core.select import check_targets
    from prunekit.core.serve_shapes import check_serve_format
    from prunekit.core.targets import UNITS
    from prunekit.plugins import get_adapter

    config = model_config(model_or_path, gguf_file)
    if config is None:
        return None
    if not quantized_ok:
        refuse_quantized_config(config)
    adapter = get_adapter(config)  # an unsupported architecture fails here
    check_seq_len(config, seq_lens or {})
    check_serve_format(config, getattr(targets, "serve", None))  # e.g. DeciLM: Llama-family
    shapes = adapter.config_shapes(config)
    planned = shapes
    if targets is not None and any(getattr(targets, unit) for unit in UNITS):
        planned = shapes_after(shapes, check_targets(shapes, targets, scorers))
    if quantize is not None and quantize[0] is not None:
        check_planned(*quantize, config, planned)  # GroupSizeError says what to pass
    return shapes


def check_quantize_layout(targets: Any, quantizer: str) -> None:
    """Refuse, from the recipe alone, targets whose result has per-layer shapes together with
    a quantizer: the backends (and stock ``from_pretrained``) load only uniform layers, so the
    run would fail at its last stage, after scoring, pruning and recovery."""
    why = []
    if targets.mode == "per_layer" and (targets.heads or targets.neurons):
        why.append("mode per_layer removes a different number of heads/neurons per layer")
    if targets.attention or targets.mlps:
        why.append("removing attention/MLP sub-blocks leaves layers without them")
    if why:
        raise ValueError(
            f"quantize {quantizer!r}: {'; '.join(why)}, and the quantization backends load only "
            "models whose layers all have one shape. Use mode uniform (and layers instead of "
            "sub-blocks) to quantize in the same run, or drop the quantizer and keep the "
            "per-layer model unquantized"
        )


__all__ = [
    "check_model_input",
    "check_quantize_layout",
    "check_seq_len",
    "model_config",
    "refuse_quantized_config",
]
