"""``compress`` for a model larger than memory (``sequential=True``, ``compress --sequential``):
the scores come from the layer-by-layer capture that reads one layer at a time from the
safetensors files (:func:`prunekit.core.capture.capture_sequential`), the plan is selected as
usual, and it is applied by streaming tensors from the input checkpoint to the output shards
(:func:`prunekit.core.streaming.stream_apply`). The model is never built whole: peak memory is
about one layer plus the embeddings and the calibration activations.

What needs the whole model is refused before any work: gradient scorers (Taylor), multi-step
layer selection, ``iterative > 1``, recovery, healing and quantization. Run them on the pruned
output, which is smaller. Perplexity is not measured here (``prunekit eval OUT`` does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prunekit.core.io import check_output_dir, weights_size_mb
from prunekit.core.recipe import Recipe


def check_sequential(recipe: Recipe, plugins: Any, model_dir: Any) -> None:
    """Raise ``ValueError`` naming every recipe part a sequential run cannot do."""
    problems = []
    if not isinstance(model_dir, (str, Path)) or not Path(model_dir).is_dir():
        problems.append("the model must be a local directory of safetensors files")
    elif not any(Path(model_dir).glob("*.safetensors")):
        problems.append(f"{model_dir} has no *.safetensors files")
    for unit, scorer in plugins.scorers.items():
        if getattr(scorer, "kind", "forward") != "forward" or not scorer.sequential_ok:
            problems.append(
                f"targets.{unit[:-1]}_scorer {scorer.name!r} needs whole-model passes; use a "
                "forward-only scorer (e.g. magnitude, output_norm, activation_frequency, wanda)"
            )
    if recipe.targets.layer_steps > 1:
        problems.append("targets.layer_steps > 1 re-scores with layers masked in the model")
    if recipe.iterative > 1:
        problems.append("iterative > 1 re-scores the pruned model")
    for name, section in (("recovery", plugins.recovery), ("heal", plugins.healer)):
        if section is not None:
            problems.append(f"{name} trains or fits the model in memory")
    if plugins.quantizer is not None:
        problems.append("quantize needs the model in memory (quantize the pruned output)")
    if problems:
        raise ValueError(
            "sequential compression cannot do this: " + "; ".join(problems) + ". Drop these or "
            "run without --sequential"
        )


def compress_sequential(
    model_dir: str | Path,
    recipe: Recipe,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
):
    """Score layer by layer from ``model_dir``'s safetensors, select, stream-apply the plan to
    ``output_dir`` → :class:`prunekit.core.pipeline.CompressResult`."""
    from prunekit.core.io import read_config
    from prunekit.core.pipeline import CompressResult, preflight
    from prunekit.core.select import plan_for
    from prunekit.core.streaming import stream_apply
    from prunekit.plugins import get_adapter

    output_dir = check_output_dir(output_dir, overwrite, inputs=(model_dir,))
    plugins = preflight(recipe, model_dir)
    check_sequential(recipe, plugins, model_dir)
    say = print if progress else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = read_config(model_dir)
    dense_shapes = get_adapter(config).config_shapes(config)
    ids = recipe.calibration.load(_tokenizer(model_dir))  # before any scoring
    timings["calibration"] = time.perf_counter() - t0
    say(f"[prunekit] scoring {model_dir} layer by layer from its safetensors", flush=True)
    t0 = time.perf_counter()
    plan, scores = plan_for(
        str(model_dir),
        ids,
        recipe.targets,
        progress=progress,
        scorers=plugins.scorers,
        sequential=True,
    )
    timings["score+select"] = time.perf_counter() - t0
    if plan.is_empty():
        raise ValueError("targets: the selection removed nothing (targets too small?)")
    say(f"[prunekit] removing {plan.summary()} (streaming to {output_dir})", flush=True)
    metrics: dict[str, dict[str, Any]] = {"dense": {"size_on_disk_mb": weights_size_mb(model_dir)}}
    extra = {
        "recipe": {**recipe.to_dict(), "sequential": True},
        "scores": [scores.to_dict()],
        "dense_layer_shapes": [s.to_dict() for s in dense_shapes],
        "timings": timings,
    }
    t0 = time.perf_counter()
    out = stream_apply(model_dir, plan, output_dir, overwrite=overwrite, extra=extra)
    timings["apply+save"] = time.perf_counter() - t0
    metrics["pruned"] = {"size_on_disk_mb": weights_size_mb(out)}
    layout = "per_layer" if "per_layer_config" in (out / "config.json").read_text() else "uniform"
    return CompressResult(
        output_dir=out, plans=[plan], metrics=metrics, timings=timings, layout=layout
    )


def _tokenizer(model_dir: str | Path):
    from prunekit.core.io import _load_tokenizer, read_config

    tokenizer = _load_tokenizer(Path(model_dir), read_config(model_dir))
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; calibration needs its tokenizer")
    return tokenizer


__all__ = ["check_sequential", "compress_sequential"]
