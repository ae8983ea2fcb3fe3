"""``prunekit.compress``: load -> evaluate dense -> calibrate -> (score -> select -> [heal ->]
apply [-> recover]) x iterative -> [quantize] -> save -> evaluate -> report, in that fixed
order (prune -> recover -> quantize).

Everything that can fail on bad input (recipe fields, plugin names and options, backend
availability, text files, the output directory, and from the model's config alone its
architecture, quantization, positions and the targets' counts) is checked by
:func:`preflight` before any weight is read; it resolves every plugin name to its object
once, and the stages below hold the objects. The compressed model is saved (to a temporary
directory moved into place when complete) as soon as it exists; an optional stage after it
(evaluation, latency, report) that fails is recorded in the sidecar and the report and raises
:class:`~prunekit.errors.StageFailedError` at the end. Each step's scores are kept for
``resume`` (:mod:`prunekit.core.resume`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.contracts import check_available
from prunekit.core.data import check_source, resolve_eval_text
from prunekit.core.devices import check_not_offloaded, load_or_check
from prunekit.core.heal import get_healer
from prunekit.core.io import (
    SIDECAR,
    AtomicDir,
    check_output_dir,
    load_model,
    save_pretrained,
    weights_size_mb,
)
from prunekit.core.plan import PrunePlan
from prunekit.core.preflight import check_model_input, check_quantize_layout
from prunekit.core.probe import probe_outputs, save_probe
from prunekit.core.recipe import Recipe
from prunekit.core.report import write_report
from prunekit.core.resume import ScoreCache
from prunekit.core.run_state import CompressResult, Plugins, Timer
from prunekit.core.speed_stage import measure_speed, time_dense_alone
from prunekit.core.surgery import apply_plan, check_not_quantized
from prunekit.core.targets import resolve_scorers, scorer_configs, step_targets, unit_counts
from prunekit.core.teacher_cache import teacher_caches, uses_teacher_cache
from prunekit.errors import StageFailedError
from prunekit.plugins import get_adapter, get_plugins


@dataclass
class _Run:
    """The state one :func:`compress` call passes from stage to stage."""

    recipe: Recipe
    plugins: Plugins
    model: nn.Module
    tokenizer: Any
    dense: nn.Module | None  # a copy of the dense model, when a stage needs it
    dense_shapes: list
    timer: Timer
    progress: bool
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    calib_ids: torch.Tensor | None = None
    plans: list[PrunePlan] = field(default_factory=list)
    scores: list = field(default_factory=list)
    recoveries: list = field(default_factory=list)
    teachers: dict = field(default_factory=dict)  # recovery seed -> TeacherCache (distill)
    eval_text: Path | str | None = None  # None: no perplexity (see core.data.resolve_eval_text)
    failures: dict[str, str] = field(default_factory=dict)  # optional stage -> what went wrong
    cache: ScoreCache | None = None  # each step's scores, kept for --resume
    resume: bool = False

    def say(self, message: str) -> None:
        if self.progress:
            print(f"[prunekit] {message}", flush=True)

    def evaluate(self, stage: str, model: nn.Module | None = None) -> None:
        """Evaluate ``model`` (default: the model being compressed) as ``stage``."""
        self.say(f"evaluating the {stage} model")
        with self.timer("evaluate"):
            found = _evaluate(model or self.model, self.tokenizer, self)
        self.metrics[stage] = {**self.metrics.get(stage, {}), **found}

    def attempt(self, stage: str, fn, *args) -> Any:
        """Run an optional stage after pruning (evaluation, probe, report): an exception is
        recorded in ``failures`` and the run goes on, so it never costs the compressed model;
        :func:`compress` raises :class:`~prunekit.errors.StageFailedError` once it is saved."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- recorded, reported, raised after the save
            self.failures[stage] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.say(f"{stage} failed ({self.failures[stage]}); the model is kept")
            return None


# ---- preflight -----------------------------------------------------------------------------
def preflight(recipe: Recipe, model: Any = None, *, gguf_file: str | None = None) -> Plugins:
    """Check plugin names, options, backend availability and text files before any model is
    loaded, and resolve every plugin name to its object (once). With ``model`` (a model, or a
    model directory read for its config only), also check the architecture, a quantized
    checkpoint, sequence lengths and targets against the model's counts
    (:func:`~prunekit.core.preflight.check_model_input`)."""
    t = recipe.targets
    if not (t.layers or t.heads or t.neurons or t.attention or t.mlps):
        raise ValueError(
            "targets: nothing to remove; give layers, heads, neurons, attention or mlps (> 0)"
        )
    scorers = resolve_scorers(t)  # RegistryError lists the valid scorers
    scorer_configs(t, scorers)  # scorer_options name scorers the targets use
    plugins = Plugins(scorers=scorers)
    registries = get_plugins()
    if recipe.recovery.method is not None:
        plugins.recovery = registries.recoveries.get(recipe.recovery.method)
        check_available(plugins.recovery, "recovery method")
        plugins.recovery_config = recipe.recovery.config(plugins.recovery)
    if recipe.heal.method is not None:
        plugins.healer = get_healer(recipe.heal.method)
        plugins.heal_config = recipe.heal.config(plugins.healer)
    if recipe.quantize.method is not None:
        plugins.quantizer = registries.quantizers.get(recipe.quantize.method)
        check_quantize_layout(t, recipe.quantize.method)  # before "install the backend"
        check_available(plugins.quantizer, "quantizer")
        plugins.quantize_config = recipe.quantize.config(plugins.quantizer)
    if model is not None:
        seq_lens = {"calibration.seq_len": recipe.calibration.seq_len}
        if plugins.recovery_config is not None:
            seq_lens["recovery.seq_len"] = getattr(plugins.recovery_config, "seq_len", None)
        quantize = (plugins.quantizer, plugins.quantize_config)
        check_model_input(
            model, targets=t, scorers=scorers, seq_lens=seq_lens, gguf_file=gguf_file,
            quantize=quantize,
        )  # fmt: skip
    check_source(recipe.calibration.source, "calibration")
    check_source(recipe.evaluation.text, "evaluation")
    return plugins


# ---- the stages ------------------------------------------------------------------------------
def compress(
    model_or_path: nn.Module | str | Path,
    recipe: Recipe | dict | str | Path,
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    gguf_file: str | None = None,
    progress: bool = True,
    sequential: bool | None = None,
    allow_pickle: bool = False,
    resume: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
) -> CompressResult:
    """Compress a model with a recipe and save the result, the report and the evidence.

    ``model_or_path``: an ``nn.Module`` (then pass ``tokenizer``; it is modified in place),
    a model directory, a hub id, or a ``.gguf`` file. ``recipe``: a :class:`Recipe`, a dict,
    or a YAML/JSON file. ``sequential`` (default: ``recipe.sequential``): never build the
    model; score layer by layer from the directory's safetensors and stream the plan to the
    output (see :mod:`prunekit.core.sequential`). ``allow_pickle``: accept pickled ``.bin``
    weights (trusted sources only). ``resume``: reuse the scores that an earlier, failed run
    of the same model and recipe kept beside the output (:mod:`prunekit.core.resume`). An
    optional stage after pruning that fails (evaluation, report) raises
    :class:`~prunekit.errors.StageFailedError` once the model is saved.

    ``device`` / ``dtype`` / ``device_map`` / ``max_memory`` (default: the recipe's
    ``placement``: CUDA when available, the checkpoint's dtype) place a model given as a path;
    the output keeps that dtype; an in-memory model keeps its own. A device this machine
    lacks fails before any work (:class:`~prunekit.errors.DeviceError`).
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_file(recipe)
    asked = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    recipe = recipe.replace(placement=recipe.placement.override(**asked))
    if isinstance(model_or_path, nn.Module):
        load_or_check(model_or_path, **asked)  # it keeps its own device and dtype
    placement = recipe.placement.load_kwargs()  # a device this machine lacks fails here
    if sequential if sequential is not None else recipe.sequential:
        from prunekit.core.sequential import compress_sequential

        return compress_sequential(
            model_or_path, recipe, output_dir, overwrite=overwrite, progress=progress, resume=resume
        )
    output_dir = check_output_dir(output_dir, overwrite, inputs=(model_or_path,))
    plugins = preflight(recipe, model_or_path, gguf_file=gguf_file)
    # the evaluation text (a file, the text itself) or None: perplexity is skipped
    eval_text = resolve_eval_text(recipe.evaluation.text, max_chars=recipe.evaluation.max_chars)
    source = (model_or_path, gguf_file, allow_pickle, placement)
    run = _load(source, tokenizer, recipe, plugins, progress)
    run.eval_text = eval_text
    run.cache, run.resume = ScoreCache(output_dir, model_or_path, recipe), resume
    run.evaluate("dense")
    run.attempt("latency of the dense model", time_dense_alone, run, model_or_path)
    if not isinstance(model_or_path, nn.Module) and Path(model_or_path).is_dir():
        run.metrics["dense"]["size_on_disk_mb"] = weights_size_mb(model_or_path)
    with run.timer("calibration"):
        run.calib_ids = recipe.calibration.load(run.tokenizer, model=run.model)
    run.teachers = _teachers(run)  # distillation's teacher outputs, before pruning
    _prune(run)
    # From here on the compressed model exists: it is saved before anything optional runs
    # (evaluation, latency, report), and an optional stage that fails is reported, not fatal.
    probe = run.attempt("probe", probe_outputs, run.model, run.tokenizer, run.eval_text)
    quantized = _quantize(run)
    stages = ["recovered" if plugins.recovery else "pruned"]
    stages += ["quantized"] if quantized is not None else []
    for stage in stages:
        run.metrics.setdefault(stage, {})  # the table's column order
    result = _save(run, output_dir, overwrite, quantized, probe)
    run.cache.clear()
    for stage in stages:
        model = quantized if stage == "quantized" else None
        run.attempt(f"evaluation of the {stage} model", run.evaluate, stage, model)
    run.attempt("latency", measure_speed, run, source, quantized)  # side by side
    _finish(run, result, quantized)
    return result


def _load(source, tokenizer, recipe, plugins, progress) -> _Run:
    """Load the model (unless given one), check it can be pruned, keep a dense copy when a
    stage needs one (encoder evaluation, a recovery method with a teacher)."""
    model_or_path, gguf_file, allow_pickle, placement = source
    timer = Timer()
    with timer("load"):
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            if progress:
                print(f"[prunekit] loading {model_or_path}", flush=True)
            model, tokenizer = load_model(
                model_or_path, gguf_file=gguf_file, allow_pickle=allow_pickle, **placement
            )
    if tokenizer is None:
        raise ValueError("tokenizer: pass the tokenizer along with an in-memory model")
    adapter = get_adapter(model)  # unsupported architecture fails here, before any work
    check_not_offloaded(model)
    check_not_quantized(
        model, "Compress the unquantized model and add --quantize (prune -> recover -> quantize)"
    )
    model.eval()
    teacher = getattr(plugins.recovery, "uses_teacher", False)
    teacher = teacher and not uses_teacher_cache(plugins.recovery, plugins.recovery_config)
    dense = copy.deepcopy(model) if not adapter.causal or teacher else None
    return _Run(recipe, plugins, model, tokenizer, dense, adapter.shapes(model), timer, progress)


def _prune(run: _Run) -> None:
    """``recipe.iterative`` rounds of score -> select -> apply (-> recover)."""
    k = run.recipe.iterative
    dense_counts = unit_counts(run.dense_shapes)
    for step in range(1, k + 1):
        shapes = get_adapter(run.model).shapes(run.model)
        targets = step_targets(run.recipe.targets, k, step, dense_counts, shapes)
        scorers = {u: s for u, s in run.plugins.scorers.items() if getattr(targets, u)}
        tag = f" (step {step}/{k})" if k > 1 else ""
        run.say(f"scoring and selecting{tag}")
        with run.timer("score+select"):
            plan, scores = _plan(run, targets, scorers, step)
        run.scores.append(scores)
        for note in plan.meta.get("adjusted", []):
            run.say(f"note: {note}{tag}")
        if plan.is_empty():
            run.say(f"nothing left to remove{tag}")
            continue
        if run.plugins.healer is not None and plan.layers:
            run.say(f"healing layers {sorted(plan.layers)} ({run.plugins.healer.name})")
            with run.timer("heal"):
                run.plugins.healer.heal(
                    run.model, run.calib_ids, plan.layers, run.plugins.heal_config
                )
        run.say(f"removing {plan.summary()}{tag}")
        with run.timer("apply"):
            apply_plan(run.model, plan)
        run.plans.append(plan)
        if run.plugins.recovery is not None:
            if step == k:
                run.attempt("evaluation of the pruned model", run.evaluate, "pruned")
            run.recoveries.append(_recover(run, seed=run.recipe.calibration.seed + step))
    if not run.plans:
        raise ValueError(
            "targets: the selection removed nothing (targets too small for this model?)"
        )


def _plan(run: _Run, targets, scorers: dict[str, Any], step: int):
    """Score and select step ``step``; with ``--resume`` the scores an earlier run kept are
    selected from instead of computed (SLEB ``layer_steps`` re-scores: never cached)."""
    from prunekit.core.select import plan_for, select

    cache = run.cache if targets.layer_steps <= 1 else None
    kept = cache.load(step) if cache is not None and run.resume else None
    if kept is not None:
        run.say(f"reusing the scores of step {step} kept in {cache.dir} (--resume)")
        return select(kept, targets, scorers=scorers), kept
    plan, scores = plan_for(
        run.model, run.calib_ids, targets, progress=run.progress, scorers=scorers
    )
    if cache is not None:
        cache.save(step, scores)
    return plan, scores


def _teachers(run: _Run) -> dict:
    """Distillation from a cache: the dense model's top-k outputs on each recovery round's
    rows, computed before pruning, so no dense copy is kept (:mod:`prunekit.core.teacher_cache`)."""
    method, config = run.plugins.recovery, run.plugins.recovery_config
    if not uses_teacher_cache(method, config):
        return {}
    run.say("caching the dense model's top-k log-probabilities for distillation")
    with run.timer("teacher cache"):
        return teacher_caches(run.model, run.tokenizer, run.recipe, method, config)


def _recover(run: _Run, *, seed: int):
    """Recover the model with the recovery method object, on fresh calibration windows."""
    from prunekit.core.recovery import recover

    config = run.plugins.recovery_config
    calibration = dataclasses.replace(
        run.recipe.calibration,
        n_samples=getattr(config, "n_samples", 256),
        seq_len=getattr(config, "seq_len", 256),
        seed=seed,
    )
    cache = run.teachers.pop(seed, None)  # the dense model's outputs, cached before pruning
    with run.timer("calibration"):
        train_ids = cache.ids if cache else calibration.load(run.tokenizer, model=run.model)
    run.say(f"recovering with {run.plugins.recovery.name}")
    with run.timer("recover"):
        return recover(
            run.model,
            train_ids,
            config,
            teacher=cache or run.dense,
            progress=run.progress,
            method=run.plugins.recovery,
        )


def _quantize(run: _Run) -> nn.Module | None:
    """The quantized model (a new one), when the recipe quantizes."""
    quantizer = run.plugins.quantizer
    if quantizer is None:
        return None
    from prunekit.core.quantize import group_size_fit, quantize

    fit = group_size_fit(run.model, quantizer, run.plugins.quantize_config)[1]
    run.say(f"quantizing with {quantizer.name}" + (f" ({fit.note})" if fit else ""))
    with run.timer("quantize"):
        return quantize(
            run.model,
            run.tokenizer,
            quantizer,
            run.plugins.quantize_config,
            calib_ids=run.calib_ids,
        )


def _save(run: _Run, output_dir: Path, overwrite: bool, quantized, probe) -> CompressResult:
    """Write the model (quantized or not), its sidecar, the probe and the report."""
    model = run.model
    final = list(run.metrics)[-1]
    result = CompressResult(
        output_dir=output_dir,
        plans=run.plans,
        metrics=run.metrics,
        timings=run.timer.timings,
        layout="per_layer" if getattr(model.config, "is_heterogeneous", False) else "uniform",
        recovery=[r.to_dict() for r in run.recoveries],
    )

    def sidecar(directory: Path) -> dict[str, Any]:
        # called once the weights are written: their size goes with the final stage
        run.metrics[final]["size_on_disk_mb"] = weights_size_mb(directory)
        return {
            "recipe": run.recipe.to_dict(),
            "metrics": run.metrics,
            "timings": run.timer.timings,
            "scores": [s.to_dict() for s in run.scores],
            "recovery": result.recovery,
            "dense_layer_shapes": [s.to_dict() for s in run.dense_shapes],
        }

    run.say(f"saving to {output_dir}")
    with AtomicDir(output_dir, overwrite) as tmp:
        with run.timer("save"):
            if quantized is not None:
                from prunekit.core.quantize import save_quantized

                save_quantized(quantized, tmp, run.tokenizer, overwrite=True, extra=sidecar)
            else:
                save_pretrained(model, tmp, run.tokenizer, overwrite=True, extra=sidecar)
            if probe is not None:
                save_probe(tmp, probe)
    run.say(f"saved the compressed model to {output_dir}")
    return result


def _finish(run: _Run, result: CompressResult, quantized) -> None:
    """After the save: bring the sidecar's metrics up to date and write the report; when an
    optional stage failed, say so in both and raise :class:`StageFailedError` (the model is
    saved and complete either way)."""
    out = result.output_dir
    final_shapes = get_adapter(run.model).shapes(run.model)
    report = (out, result, run.recipe, run.scores, run.recoveries, run.dense_shapes, final_shapes)
    run.attempt("report", write_report, *report)
    result.report = out / "report.md"
    result.failures = dict(run.failures)
    run.attempt("sidecar update", _update_sidecar, out, run)
    if not run.failures:
        return
    lines = ["", "## Failed stages", "", "The compressed model was saved before these ran:", ""]
    lines += [f"- {stage}: {why}" for stage, why in run.failures.items()]
    with open(result.report, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("# prunekit report\n")
        f.write("\n".join(lines) + "\n")
    raise StageFailedError(str(out), run.failures, result=result)


def _update_sidecar(out: Path, run: _Run) -> None:
    """Rewrite ``prunekit.json`` with the metrics, timings and failures known after the save
    (atomically: a temporary file renamed over it)."""
    path = out / SIDECAR
    sidecar = json.loads(path.read_text(encoding="utf-8"))
    sidecar.update(metrics=run.metrics, timings=run.timer.timings, failures=run.failures)
    tmp = path.with_name(f".{SIDECAR}.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- helpers ---------------------------------------------------------------------------------
def _evaluate(model, tokenizer, run: _Run) -> dict[str, Any]:
    from prunekit.core.evaluate import evaluate

    kwargs = run.recipe.evaluation.evaluate_kwargs()
    kwargs["measure_latency"] = False  # timed side by side after the save (core.speed_stage)
    return evaluate(
        model,
        tokenizer,
        text=run.eval_text,
        dense_model=run.dense,
        progress=run.progress,
        **kwargs,
    )


__all__ = ["CompressResult", "Plugins", "compress", "preflight"]
