"""The report written next to a compressed model: ``report.md`` (before/after table, what was
removed, settings, versions) and PNG plots. Every number in it is also in ``prunekit.json``.

:func:`result_table` is the one metric table of prunekit: ``prunekit compress`` and
``prunekit eval`` print it, the report embeds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.core.plan import PrunePlan
from prunekit.core.plots import drawing, plot_scores
from prunekit.core.quant_groups import report_lines
from prunekit.core.serving import loadable_by
from prunekit.core.speed_report import SPEED_KEYS, draw_speed_bar, speed_notes, speed_rows
from prunekit.versions import versions

#: (label, key in :func:`flat_metrics`, format) of the rows of :func:`result_table`
TABLE_ROWS = [
    ("perplexity", "perplexity", "{:.2f}"),
    ("embedding cosine", "cosine", "{:.4f}"),
    ("parameters (M)", "params", lambda v: f"{v / 1e6:.2f}"),
    ("GFLOPs/token", "flops_per_token", lambda v: f"{v / 1e9:.3f}"),
    # median (min-max) over interleaved rounds, and the speedup vs dense (core.speed_report)
    ("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}"),
    ("decode tokens/s", "decode_tokens_per_s", "{:.1f}"),
    ("weights in memory (MB)", "weights_memory_mb", "{:.1f}"),
    ("weights on disk (MB)", "size_on_disk_mb", "{:.1f}"),
    # On CPU: the resident-set peak (VmHWM) of one latency run above the RSS before it,
    # measured after glibc's free heap went back to the kernel (evaluate.peak_memory).
    ("peak memory above weights (MB)", "peak_memory_mb", "{:.1f}"),
]


def flat_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """Flatten the nested metric dict of :func:`prunekit.core.evaluate.evaluate` to its leaf
    keys (the first occurrence of a key wins)."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif k not in out:
                out[k] = v

    walk(m)
    return out


def result_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the headline metrics, one column per stage (or model); rows no
    column has are left out."""
    stages = list(metrics)
    flat = [flat_metrics(metrics[s]) for s in stages]
    lines = [f"| metric | {' | '.join(stages)} |", "|---" * (len(stages) + 1) + "|"]
    for label, key, fmt in TABLE_ROWS:
        if key in SPEED_KEYS:
            lines += speed_rows(key, [metrics[s] for s in stages])
            continue
        values = [f.get(key) for f in flat]
        if all(v is None for v in values):
            continue
        cells = ["–" if v is None else fmt(v) if callable(fmt) else fmt.format(v) for v in values]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_before_after(metrics: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of each stage relative to the dense model for the headline metrics."""
    keys = [
        ("params", "parameters"),
        ("flops_per_token", "FLOPs/token"),
        ("perplexity", "perplexity"),
        ("cosine", "embedding cos"),
        ("prefill_tokens_per_s", "prefill tok/s"),
        ("decode_tokens_per_s", "decode tok/s"),
    ]
    flat = {stage: flat_metrics(m) for stage, m in metrics.items()}
    dense = flat.get("dense", {})
    keys = [(k, label) for k, label in keys if dense.get(k)]
    if not keys:
        return None
    width = 0.8 / len(flat)
    with drawing(path, (1.6 * len(keys) + 2, 4), dpi=120) as (_, ax):
        for j, stage in enumerate(flat):
            measured = [k in SPEED_KEYS and stage != "dense" for k, _ in keys]  # speedups
            ratios = [
                0 if m else (flat[stage].get(k) or 0) / dense[k]
                for (k, _), m in zip(keys, measured, strict=True)
            ]
            xs = [i + (j - (len(flat) - 1) / 2) * width for i in range(len(keys))]
            bars = ax.bar(xs, ratios, width, label=stage)
            for (k, _), x, m in zip(keys, xs, measured, strict=True):
                if m:
                    draw_speed_bar(ax, x, width, metrics[stage], k, bars.patches[0].get_facecolor())
            for bar, r in zip(bars, ratios, strict=True):
                if r:
                    x = bar.get_x() + bar.get_width() / 2
                    ax.annotate(f"{r:.2f}", (x, r), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(keys)), [label for _, label in keys])
        ax.set_ylabel("relative to dense")
        ax.set_title("Before / after (dense = 1)")
        ax.legend(fontsize=8)
    return path


def plot_layer_shapes(dense_shapes, final_shapes, plans, path: Path) -> Path:
    """Per original layer: query heads and MLP width kept (removed layers shown as 0)."""
    kept = list(range(len(dense_shapes)))
    for plan in plans:  # map the final layers back to original indices
        plan = plan if isinstance(plan, PrunePlan) else PrunePlan.from_dict(plan)
        gone = set(plan.layers)
        kept = [orig for i, orig in enumerate(kept) if i not in gone]
    heads = [0] * len(dense_shapes)
    width = [0] * len(dense_shapes)
    for orig, shape in zip(kept, final_shapes, strict=True):
        heads[orig] = shape.n_heads
        width[orig] = shape.intermediate
    xs = range(len(dense_shapes))
    size = (max(6, 0.3 * len(dense_shapes) + 2), 5)
    with drawing(path, size, dpi=120, nrows=2, sharex=True) as (_, (a1, a2)):
        a1.bar(xs, [s.n_heads for s in dense_shapes], color="#ddd", label="dense")
        a1.bar(xs, heads, color="#3b75af", label="kept")
        a1.set_ylabel("query heads")
        a1.legend(fontsize=8)
        a2.bar(xs, [s.intermediate for s in dense_shapes], color="#ddd", label="dense")
        a2.bar(xs, width, color="#e1812c", label="kept")
        a2.set_ylabel("MLP width")
        a2.set_xlabel("layer (original index)")
        a1.set_title("What each layer keeps (missing bar: layer removed)")
    return path


def _plots(out_dir: Path, result, recipe, all_scores, recoveries, dense_shapes, final_shapes):
    """Write every plot of the report; return ``(title, path)`` pairs."""
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    images: list[tuple[str, Path]] = []
    if all_scores:
        first_plan = result.plans[0] if result.plans else None
        for p in plot_scores(all_scores[0], first_plan, plots, targets=recipe.targets):
            images.append((Path(p).stem.replace("_", " "), Path(p)))
    p = plot_before_after(result.metrics, plots / "before_after.png")
    if p:
        images.append(("before / after", p))
    path = plots / "layer_shapes.png"
    plot_layer_shapes(dense_shapes, final_shapes, result.plans, path)
    images.append(("kept per layer", path))
    for i, rec in enumerate(recoveries):
        path = plots / f"recovery_loss_{i + 1}.png"
        rec.plot(path)
        images.append((f"recovery loss and learning rate (step {i + 1})", path))
    return images


def _totals(dense_shapes, final_shapes) -> str:
    def total(shapes, attr: str) -> int:
        return sum(getattr(s, attr) for s in shapes)

    parts = [f"Layers: {len(dense_shapes)} -> {len(final_shapes)}"]
    for label, attr in (
        ("query heads", "n_heads"),
        ("KV heads", "n_kv_heads"),
        ("MLP neurons", "intermediate"),
    ):
        parts.append(f"{label} {total(dense_shapes, attr)} -> {total(final_shapes, attr)}")
    return "; ".join(parts) + "."


def _loads_in(out_dir: Path) -> list[str]:
    """The "Loads in" line: the runtimes that load the saved result (``loadable_by``)."""
    if not (out_dir / "config.json").is_file():
        return []
    return [f"Loads in: {', '.join(loadable_by(out_dir))}", ""]


def write_report(
    out_dir: Path, result, recipe, all_scores, recoveries, dense_shapes, final_shapes
) -> Path:
    """Write ``report.md`` and its plots into ``out_dir``; return the report's path."""
    out_dir = Path(out_dir)
    images = _plots(out_dir, result, recipe, all_scores, recoveries, dense_shapes, final_shapes)
    loads = (
        "loads with stock transformers"
        if result.layout == "uniform"
        else "load with `prunekit.load_pretrained`"
    )
    lines = [
        "# prunekit report",
        "",
        f"Layout: **{result.layout}** ({loads})",
        "",
        *_loads_in(out_dir),
        "## Before / after",
        "",
        result_table(result.metrics),
        "",
        *speed_notes(result.metrics),
        "## What was removed",
        "",
        *(f"- step {i + 1}: {plan.summary()}" for i, plan in enumerate(result.plans)),
        "",
        _totals(dense_shapes, final_shapes),
        "",
        *(f"- recovery (step {i + 1}): {rec.summary()}" for i, rec in enumerate(recoveries)),
        *([""] if recoveries else []),
        *report_lines(out_dir),  # the quantization section, when quantized
        "## Plots",
        "",
    ]
    for title, path in images:
        lines += [f"![{title}]({path.relative_to(out_dir)})", ""]
    lines += [
        "## Settings",
        "",
        "```json",
        json.dumps(recipe.to_dict(), indent=2),
        "```",
        "",
        "## Timings (s)",
        "",
        ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()),
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "Machine-readable: `prunekit.json` (plans, scores, metrics, recipe, versions); "
        "`probe/probe.safetensors` holds input ids and the saved model's outputs on them.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
