"""``prunekit.compress``: load -> evaluate dense -> score -> select -> apply -> [recover] ->
[quantize] -> evaluate -> save -> report, in that fixed order (prune -> recover -> quantize).

Everything that can fail on bad input (recipe fields, plugin names, backend availability,
text files, the output directory) is checked before the model is loaded; the output is
written to a temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.io import AtomicDir, check_output_dir, load_model, save_pretrained
from prunekit.core.plan import PrunePlan
from prunekit.core.recipe import Recipe
from prunekit.core.surgery import apply_plan
from prunekit.plugins import get_adapter, get_plugins

log = logging.getLogger(__name__)

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


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[prunekit] {message}", flush=True)


def preflight(recipe: Recipe) -> None:
    """Check plugin names, backend availability and text files before any model is loaded."""
    from prunekit.core.data import brown_path, wikitext2_test_path

    plugins = get_plugins()
    t = recipe.targets
    wanted = []
    if t.layers:
        wanted.append(t.layer_scorer)
    if t.heads:
        wanted.append(t.head_scorer)
    if t.neurons:
        wanted.append(t.neuron_scorer)
    for name in wanted:
        plugins.scorers.get(name)  # RegistryError lists the valid scorers
    if not (t.layers or t.heads or t.neurons):
        raise ValueError("targets: nothing to remove; give layers, heads or neurons (> 0)")
    for section, registry in (
        (recipe.recovery, plugins.recoveries),
        (recipe.quantize, plugins.quantizers),
    ):
        if section.method is None:
            continue
        plugin = registry.get(section.method)
        # Quantizers answer (ok, reason); recovery methods a bool plus ``requirements``.
        ok = plugin.available()
        ok, why = ok if isinstance(ok, tuple) else (ok, getattr(plugin, "requirements", ""))
        if not ok:
            raise RuntimeError(f"{registry.kind} {section.method!r} is not usable here: {why}")
        section.config()  # validates the plugin's config (errors name the field)
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


def _evaluate(model, tokenizer, recipe: Recipe, dense, progress: bool) -> dict[str, Any]:
    from prunekit.core.evaluate import evaluate

    ev = recipe.evaluation
    return evaluate(
        model,
        tokenizer,
        text=_eval_text(recipe),
        dense_model=dense,
        context_len=ev.context_len,
        max_tokens=ev.max_tokens,
        max_chars=ev.max_chars,
        latency_kwargs={
            "prompt_len": ev.prompt_len,
            "new_tokens": ev.new_tokens,
            "repeats": ev.repeats,
        },
        measure_latency=ev.latency,
        progress=progress,
    )


def _step_targets(recipe: Recipe, step: int, dense_counts: dict[str, int], model) -> Any:
    """Targets for iteration ``step`` (1-based) of ``recipe.iterative``.

    The cumulative goal grows linearly with the step: after step s of k, a fraction s/k of
    each target is removed. Layers are counted against the dense layer count; heads and
    neurons as a fraction of those of the kept layers (the selection's rule), so each step asks
    for the fraction of the *current* model that reaches the cumulative goal."""
    from prunekit.core.select import Targets

    t = recipe.targets
    k = recipe.iterative
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
    return Targets.from_dict({**t.to_dict(), **changes})


def compress(
    model_or_path: nn.Module | str | Path,
    recipe: Recipe | dict | str | Path,
    output_dir: str | Path,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    gguf_file: str | None = None,
    progress: bool = True,
) -> CompressResult:
    """Compress a model with a recipe and save the result, the report and the evidence.

    ``model_or_path``: an ``nn.Module`` (then pass ``tokenizer``; it is modified in place),
    a model directory, a hub id, or a ``.gguf`` file. ``recipe``: a :class:`Recipe`, a dict,
    or a YAML/JSON file.
    """
    from prunekit.core.select import plan_for

    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else Recipe.from_file(recipe)
    output_dir = check_output_dir(output_dir, overwrite)
    preflight(recipe)
    timer = _Timer()

    with timer("load"):
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            _say(progress, f"loading {model_or_path}")
            model, tokenizer = load_model(model_or_path, gguf_file=gguf_file)
    if tokenizer is None:
        raise ValueError("tokenizer: pass the tokenizer along with an in-memory model")
    adapter = get_adapter(model)  # unsupported architecture fails here, before any work
    _refuse_quantized(model)
    model.eval()
    dense_shapes = adapter.shapes(model)
    dense_counts = {
        "layers": len(dense_shapes),
        "heads": sum(s.n_heads for s in dense_shapes),
        "neurons": sum(s.intermediate for s in dense_shapes),
    }
    needs_dense = not adapter.causal or recipe.recovery.method == "distill"
    dense = copy.deepcopy(model) if needs_dense else None

    metrics: dict[str, dict[str, Any]] = {}
    _say(progress, "evaluating the dense model")
    with timer("evaluate"):
        metrics["dense"] = _evaluate(model, tokenizer, recipe, dense, progress)
    if not isinstance(model_or_path, nn.Module) and Path(model_or_path).is_dir():
        metrics["dense"]["size_on_disk_mb"] = weights_on_disk_mb(Path(model_or_path))

    with timer("calibration"):
        calib_ids = recipe.calibration.load(tokenizer, model=model)
    plans: list[PrunePlan] = []
    all_scores = []
    recovery_results = []
    for step in range(1, recipe.iterative + 1):
        targets = _step_targets(recipe, step, dense_counts, model)
        tag = f" (step {step}/{recipe.iterative})" if recipe.iterative > 1 else ""
        _say(progress, f"scoring and selecting{tag}")
        with timer("score+select"):
            plan, scores = plan_for(model, calib_ids, targets, progress=progress)
        all_scores.append(scores)
        if plan.is_empty():
            _say(progress, f"nothing left to remove{tag}")
            continue
        _say(progress, f"removing {plan.summary()}{tag}")
        with timer("apply"):
            apply_plan(model, plan)
        plans.append(plan)
        if recipe.recovery.method is not None:
            if step == recipe.iterative:
                _say(progress, "evaluating the pruned model before recovery")
                with timer("evaluate"):
                    metrics["pruned"] = _evaluate(model, tokenizer, recipe, dense, progress)
            recovery_results.append(
                _recover(
                    model,
                    tokenizer,
                    recipe,
                    dense,
                    calib_seed=recipe.calibration.seed + step,
                    timer=timer,
                    progress=progress,
                )
            )
    if not plans:
        raise ValueError(
            "targets: the selection removed nothing (targets too small for this model?)"
        )
    stage = "recovered" if recipe.recovery.method else "pruned"
    _say(progress, f"evaluating the {stage} model")
    with timer("evaluate"):
        metrics[stage] = _evaluate(model, tokenizer, recipe, dense, progress)

    layout = "per_layer" if getattr(model.config, "is_heterogeneous", False) else "uniform"
    probe = _probe(model, tokenizer, recipe)
    quantized = None
    if recipe.quantize.method is not None:
        from prunekit.quantizers.base import quantize

        _say(progress, f"quantizing with {recipe.quantize.method}")
        with timer("quantize"):
            quantized = quantize(
                model,
                tokenizer,
                recipe.quantize.method,
                recipe.quantize.config(),
                calib_ids=calib_ids,
            )
        with timer("evaluate"):
            metrics["quantized"] = _evaluate(quantized, tokenizer, recipe, None, progress)

    recovery_log = [r.to_dict() for r in recovery_results]
    sidecar = {
        "recipe": recipe.to_dict(),
        "metrics": metrics,
        "timings": timer.timings,
        "scores": [s.to_dict() for s in all_scores],
        "recovery": recovery_log,
        "dense_layer_shapes": [s.to_dict() for s in dense_shapes],
    }
    _say(progress, f"saving to {output_dir}")
    with AtomicDir(output_dir, overwrite) as tmp:
        with timer("save"):
            if quantized is not None:
                from prunekit.quantizers.base import save_quantized

                save_quantized(quantized, tmp, tokenizer, overwrite=True, extra=sidecar)
            else:
                save_pretrained(model, tmp, tokenizer, overwrite=True, extra=sidecar)
            _save_probe(tmp, probe)
        # The size of what was written, recorded next to the final stage's metrics.
        final = "quantized" if quantized is not None else stage
        metrics[final]["size_on_disk_mb"] = weights_on_disk_mb(tmp)
        _patch_sidecar(tmp, {"metrics": metrics})
        from prunekit.core.report import write_report

        result = CompressResult(
            output_dir=output_dir,
            plans=plans,
            metrics=metrics,
            timings=timer.timings,
            layout=layout,
            recovery=recovery_log,
        )
        write_report(
            tmp, result, recipe, all_scores, recovery_results, dense_shapes, adapter.shapes(model)
        )
    result.report = output_dir / "report.md"
    return result


def _refuse_quantized(model: nn.Module) -> None:
    from prunekit.errors import PruningPlanError
    from prunekit.quantizers.base import is_quantized

    if is_quantized(model):
        raise PruningPlanError(
            "the model is quantized; packed low-bit weights cannot be sliced. Compress the "
            "unquantized model and add --quantize (prune -> recover -> quantize)",
            entry="model",
        )


def weights_on_disk_mb(directory: Path) -> float | None:
    """Size of the weight files (``*.safetensors``, ``*.bin``, ``*.pt`` at the top level) of
    a model directory, in MiB; ``None`` when it has none."""
    files = [f for pat in ("*.safetensors", "*.bin", "*.pt") for f in directory.glob(pat)]
    return sum(f.stat().st_size for f in files) / 2**20 if files else None


def _patch_sidecar(directory: Path, values: dict[str, Any]) -> None:
    import json

    from prunekit.core.io import SIDECAR

    path = directory / SIDECAR
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _recover(model, tokenizer, recipe: Recipe, dense, *, calib_seed: int, timer, progress):
    from prunekit.core.calibration import load_calibration
    from prunekit.core.recovery import recover

    config = recipe.recovery.config()
    n_train = getattr(config, "n_samples", 256)
    seq_len = getattr(config, "seq_len", 256)
    with timer("calibration"):
        train_ids = load_calibration(
            recipe.calibration.source,
            tokenizer,
            n_samples=n_train,
            seq_len=seq_len,
            seed=calib_seed,
            model=model,
        )
    _say(progress, f"recovering with {recipe.recovery.method}")
    with timer("recover"):
        return recover(model, train_ids, config, teacher=dense, progress=progress)


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


def result_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A plain-text before/after table of the headline metrics."""
    rows = [
        ("perplexity", "perplexity", "{:.2f}"),
        ("embedding cosine", "cosine", "{:.4f}"),
        ("parameters (M)", "params", lambda v: f"{v / 1e6:.2f}"),
        ("GFLOPs/token", "flops_per_token", lambda v: f"{v / 1e9:.3f}"),
        ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
        ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
        ("weights in memory (MB)", "weights_memory_mb", "{:.1f}"),
        ("weights on disk (MB)", "size_on_disk_mb", "{:.1f}"),
        # On CPU: the resident-set peak (VmHWM) of one latency run above the RSS before it,
        # measured after glibc's free heap went back to the kernel (evaluate.peak_memory).
        ("peak memory above weights (MB)", "peak_memory_mb", "{:.1f}"),
    ]
    stages = list(metrics)
    lines = [f"| metric | {' | '.join(stages)} |", "|---" * (len(stages) + 1) + "|"]
    for label, key, fmt in rows:
        values = [flat_metrics(metrics[s]).get(key) for s in stages]
        if all(v is None for v in values):
            continue
        cells = []
        for v in values:
            if v is None:
                cells.append("–")
            else:
                cells.append(fmt(v) if callable(fmt) else fmt.format(v))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def flat_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """Flatten the nested metric dict of :func:`prunekit.core.evaluate.evaluate` to the keys
    the report uses."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif k not in out:
                out[k] = v

    walk(m)
    return out


def _asdict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
