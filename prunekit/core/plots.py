"""PNG plots of importance scores, and :func:`drawing`, the one way prunekit draws a figure.

- ``<layer scorer>.png``: per-layer bar chart (e.g. Block Influence) with protected layers
  hatched and the layers a plan removes in red;
- ``angular_distance.png``: the angular-distance heat map, block size n (rows) against start
  layer l (columns), as in Gromov et al. 2024 (Fig. 1), the removed block outlined;
- ``<head scorer>.png``: layer × query-head heat map, removed heads crossed out, KV-group
  boundaries drawn;
- ``<neuron scorer>.png``: per-layer distribution (5/25/50/75/95th percentiles) of the neuron
  scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from prunekit.core.plan import PrunePlan
from prunekit.core.scores import Scores


@contextmanager
def drawing(
    path: str | Path, figsize: tuple[float, float], *, dpi: int = 110, **subplots: Any
) -> Iterator[tuple[Any, Any]]:
    """``with drawing("x.png", (6, 4)) as (fig, ax):`` draw on ``ax``; on leaving, the figure
    is laid out and written to ``path``. ``subplots`` go to ``Figure.subplots`` (``nrows``,
    ``sharex``...). A :class:`matplotlib.figure.Figure` with its own Agg canvas: no pyplot, no
    display, and no process-wide backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    yield fig, fig.subplots(**subplots)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_scores(
    scores: Scores,
    plan: PrunePlan | None,
    out_dir: str | Path,
    *,
    targets=None,
) -> list[Path]:
    """Write one PNG per score present in ``scores`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pf = targets.protect_first if targets is not None else 1
    pl = targets.protect_last if targets is not None else 1
    written = []
    for name in scores:
        unit = scores.unit(name)
        path = out / f"{name}.png"
        if unit == "layers" and scores[name].dim() == 2:
            _angular(scores[name], plan, path)
        elif unit == "layers":
            _layer_bars(name, scores[name], plan, pf, pl, path)
        elif unit == "heads":
            _head_map(name, scores, plan, path)
        else:
            _neuron_quantiles(name, scores, plan, path)
        written.append(path)
    return written


def _layer_bars(name, values, plan, pf, pl, path):
    L = len(values)
    removed = set(plan.layers) if plan else set()
    protected = set(range(pf)) | set(range(L - pl, L))
    colors = ["tab:red" if i in removed else "tab:blue" for i in range(L)]
    with drawing(path, (max(6, L * 0.3), 3.6)) as (fig, ax):
        bars = ax.bar(range(L), values.tolist(), color=colors)
        for i in protected:
            bars[i].set_hatch("//")
            bars[i].set_edgecolor("grey")
            bars[i].set_facecolor("lightgrey")
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.set_xticks(range(L))
        ax.tick_params(axis="x", labelsize=7)
        from matplotlib.patches import Patch

        handles = [Patch(color="tab:blue", label="kept")]
        if removed:
            handles.append(Patch(color="tab:red", label="removed"))
        if protected:
            handles.append(
                Patch(facecolor="lightgrey", hatch="//", edgecolor="grey", label="protected")
            )
        ax.legend(handles=handles, fontsize=8)
        ax.set_title(f"{name} per layer (higher = keep)")


def _angular(matrix, plan, path):
    L = matrix.shape[0]
    with drawing(path, (max(6, L * 0.28), max(4.5, L * 0.22))) as (fig, ax):
        data = matrix.clone()
        im = ax.imshow(data.numpy(), origin="lower", aspect="auto", cmap="viridis_r")
        fig.colorbar(im, ax=ax, label="angular distance arccos(cos)/π")
        ax.set_xlabel("start layer l")
        ax.set_ylabel("block size n")
        ax.set_yticks(range(0, L, max(1, L // 10)))
        ax.set_yticklabels([str(n + 1) for n in range(0, L, max(1, L // 10))])
        if plan and plan.layers:
            n = len(plan.layers)
            start = plan.layers[0]
            contiguous = plan.layers == list(range(start, start + n))
            if contiguous:
                from matplotlib.patches import Rectangle

                ax.add_patch(
                    Rectangle((start - 0.5, n - 1 - 0.5), 1, 1, fill=False, ec="red", lw=2.5)
                )
                ax.set_title(f"angular distance; removed block: layers {start}..{start + n - 1}")
        if not ax.get_title():
            ax.set_title("angular distance d(x^l, x^(l+n)) (lower = more redundant block)")


def _head_map(name, scores, plan, path):
    rows = scores.layer_rows(name)
    width = max(len(r) for r in rows)
    grid = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    with drawing(path, (max(4, width * 0.45 + 2), max(4, len(rows) * 0.22))) as (fig, ax):
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", origin="lower")
        fig.colorbar(im, ax=ax, label=name)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        for i, s in enumerate(scores.shapes):
            for g in range(1, s.n_kv_heads):
                x = g * s.group_size - 0.5
                ax.plot([x, x], [i - 0.5, i + 0.5], color="white", lw=0.8)
        if plan:
            for i, heads in plan.heads.items():
                for h in heads:
                    ax.text(h, i, "×", ha="center", va="center", color="cyan", fontsize=8)
            for i in plan.layers:
                ax.axhspan(i - 0.5, i + 0.5, color="grey", alpha=0.6)
        ax.set_title(f"{name} per head (white lines: KV groups; × removed, grey: layer removed)")


def _neuron_quantiles(name, scores, plan, path):
    rows = scores.layer_rows(name)
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    table = torch.stack([torch.quantile(r.float(), qs) for r in rows])
    with drawing(path, (max(6, len(rows) * 0.3), 3.6)) as (fig, ax):
        x = range(len(rows))
        ax.fill_between(x, table[:, 0], table[:, 4], alpha=0.2, label="5-95%")
        ax.fill_between(x, table[:, 1], table[:, 3], alpha=0.4, label="25-75%")
        ax.plot(x, table[:, 2], marker=".", label="median")
        if plan:
            for i, n in plan.neurons.items():
                ax.annotate(f"-{len(n)}", (i, float(table[i, 2])), fontsize=6, color="red")
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
        ax.set_title(f"{name}: per-layer distribution over neurons (red: neurons removed)")


__all__ = ["drawing", "plot_scores"]
