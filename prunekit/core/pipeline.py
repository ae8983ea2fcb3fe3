"""``prunekit.compress``: load -> evaluate dense -> calibrate -> (score -> select -> [heal ->]
apply [-> recover]) x iterative -> evaluate -> [quantize -> evaluate] -> save -> report, in that
fixed order (prune -> recover -> quantize).

Everything that can fail on bad input (recipe fields, plugin names and options, backend
availability, text files, the output directory) is checked by :func:`preflight` before the
model is loaded; it resolves every plugin name to its object once, and the stages below hold
the objects. The output is written to a temporary directory and moved into place only when
complete.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.contracts import check_available
from prunekit.core.heal import get_healer
from prunekit.core.io import (
    AtomicDir,
    check_output_dir,
    load_model,
    save_pretrained,
    weights_size_mb,
)
from prunekit.core.plan import PrunePlan
from prunekit.core.recipe import Recipe
from prunekit.core.report import write_report
from prunekit.core.surgery import apply_plan
from prunekit.core.targets import Targets, resolve_scorers, scorer_configs
from prunekit.plugins import get_adapter, get_plugins

PROBE_TOKENS = 16


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "plans": [p.to_dict() for p in self.plans],
            "metrics": self.metrics,
            "timings": self.timings,
            "layout": self.layout,
            "recovery": self.recovery,
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


class _Timer:
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


@dataclass
class _Run:
    """The state one :func:`compress` call passes from stage to stage."""

    recipe: Recipe
    plugins: Plugins
    model: nn.Module
    tokenizer: Any
    dense: nn.Module | None  # a copy of the dense model, when a stage needs it
    dense_shapes: list
    timer: _Timer
    progress: bool
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    calib_ids: torch.Tensor | None = None
    plans: list[PrunePlan] = field(default_factory=list)
    scores: list = field(default_factory=list)
    recoveries: list = field(default_factory=list)

    def say(self, message: str) -> None:
        if self.progress:
            print(f"[prunekit] {message}", flush=True)

    def evaluate(self, stage: str, model: nn.Module | None = None) -> None:
        """Evaluate ``model`` (default: the model being compressed) as ``stage``."""
        self.say(f"evaluating the {stage} model")
        with self.timer("evaluate"):
            self.metrics[stage] = _evaluate(model or self.model, self.tokenizer, self)


# ---- preflight -----------------------------------------------------------------------------
def preflight(recipe: Recipe) -> Plugins:
    """Check plugin names, options, backend availability and text files before any model is
    loaded, and resolve every plugin name to its object (once)."""
    t = recipe.targets
    if not (t.layers or t.heads or t.neurons):
        raise ValueError("targets: nothing to remove; give layers, heads or neurons (> 0)")
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
        check_available(plugins.quantizer, "quantizer")
        plugins.quantize_config = recipe.quantize.config(plugins.quantizer)
    _check_texts(recipe)
    return plugins


def _check_texts(recipe: Recipe) -> None:
    from prunekit.core.data import brown_path, wikitext2_test_path

    source = recipe.calibration.source
    if source is None:
        brown_path()
    elif source != "self" and Path(source).suffix and not Path(source).exists():
        raise FileNotFoundError(f"calibration.source: {source} not found")
    text = recipe.evaluation.text
    if text is None:
        wikitext2_test_path()
    elif not Path(text).is_file():
        raise FileNotFoundError(f"evaluation.text: {text} not found")


def _eval_text(recipe: Recipe) -> Path:
    from prunekit.core.data import wikitext2_test_path

    return Path(recipe.evaluation.text) if recipe.evaluation.text else wikitext2_test_path()


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
) -> CompressResult:
    """Compress a model with a recipe and save the result, the report and the evidence.

    ``model_or_path``: an ``nn.Module`` (then pass ``tokenizer``; it is modified in place),
    a model directory, a hub id, or a ``.gguf`` file. ``recipe``: a :class:`Recipe`, a dict,
    or a YAML/JSON file. ``sequential`` (default: ``recipe.sequential``): never build the
    model; score layer by layer from the directory's safetensors and stream the plan to the
    output (see :mod:`prunekit.core.sequential`).
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_file(recipe)
    if sequential if sequential is not None else recipe.sequential:
        from prunekit.core.sequential import compress_sequential

        return compress_sequential(
            model_or_path, recipe, output_dir, overwrite=overwrite, progress=progress
        )
    output_dir = check_output_dir(output_dir, overwrite)
    plugins = preflight(recipe)
    run = _load(model_or_path, tokenizer, gguf_file, recipe, plugins, progress)
    run.evaluate("dense")
    if not isinstance(model_or_path, nn.Module) and Path(model_or_path).is_dir():
        run.metrics["dense"]["size_on_disk_mb"] = weights_size_mb(model_or_path)
    with run.timer("calibration"):
        run.calib_ids = recipe.calibration.load(run.tokenizer, model=run.model)
    _prune(run)
    run.evaluate("recovered" if plugins.recovery else "pruned")
    probe = _probe(run.model, run.tokenizer, recipe)
    quantized = _quantize(run)
    return _save(run, output_dir, overwrite, quantized, probe)


def _load(model_or_path, tokenizer, gguf_file, recipe, plugins, progress) -> _Run:
    """Load the model (unless given one), check it can be pruned, keep a dense copy when a
    stage needs one (encoder evaluation, a recovery method with a teacher)."""
    timer = _Timer()
    with timer("load"):
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            if progress:
                print(f"[prunekit] loading {model_or_path}", flush=True)
            model, tokenizer = load_model(model_or_path, gguf_file=gguf_file)
    if tokenizer is None:
        raise ValueError("tokenizer: pass the tokenizer along with an in-memory model")
    adapter = get_adapter(model)  # unsupported architecture fails here, before any work
    _refuse_quantized(model)
    model.eval()
    teacher = getattr(plugins.recovery, "uses_teacher", False)
    dense = copy.deepcopy(model) if not adapter.causal or teacher else None
    return _Run(recipe, plugins, model, tokenizer, dense, adapter.shapes(model), timer, progress)


def _prune(run: _Run) -> None:
    """``recipe.iterative`` rounds of score -> select -> apply (-> recover)."""
    from prunekit.core.select import plan_for

    k = run.recipe.iterative
    dense_counts = _counts(run.dense_shapes)
    for step in range(1, k + 1):
        targets = _step_targets(run.recipe.targets, k, step, dense_counts, run.model)
        scorers = {u: s for u, s in run.plugins.scorers.items() if getattr(targets, u)}
        tag = f" (step {step}/{k})" if k > 1 else ""
        run.say(f"scoring and selecting{tag}")
        with run.timer("score+select"):
            plan, scores = plan_for(
                run.model, run.calib_ids, targets, progress=run.progress, scorers=scorers
            )
        run.scores.append(scores)
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
                run.evaluate("pruned")
            run.recoveries.append(_recover(run, seed=run.recipe.calibration.seed + step))
    if not run.plans:
        raise ValueError(
            "targets: the selection removed nothing (targets too small for this model?)"
        )


def _counts(shapes: list) -> dict[str, int]:
    return {
        "layers": len(shapes),
        "heads": sum(s.n_heads for s in shapes),
        "neurons": sum(s.intermediate for s in shapes),
    }


def _step_targets(t: Targets, k: int, step: int, dense_counts: dict[str, int], model) -> Targets:
    """Targets for iteration ``step`` (1-based) of ``k`` (the recipe's ``iterative``).

    The cumulative goal grows linearly with the step: after step s of k, a fraction s/k of
    each target is removed. Layers are counted against the dense layer count; heads and
    neurons as a fraction of those of the kept layers (the selection's rule), so each step asks
    for the fraction of the *current* model that reaches the cumulative goal."""
    if k == 1:
        return t
    shapes = get_adapter(model).shapes(model)
    n_layers0 = dense_counts["layers"]
    changes: dict[str, Any] = {}
    for unit in ("layers", "heads", "neurons"):
        goal = getattr(t, unit)
        total0 = dense_counts[unit]
        goal_frac = goal if isinstance(goal, float) else goal / total0
        cum = goal_frac * step / k
        if unit == "layers":
            todo = round(cum * n_layers0) - (n_layers0 - len(shapes))
            changes[unit] = max(todo, 0)
            continue
        per_layer0 = total0 / n_layers0
        current = sum(getattr(s, "n_heads" if unit == "heads" else "intermediate") for s in shapes)
        done = 1 - current / (per_layer0 * len(shapes))
        changes[unit] = max(0.0, (cum - done) / (1 - done)) if done < 1 else 0.0
    return dataclasses.replace(t, **changes)


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
    with run.timer("calibration"):
        train_ids = calibration.load(run.tokenizer, model=run.model)
    run.say(f"recovering with {run.plugins.recovery.name}")
    with run.timer("recover"):
        return recover(
            run.model,
            train_ids,
            config,
            teacher=run.dense,
            progress=run.progress,
            method=run.plugins.recovery,
        )


def _quantize(run: _Run) -> nn.Module | None:
    """The quantized model (a new one) and its evaluation, when the recipe quantizes."""
    quantizer = run.plugins.quantizer
    if quantizer is None:
        return None
    from prunekit.core.quantize import quantize

    run.say(f"quantizing with {quantizer.name}")
    with run.timer("quantize"):
        quantized = quantize(
            run.model,
            run.tokenizer,
            quantizer,
            run.plugins.quantize_config,
            calib_ids=run.calib_ids,
        )
    run.evaluate("quantized", quantized)
    return quantized


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
            _save_probe(tmp, probe)
        final_shapes = get_adapter(model).shapes(model)
        write_report(
            tmp, result, run.recipe, run.scores, run.recoveries, run.dense_shapes, final_shapes
        )
    result.report = output_dir / "report.md"
    return result


# ---- helpers ---------------------------------------------------------------------------------
def _evaluate(model, tokenizer, run: _Run) -> dict[str, Any]:
    from prunekit.core.evaluate import evaluate

    ev = run.recipe.evaluation
    window = ("context_len", "max_tokens", "max_chars")
    speed = ("prompt_len", "new_tokens", "repeats")
    return evaluate(
        model,
        tokenizer,
        text=_eval_text(run.recipe),
        dense_model=run.dense,
        latency_kwargs={name: getattr(ev, name) for name in speed},
        measure_latency=ev.latency,
        progress=run.progress,
        **{name: getattr(ev, name) for name in window},
    )


def _refuse_quantized(model: nn.Module) -> None:
    from prunekit.core.quant_marks import is_quantized
    from prunekit.errors import PruningPlanError

    if is_quantized(model):
        raise PruningPlanError(
            "the model is quantized; packed low-bit weights cannot be sliced. Compress the "
            "unquantized model and add --quantize (prune -> recover -> quantize)",
            entry="model",
        )


def _probe(model, tokenizer, recipe: Recipe) -> dict[str, torch.Tensor]:
    """A few tokens of the evaluation text and the model's logits on them, saved with the
    result so that anyone can check a reload gives the same numbers."""
    text = _eval_text(recipe).read_text(encoding="utf-8")[:2000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROBE_TOKENS]
    with torch.no_grad():
        out = model(input_ids=ids)
    values = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return {"input_ids": ids.contiguous(), "output": values.float().contiguous()}


def _save_probe(out_dir: Path, probe: dict[str, torch.Tensor]) -> None:
    # In a sub-folder: servers glob *.safetensors at the top level as weights.
    from safetensors.torch import save_file

    (out_dir / "probe").mkdir(exist_ok=True)
    save_file(probe, str(out_dir / "probe" / "probe.safetensors"))


__all__ = ["CompressResult", "Plugins", "compress", "preflight"]
