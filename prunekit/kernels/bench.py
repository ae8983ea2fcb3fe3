"""Time dense and pruned layer shapes: Triton kernels against torch.

A pruned model is only faster if its narrower matmuls and fewer heads are faster on the
hardware. :func:`bench_layer_shapes` times, for each distinct layer shape, the MLP and the
attention core with

- ``triton``: :func:`prunekit.kernels.gated_mlp` / :func:`~prunekit.kernels.gelu_mlp` /
  :func:`~prunekit.kernels.attention` (only on a CUDA GPU), and
- ``torch``: the same computation in torch (cuBLAS + SDPA on a GPU, torch's CPU kernels
  otherwise),

and reports, for every non-dense row, the measured speedup over the dense row of the same op
and provider next to the ideal speedup (the FLOP ratio). Widths that are not multiples of
64/128 get a ``rounding_note``; on a GPU the widths rounded up to those multiples are timed
too (``label == "rounded"`` rows), to show when a few more neurons or heads cost less time.

>>> rows = main_bench([
...     {"label": "dense", "hidden": 4096, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128,
...      "intermediate": 11008, "gated": True},
...     {"label": "pruned", "hidden": 4096, "n_heads": 24, "n_kv_heads": 6, "head_dim": 128,
...      "intermediate": 7706, "gated": True},
... ], "bench-out")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunekit.kernels.output import COLUMNS, format_table, plot, write_csv
from prunekit.kernels.shapes import (
    MULTIPLES,
    Case,
    KernelShape,
    attn_case,
    mlp_case,
    rounding_variants,
)
from prunekit.kernels.timing import (
    Runner,
    device_name,
    resolve_device,
    triton_runs,
    triton_version,
)

# COLUMNS, format_table, plot and write_csv live in prunekit.kernels.output and are re-exported
# here for `from prunekit.kernels.bench import ...`, as before the split.
__all__ = [
    "COLUMNS",
    "KernelShape",
    "bench_layer_shapes",
    "format_table",
    "main_bench",
    "plot",
    "stack_times",
    "write_csv",
]


# --------------------------------------------------------------------------------------------
# rounding notes
# --------------------------------------------------------------------------------------------
def _rounding_note(what, width, variants, timings_by_width, provider, on_gpu) -> str:
    if width % MULTIPLES[-1] == 0:
        return ""
    off = [m for m in MULTIPLES if width % m]
    head = f"{what}={width} is not a multiple of {' or '.join(map(str, off))}"
    if not on_gpu:
        targets: dict[int, list[str]] = {}
        for m, w, _ in variants:
            if w != width:
                targets.setdefault(w, []).append(f"x{m}")
        listed = ", ".join(f"{w} ({'/'.join(ms)})" for w, ms in targets.items())
        return f"{head}; not timed on CPU, compare with {listed} on a GPU"
    if provider not in timings_by_width[width]:
        return head
    base = timings_by_width[width][provider]["ms"]
    parts = []
    seen = set()
    for m, w, _ in variants:
        if w == width or w in seen or provider not in timings_by_width[w]:
            continue
        seen.add(w)
        ms = timings_by_width[w][provider]["ms"]
        extra = (w / width - 1) * 100
        verdict = "faster despite" if ms < base else "not faster with"
        parts.append(
            f"rounded up to {w} (x{m}): {ms:.3f} ms vs {base:.3f} ms, {verdict} {extra:+.1f}% FLOPs"
        )
    return head + "; " + "; ".join(parts)


def _rounding(runner: Runner, shape: KernelShape, case: Case) -> tuple[dict[str, str], list]:
    """({provider: note}, rounded cases to time as well) for a pruned width off the grid.

    On a GPU the widths rounded up to 64/128 are timed too; on a CPU the note only names them.
    """
    if shape.label == "dense":
        return {}, []
    what, width, variants = rounding_variants(shape, case)
    if width % MULTIPLES[-1] == 0:
        return {}, []
    on_gpu = runner.device.type == "cuda"
    by_width = {width: runner.timings(case)}
    extra: list[Case] = []
    if on_gpu:
        for _, w, rcase in variants:
            by_width[w] = runner.timings(rcase)
            if w != width and rcase not in extra:
                extra.append(rcase)
    notes = {
        p: _rounding_note(what, width, variants, by_width, p, on_gpu) for p in runner.providers
    }
    return notes, extra


# --------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------
#: The dimension columns of a row (tokens ... width); those of the other op stay None.
_DIMS = COLUMNS[COLUMNS.index("tokens") : COLUMNS.index("width") + 1]


def _case_columns(runner: Runner, case: Case) -> tuple[str, dict[str, Any]]:
    """(shape description, dimension columns) of a case."""
    if case.op == "attention":
        heads, kv_heads, head_dim, causal = case.dims
        desc = (
            f"b={runner.batch} t={runner.seq_len} heads={heads}/{kv_heads} d={head_dim}"
            f"{' causal' if causal else ''}"
        )
        given = {
            "batch": runner.batch,
            "seq_len": runner.seq_len,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "head_dim": head_dim,
            "causal": causal,
            "width": heads * head_dim,
        }
    else:
        hidden, inter = case.dims
        desc = f"tokens={runner.tokens} hidden={hidden} inter={inter}"
        given = {"tokens": runner.tokens, "hidden": hidden, "intermediate": inter, "width": inter}
    return desc, {k: given.get(k) for k in _DIMS}


def _case_rows(
    runner: Runner, label: str, case: Case, notes: dict[str, str], common: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per provider of ``case``, with the keys of :data:`COLUMNS`."""
    timings = runner.timings(case)
    flops = runner.flops(case)
    desc, dims = _case_columns(runner, case)
    return [
        {
            "label": label,
            "op": case.op,
            "shape": desc,
            "provider": provider,
            **dims,
            "flops": flops,
            "ms": t["ms"],
            "ms_p20": t["ms_p20"],
            "ms_p80": t["ms_p80"],
            "tflops": flops / (t["ms"] * 1e-3) / 1e12,
            "speedup_vs_dense": None,
            "ideal_speedup": None,
            "max_abs_err": t["max_abs_err"],
            "rounding_note": notes.get(provider, ""),
            **common,
        }
        for provider, t in timings.items()
    ]


def _fill_speedups(rows: list[dict[str, Any]]) -> None:
    """Measured (dense ms / ms) and ideal (dense FLOPs / FLOPs) speedups of non-dense rows."""
    dense = [r for r in rows if r["label"] == "dense"]
    for row in rows:
        if row["label"] == "dense":
            continue
        # the dense row of the same op, provider and unpruned dimensions (hidden for MLPs;
        # head_dim, causality and sequence for attention)
        keys = ("op", "provider", "hidden", "tokens", "head_dim", "causal", "seq_len", "batch")
        ref = next((d for d in dense if all(d[k] == row[k] for k in keys)), None)
        if ref is None:
            continue
        row["speedup_vs_dense"] = ref["ms"] / row["ms"]
        row["ideal_speedup"] = ref["flops"] / row["flops"]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _runner(tokens, seq_len, batch, device, repeats, dtype) -> Runner:
    """A Runner for validated arguments and the resolved device and dtype."""
    if tokens is None:
        tokens = batch * seq_len
    for name, value in (
        ("tokens", tokens),
        ("seq_len", seq_len),
        ("batch", batch),
        ("repeats", repeats),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return Runner(
        tokens=tokens, seq_len=seq_len, batch=batch, device=device, dtype=dtype, repeats=repeats
    )


def bench_layer_shapes(
    shapes: Iterable[KernelShape | Mapping[str, Any]],
    *,
    tokens: int | None = None,
    seq_len: int = 2048,
    batch: int = 1,
    device: str | torch.device | None = None,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Time the MLP and the attention core of each distinct layer shape.

    Args:
        shapes: :class:`~prunekit.kernels.shapes.KernelShape` objects, dicts or dataclasses
            with ``label`` ("dense" / "pruned"), ``hidden``, ``n_heads``, ``n_kv_heads``,
            ``head_dim``, ``intermediate``, ``gated`` and optionally ``causal`` (default:
            ``gated``).
        tokens: MLP rows; default ``batch * seq_len``.
        seq_len, batch: attention input is ``[batch, heads, seq_len, head_dim]``.
        device: default CUDA when available, else CPU. Triton is timed only on CUDA.
        repeats: timed runs on CPU (median reported); on a GPU ``do_bench`` picks the count.
        dtype: default float16 on a GPU, float32 on a CPU.

    Returns one dict per (label, op, shape, provider) with the keys in
    :data:`prunekit.kernels.output.COLUMNS`. Attention FLOPs count the ``q k^T`` and ``p v``
    matmuls only (projections are MLP-like matmuls whose widths the MLP rows already show).
    """
    shapes = [KernelShape.coerce(s) for s in shapes]
    if not shapes:
        raise ValueError("shapes is empty: give at least one layer shape")
    runner = _runner(tokens, seq_len, batch, device, repeats, dtype)
    common = {
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": device_name(runner.device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
    }
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, Case]] = set()
    for shape in shapes:
        for case in (mlp_case(shape), attn_case(shape)):
            if (shape.label, case) in seen:
                continue
            seen.add((shape.label, case))
            notes, extra = _rounding(runner, shape, case)
            rows += _case_rows(runner, shape.label, case, notes, common)
            for rcase in extra:
                if ("rounded", rcase) not in seen:
                    seen.add(("rounded", rcase))
                    rows += _case_rows(runner, "rounded", rcase, {}, common)
    _fill_speedups(rows)
    return rows


def stack_times(
    rows: list[dict[str, Any]], labelled: list[tuple[str, list[Any]]]
) -> list[tuple[str, str, float, int]]:
    """(label, provider, ms, flops) of MLP + attention core summed over every layer of each
    model, from the per-shape rows of :func:`bench_layer_shapes`."""
    totals = []
    for label, shapes in labelled:
        ms: dict[str, float] = {}
        flops: dict[str, int] = {}
        for s in shapes:
            for r in rows:
                if r["label"] != label:
                    continue
                if r["op"] == "attention":
                    match = (r["n_heads"], r["n_kv_heads"]) == (s.n_heads, s.n_kv_heads)
                else:
                    match = r["intermediate"] == s.intermediate
                if match:
                    ms[r["provider"]] = ms.get(r["provider"], 0.0) + r["ms"]
                    flops[r["provider"]] = flops.get(r["provider"], 0) + r["flops"]
        totals += [(label, p, ms[p], flops[p]) for p in ms]
    return totals


def main_bench(
    shapes: Iterable[KernelShape | Mapping[str, Any]], out_dir: str | os.PathLike, **kw: Any
) -> list[dict[str, Any]]:
    """Run :func:`bench_layer_shapes`, print the table, write kernels.csv and kernels.png.

    Keyword arguments go to :func:`bench_layer_shapes`. Returns the rows.
    """
    device = resolve_device(kw.get("device"))
    if device.type != "cuda":
        why = f"device {device}" if torch.cuda.is_available() else "no CUDA GPU found"
        print(f"{why}: timing the torch path only (the Triton kernels are timed on a GPU only)")
    elif not triton_runs(device):
        print("Triton is not installed: timing the torch path only")
    rows = bench_layer_shapes(shapes, **kw)
    print(format_table(rows))
    out_dir = Path(out_dir)
    csv_path = write_csv(rows, out_dir / "kernels.csv")
    png_path = plot(rows, out_dir / "kernels.png")
    print(f"wrote {csv_path} and {png_path}")
    return rows
