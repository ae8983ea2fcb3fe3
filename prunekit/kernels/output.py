"""What ``bench-kernels`` leaves behind: a text table, ``kernels.csv`` and ``kernels.png``.

Files are written to a temporary name next to the target and moved into place when complete.
The plot draws on a :class:`matplotlib.figure.Figure` with its own Agg canvas: no pyplot, no
process-wide backend switch.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "format_table", "plot", "write_csv"]

#: Column order of the rows (and of ``kernels.csv``).
COLUMNS = (
    "label",
    "op",
    "shape",
    "provider",
    "dtype",
    "tokens",
    "batch",
    "seq_len",
    "hidden",
    "intermediate",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "causal",
    "width",
    "flops",
    "ms",
    "ms_p20",
    "ms_p80",
    "tflops",
    "speedup_vs_dense",
    "ideal_speedup",
    "max_abs_err",
    "rounding_note",
    "device",
    "torch_version",
    "triton_version",
)
_COLORS = {"triton": "tab:orange", "torch": "tab:blue"}


# --------------------------------------------------------------------------------------------
# text table
# --------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table; rounding notes are listed under it as footnotes."""
    headers = ["label", "op", "shape", "provider", "ms", "TFLOP/s", "speedup", "ideal", "note"]
    body = []
    notes: list[str] = []
    for row in rows:
        mark = ""
        if row.get("rounding_note"):
            notes.append(row["rounding_note"])
            mark = f"[{len(notes)}]"
        body.append(
            [
                row["label"],
                row["op"],
                row["shape"],
                row["provider"],
                _fmt(row["ms"]),
                _fmt(row["tflops"], 2),
                _times(row["speedup_vs_dense"]),
                _times(row["ideal_speedup"]),
                mark,
            ]
        )
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]
    numeric = {4, 5, 6, 7}

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])] + [line(r) for r in body]
    if rows:
        first = rows[0]
        out.append(
            f"device: {first['device']}, dtype {first['dtype']}, torch "
            f"{first['torch_version']}, triton {first['triton_version']}"
        )
    out += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _atomic_target(path: Path) -> Path:
    """A temporary file next to ``path``; the caller moves it into place when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write rows to ``path`` (columns :data:`COLUMNS`, then any extra keys)."""
    path = Path(path)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    tmp = _atomic_target(path)
    try:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, *extra], restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _plot_times(ax: Any, rows: list[dict[str, Any]], names: list[str]) -> None:
    """Horizontal bars: ms per op/shape/provider, whiskers p20-p80."""
    ypos = list(range(len(rows)))
    xerr = [
        [max(r["ms"] - r["ms_p20"], 0.0) for r in rows],
        [max(r["ms_p80"] - r["ms"], 0.0) for r in rows],
    ]
    ax.barh(
        ypos,
        [r["ms"] for r in rows],
        xerr=xerr,
        capsize=2,
        color=[_COLORS.get(r["provider"], "tab:gray") for r in rows],
    )
    ax.set_yticks(ypos, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms (median, whiskers p20-p80)")
    device = rows[0]["device"] if rows else ""
    ax.set_title(f"time per op and shape ({device})")
    for provider, color in _COLORS.items():
        if any(r["provider"] == provider for r in rows):
            ax.barh([], [], color=color, label=provider)
    ax.legend(loc="lower right", fontsize=8)


def _plot_speedups(ax: Any, compared: list[tuple[str, dict[str, Any]]]) -> None:
    """Paired bars: measured vs ideal speedup of each non-dense row."""
    if compared:
        y = list(range(len(compared)))
        for offset, key, color, label in (
            (-0.2, "speedup_vs_dense", "tab:green", "measured"),
            (0.2, "ideal_speedup", "tab:gray", "ideal (FLOP ratio)"),
        ):
            values = [r[key] for _, r in compared]
            ax.barh([i + offset for i in y], values, height=0.4, color=color, label=label)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [n for n, _ in compared], fontsize=7)
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no dense row to compare with",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_yticks([])
    ax.set_xlabel("speedup vs dense (x)")
    ax.set_title("measured speedup vs ideal")


def plot(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: ms per op/shape/provider, and measured vs ideal speedup of the non-dense rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names = [f"{r['label']} {r['op']} {r['shape']} [{r['provider']}]" for r in rows]
    compared = [
        (n, r) for n, r in zip(names, rows, strict=True) if r["speedup_vs_dense"] is not None
    ]
    height = 2.0 + 0.32 * (len(rows) + len(compared))
    fig = Figure(figsize=(13, max(4.0, height)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_ms, ax_sp = fig.subplots(2, 1, height_ratios=[max(len(rows), 1), max(len(compared), 1)])
    _plot_times(ax_ms, rows, names)
    _plot_speedups(ax_sp, compared)
    tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
