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

import torch

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
    if recipe.placement.device_map is not None:
        problems.append("placement.device_map: layers are loaded one at a time onto one device")
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
    resume: bool = False,
):
    """Score layer by layer from ``model_dir``'s safetensors, select, stream-apply the plan to
    ``output_dir`` → :class:`prunekit.core.pipeline.CompressResult`.

    The same guards and order as the in-memory pipeline: the output is checked before any work
    (:mod:`prunekit.core.outdir`), the scores are kept for ``resume`` until the model is saved
    (:mod:`prunekit.core.resume`), the model is written atomically first, then ``report.md``
    (without evaluation) and the sidecar's timings; a report that fails is recorded in both
    and raises :class:`~prunekit.errors.StageFailedError`, the model kept."""
    from prunekit.core.io import read_config
    from prunekit.core.pipeline import CompressResult, preflight
    from prunekit.core.resume import ScoreCache
    from prunekit.core.streaming import stream_apply
    from prunekit.plugins import get_adapter

    output_dir = check_output_dir(output_dir, overwrite, inputs=(model_dir,))
    plugins = preflight(recipe, model_dir)
    check_sequential(recipe, plugins, model_dir)
    say = print if progress else (lambda *a, **k: None)
    recipe = recipe.replace(sequential=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = read_config(model_dir)
    dense_shapes = get_adapter(config).config_shapes(config)
    ids = recipe.calibration.load(_tokenizer(model_dir))  # before any scoring
    timings["calibration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = ScoreCache(output_dir, model_dir, recipe)
    plan, scores = _score_and_select(model_dir, ids, recipe, plugins, cache, resume, say, progress)
    timings["score+select"] = time.perf_counter() - t0
    say(f"[prunekit] removing {plan.summary()} (streaming to {output_dir})", flush=True)
    metrics: dict[str, dict[str, Any]] = {"dense": {"size_on_disk_mb": weights_size_mb(model_dir)}}
    metrics["pruned"] = {}
    extra = {
        "recipe": recipe.to_dict(),
        "metrics": metrics,
        "timings": timings,
        "scores": [scores.to_dict()],
        "recovery": [],
        "dense_layer_shapes": [s.to_dict() for s in dense_shapes],
    }
    t0 = time.perf_counter()
    out = stream_apply(
        model_dir, plan, output_dir, overwrite=overwrite, extra=extra, **_cast(recipe)
    )
    timings["apply+save"] = time.perf_counter() - t0
    cache.clear()
    say(f"[prunekit] saved the compressed model to {out}", flush=True)
    metrics["pruned"]["size_on_disk_mb"] = weights_size_mb(out)
    layout = "per_layer" if "per_layer_config" in (out / "config.json").read_text() else "uniform"
    result = CompressResult(
        output_dir=out, plans=[plan], metrics=metrics, timings=timings, layout=layout
    )
    _finish(result, recipe, scores, dense_shapes)
    return result


def _cast(recipe: Recipe) -> dict[str, Any]:
    """``stream_apply``'s ``dtype``: the recipe's placement dtype, unless ``auto`` (kept)."""
    placement = getattr(recipe, "placement", None)
    name = getattr(placement, "dtype", "auto") or "auto"
    return {} if name == "auto" else {"dtype": getattr(torch, name)}


def _score_and_select(model_dir, ids, recipe: Recipe, plugins, cache, resume: bool, say, progress):
    """Scores from the layer-by-layer capture (or, with ``resume``, those an earlier run of
    the same model and recipe kept), then the selection → ``(plan, scores)``."""
    from prunekit.core.select import plan_for, select

    kept = cache.load(0) if resume else None
    if kept is not None:
        say(f"[prunekit] reusing the scores kept in {cache.dir} (--resume)", flush=True)
        plan, scores = select(kept, recipe.targets, scorers=plugins.scorers), kept
    else:
        say(f"[prunekit] scoring {model_dir} layer by layer from its safetensors", flush=True)
        plan, scores = plan_for(
            str(model_dir),
            ids,
            recipe.targets,
            progress=progress,
            scorers=plugins.scorers,
            sequential=True,
            **_placement(recipe),
        )
        cache.save(0, scores)
    if plan.is_empty():
        raise ValueError("targets: the selection removed nothing (targets too small?)")
    return plan, scores


def _placement(recipe: Recipe) -> dict[str, Any]:
    placement = getattr(recipe, "placement", None)
    if placement is None:
        return {}
    return {"device": placement.device, "dtype": placement.dtype}


def _finish(result, recipe: Recipe, scores, dense_shapes) -> None:
    """``report.md`` (no evaluation: it says how to measure) and the sidecar's final timings;
    a failure is recorded in both and raises :class:`StageFailedError` (the model is kept)."""
    from prunekit.core.capture import read_shapes
    from prunekit.core.report import write_report
    from prunekit.errors import StageFailedError

    out = result.output_dir
    failures: dict[str, str] = {}
    try:
        args = (out, result, recipe, [scores], [], dense_shapes, read_shapes(out))
        result.report = write_report(*args)
        with open(result.report, "a", encoding="utf-8") as f:
            f.write(NOT_EVALUATED.format(out=out))
    except Exception as e:  # noqa: BLE001 -- recorded, reported, raised after the save
        failures["report"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        result.report = out / "report.md"
        with open(result.report, "a", encoding="utf-8") as f:
            f.write(f"# prunekit report\n\n## Failed stages\n\n- report: {failures['report']}\n")
    result.failures = failures
    _update_sidecar(out, result)
    if failures:
        raise StageFailedError(str(out), failures, result=result)


NOT_EVALUATED = (
    "\n## Not measured\n\n"
    "`--sequential` never builds the model, so perplexity and latency were not measured. "
    "Measure the pruned model with `prunekit eval {out}`.\n"
)


def _update_sidecar(out: Path, result) -> None:
    """Rewrite ``prunekit.json`` with the timings and failures known after the save
    (atomically: a temporary file renamed over it)."""
    import json
    import os

    from prunekit.core.io import SIDECAR

    path = out / SIDECAR
    sidecar = json.loads(path.read_text(encoding="utf-8"))
    sidecar.update(metrics=result.metrics, timings=result.timings, failures=result.failures)
    tmp = path.with_name(f".{SIDECAR}.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _tokenizer(model_dir: str | Path):
    from prunekit.core.io import _load_tokenizer, read_config

    tokenizer = _load_tokenizer(Path(model_dir), read_config(model_dir))
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; calibration needs its tokenizer")
    return tokenizer


__all__ = ["check_sequential", "compress_sequential"]
