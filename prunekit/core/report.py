"""The report written next to a compressed model: ``report.md`` (before/after table, what was
removed, settings, versions) and PNG plots. Every number in it is also in ``prunekit.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunekit.versions import versions


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_before_after(metrics: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Bars of each stage relative to the dense model for the headline metrics."""
    from prunekit.core.pipeline import flat_metrics

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
    plt = _plt()
    stages = list(flat)
    width = 0.8 / len(stages)
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 4))
    for j, stage in enumerate(stages):
        ratios = [(flat[stage].get(k) or 0) / dense[k] for k, _ in keys]
        xs = [i + (j - (len(stages) - 1) / 2) * width for i in range(len(keys))]
        bars = ax.bar(xs, ratios, width, label=stage)
        for bar, r in zip(bars, ratios, strict=True):
            if r:
                ax.annotate(
                    f"{r:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_ylabel("relative to dense")
    ax.set_title("Before / after (dense = 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_shapes(dense_shapes, final_shapes, plans, path: Path) -> Path:
    """Per original layer: query heads and MLP width kept (removed layers shown as 0)."""
    from prunekit.core.plan import PrunePlan

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
    plt = _plt()
    fig, (a1, a2) = plt.subplots(
        2, 1, figsize=(max(6, 0.3 * len(dense_shapes) + 2), 5), sharex=True
    )
    xs = range(len(dense_shapes))
    a1.bar(xs, [s.n_heads for s in dense_shapes], color="#ddd", label="dense")
    a1.bar(xs, heads, color="#3b75af", label="kept")
    a1.set_ylabel("query heads")
    a1.legend(fontsize=8)
    a2.bar(xs, [s.intermediate for s in dense_shapes], color="#ddd", label="dense")
    a2.bar(xs, width, color="#e1812c", label="kept")
    a2.set_ylabel("MLP width")
    a2.set_xlabel("layer (original index)")
    a1.set_title("What each layer keeps (missing bar: layer removed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    out_dir: Path, result, recipe, all_scores, recovery_results, dense_shapes, final_shapes
) -> Path:
    from prunekit.core.pipeline import result_table

    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    images: list[tuple[str, Path]] = []
    if all_scores:
        from prunekit.core.plots import plot_scores

        first_plan = result.plans[0] if result.plans else None
        for p in plot_scores(all_scores[0], first_plan, plots, targets=recipe.targets):
            images.append((Path(p).stem.replace("_", " "), Path(p)))
    p = plot_before_after(result.metrics, plots / "before_after.png")
    if p:
        images.append(("before / after", p))
    images.append(
        (
            "kept per layer",
            plot_layer_shapes(dense_shapes, final_shapes, result.plans, plots / "layer_shapes.png"),
        )
    )
    for i, rec in enumerate(recovery_results):
        path = plots / f"recovery_loss_{i + 1}.png"
        rec.plot(path)
        images.append((f"recovery loss (step {i + 1})", path))

    lines = [
        "# prunekit report",
        "",
        f"Layout: **{result.layout}**"
        + (
            " (loads with stock transformers)"
            if result.layout == "uniform"
            else " (load with `prunekit.load_pretrained`)"
        ),
        "",
        "## Before / after",
        "",
        result_table(result.metrics),
        "",
        "## What was removed",
        "",
    ]
    for i, plan in enumerate(result.plans):
        lines.append(f"- step {i + 1}: {plan.summary()}")
    lines += [
        "",
        f"Layers: {len(dense_shapes)} -> {len(final_shapes)}; query heads "
        f"{sum(s.n_heads for s in dense_shapes)} -> {sum(s.n_heads for s in final_shapes)}; "
        f"KV heads {sum(s.n_kv_heads for s in dense_shapes)} -> "
        f"{sum(s.n_kv_heads for s in final_shapes)}; MLP neurons "
        f"{sum(s.intermediate for s in dense_shapes)} -> "
        f"{sum(s.intermediate for s in final_shapes)}.",
        "",
        "## Plots",
        "",
    ]
    for title, path in images:
        lines.append(f"![{title}]({path.relative_to(out_dir)})")
        lines.append("")
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
