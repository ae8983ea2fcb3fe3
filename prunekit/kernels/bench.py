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

import csv
import dataclasses
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prunekit.kernels.reference import (
    attention_flops,
    attention_reference,
    gated_mlp_reference,
    gelu_mlp_reference,
    mlp_flops,
)

__all__ = ["LayerShape", "bench_layer_shapes", "format_table", "main_bench", "plot", "write_csv"]

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
_MULTIPLES = (64, 128)


@dataclass(frozen=True)
class LayerShape:
    """The dimensions of one transformer layer, as a pruning plan leaves them."""

    label: str = field(metadata={"help": "'dense' for the reference shape, 'pruned' otherwise"})
    hidden: int = field(metadata={"help": "model width (hidden_size), >= 1"})
    n_heads: int = field(metadata={"help": "query heads of the layer, >= 1"})
    n_kv_heads: int = field(metadata={"help": "KV heads (groups); divides n_heads"})
    head_dim: int = field(
        metadata={"help": "per-head width, >= 1 (the Triton kernel needs a power of 2, 16-256)"}
    )
    intermediate: int = field(metadata={"help": "MLP width (intermediate_size), >= 1"})
    gated: bool = field(
        default=True, metadata={"help": "SiLU-gated MLP (Llama) if true, GELU MLP (BERT) if not"}
    )
    causal: bool | None = field(
        default=None, metadata={"help": "causal attention; default: same as gated (decoders)"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(
                f"label must be a non-empty string such as 'dense', got {self.label!r}"
            )
        for name in ("hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.causal is None:
            object.__setattr__(self, "causal", bool(self.gated))

    @classmethod
    def coerce(cls, obj: LayerShape | Mapping[str, Any] | Any) -> LayerShape:
        """Accept a LayerShape, a mapping or any dataclass with the same field names."""
        if isinstance(obj, cls):
            return obj
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"a layer shape must be a dict or a dataclass, got {type(obj)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown layer-shape keys {unknown}; valid keys: {sorted(names)}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ValueError(f"incomplete layer shape {dict(obj)}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, ...]:
    """(median, p20, p80) milliseconds: do_bench on a GPU, perf_counter repeats on a CPU."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(median), float(p20), float(p80)
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8)


def _sdpa_gqa(q, k, v, causal):
    """torch's fastest path for GQA attention: SDPA with ``enable_gqa`` (torch >= 2.5)."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        return attention_reference(q, k, v, causal=causal)


# --------------------------------------------------------------------------------------------
# one op, one shape
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Case:
    op: str  # gated_mlp | gelu_mlp | attention
    dims: tuple  # (hidden, intermediate) or (n_heads, n_kv_heads, head_dim)


def _mlp_case(shape: LayerShape, intermediate: int | None = None) -> _Case:
    op = "gated_mlp" if shape.gated else "gelu_mlp"
    return _Case(op, (shape.hidden, shape.intermediate if intermediate is None else intermediate))


def _attn_case(shape: LayerShape, n_heads: int | None = None) -> _Case:
    heads = shape.n_heads if n_heads is None else n_heads
    return _Case("attention", (heads, shape.n_kv_heads, shape.head_dim, bool(shape.causal)))


class _Runner:
    """Builds inputs for a case, times every provider, caches the timings."""

    def __init__(self, *, tokens, seq_len, batch, device, dtype, repeats):
        self.tokens, self.seq_len, self.batch = tokens, seq_len, batch
        self.device, self.dtype, self.repeats = device, dtype, repeats
        self.providers = ["triton", "torch"] if _triton_runs(device) else ["torch"]
        self._cache: dict[_Case, dict[str, dict[str, Any]]] = {}

    def flops(self, case: _Case) -> int:
        if case.op == "attention":
            heads, _, head_dim, causal = case.dims
            return attention_flops(self.batch, heads, self.seq_len, head_dim, causal)
        hidden, intermediate = case.dims
        return mlp_flops(self.tokens, hidden, intermediate, case.op == "gated_mlp")

    def _randn(self, *shape, scale=1.0):
        return (
            torch.randn(*shape, device=self.device, dtype=torch.float32).mul_(scale).to(self.dtype)
        )

    def _functions(self, case: _Case) -> dict[str, Callable[[], torch.Tensor]]:
        """One closure per provider, over inputs built once for the case."""
        fns: dict[str, Callable[[], torch.Tensor]] = {}
        triton_on = "triton" in self.providers and _triton_supports(case)
        if triton_on:  # imported only when a GPU runs the kernels
            from prunekit.kernels.attention import attention
            from prunekit.kernels.mlp import gated_mlp, gelu_mlp
        if case.op == "attention":
            heads, kv_heads, head_dim, causal = case.dims
            q = self._randn(self.batch, heads, self.seq_len, head_dim)
            k = self._randn(self.batch, kv_heads, self.seq_len, head_dim)
            v = self._randn(self.batch, kv_heads, self.seq_len, head_dim)
            if triton_on:
                fns["triton"] = lambda: attention(q, k, v, causal=causal)
            fns["torch"] = lambda: _sdpa_gqa(q, k, v, causal)
            return fns
        hidden, inter = case.dims
        x = self._randn(self.tokens, hidden)
        w1 = self._randn(inter, hidden, scale=hidden**-0.5)
        w2 = self._randn(hidden, inter, scale=inter**-0.5)
        if case.op == "gated_mlp":
            w3 = self._randn(inter, hidden, scale=hidden**-0.5)
            if triton_on:
                fns["triton"] = lambda: gated_mlp(x, w1, w3, w2)
            fns["torch"] = lambda: gated_mlp_reference(x, w1, w3, w2)
            return fns
        b1 = self._randn(inter, scale=0.1)
        b2 = self._randn(hidden, scale=0.1)
        if triton_on:
            fns["triton"] = lambda: gelu_mlp(x, w1, b1, w2, b2)
        fns["torch"] = lambda: gelu_mlp_reference(x, w1, b1, w2, b2)
        return fns

    def timings(self, case: _Case) -> dict[str, dict[str, Any]]:
        if case not in self._cache:
            torch.manual_seed(0)
            fns = self._functions(case)
            result: dict[str, dict[str, Any]] = {}
            for provider, fn in fns.items():
                ms, p20, p80 = _time_ms(fn, self.device, self.repeats)
                result[provider] = {"ms": ms, "ms_p20": p20, "ms_p80": p80, "max_abs_err": None}
            if "triton" in result:  # sanity check of the kernel on this device
                err = (fns["triton"]().float() - fns["torch"]().float()).abs().max().item()
                result["triton"]["max_abs_err"] = err
            del fns
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._cache[case] = result
        return self._cache[case]


# --------------------------------------------------------------------------------------------
# rounding
# --------------------------------------------------------------------------------------------
def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _rounded_heads(shape: LayerShape, multiple: int) -> int:
    """Fewest heads >= n_heads, still whole KV groups, with heads * head_dim % multiple == 0."""
    heads = shape.n_heads
    while heads % shape.n_kv_heads or (heads * shape.head_dim) % multiple:
        heads += 1
    return heads


def _rounding_variants(shape: LayerShape, case: _Case) -> tuple[str, int, list[tuple]]:
    """(what, width, [(multiple, rounded_width, rounded_case)]) for widths off the 64/128 grid."""
    if case.op == "attention":
        what, width = "n_heads*head_dim", shape.n_heads * shape.head_dim
        variants = []
        for m in _MULTIPLES:
            heads = _rounded_heads(shape, m)
            variants.append((m, heads * shape.head_dim, _attn_case(shape, heads)))
    else:
        what, width = "intermediate", shape.intermediate
        variants = [
            (m, _round_up(width, m), _mlp_case(shape, _round_up(width, m))) for m in _MULTIPLES
        ]
    return what, width, variants


def _rounding_note(what, width, variants, timings_by_width, provider, on_gpu) -> str:
    if width % _MULTIPLES[-1] == 0:
        return ""
    off = [m for m in _MULTIPLES if width % m]
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


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "cpu"
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "not installed"


def _triton_runs(device: torch.device) -> bool:
    """Triton is timed on CUDA devices only, and only where it is installed."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_supports(case: _Case) -> bool:
    """Whether the Triton kernel of ``case`` can run (attention needs head_dim 2^k, 16-256)."""
    if case.op != "attention":
        return True
    head_dim = case.dims[2]
    return 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def bench_layer_shapes(
    shapes: Iterable[LayerShape | Mapping[str, Any]],
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
        shapes: dicts or dataclasses with ``label`` ("dense" / "pruned"), ``hidden``,
            ``n_heads``, ``n_kv_heads``, ``head_dim``, ``intermediate``, ``gated`` and
            optionally ``causal`` (default: ``gated``).
        tokens: MLP rows; default ``batch * seq_len``.
        seq_len, batch: attention input is ``[batch, heads, seq_len, head_dim]``.
        device: default CUDA when available, else CPU. Triton is timed only on CUDA.
        repeats: timed runs on CPU (median reported); on a GPU ``do_bench`` picks the count.
        dtype: default float16 on a GPU, float32 on a CPU.

    Returns one dict per (label, op, shape, provider) with the keys in :data:`COLUMNS`.
    Attention FLOPs count the ``q k^T`` and ``p v`` matmuls only (projections are MLP-like
    matmuls whose widths the MLP rows already show).
    """
    shapes = [LayerShape.coerce(s) for s in shapes]
    if not shapes:
        raise ValueError("shapes is empty: give at least one layer shape")
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
    device = _resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    on_gpu = device.type == "cuda"
    runner = _Runner(
        tokens=tokens, seq_len=seq_len, batch=batch, device=device, dtype=dtype, repeats=repeats
    )
    common = {
        "dtype": str(dtype).removeprefix("torch."),
        "device": _device_name(device),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
    }

    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, _Case]] = set()

    def add_rows(label: str, case: _Case, notes: dict[str, str]) -> None:
        timings = runner.timings(case)
        flops = runner.flops(case)
        if case.op == "attention":
            heads, kv_heads, head_dim, causal = case.dims
            desc = (
                f"b={batch} t={seq_len} heads={heads}/{kv_heads} d={head_dim}"
                f"{' causal' if causal else ''}"
            )
            dims = {
                "tokens": None,
                "batch": batch,
                "seq_len": seq_len,
                "hidden": None,
                "intermediate": None,
                "n_heads": heads,
                "n_kv_heads": kv_heads,
                "head_dim": head_dim,
                "causal": causal,
                "width": heads * head_dim,
            }
        else:
            hidden, inter = case.dims
            desc = f"tokens={tokens} hidden={hidden} inter={inter}"
            dims = {
                "tokens": tokens,
                "batch": None,
                "seq_len": None,
                "hidden": hidden,
                "intermediate": inter,
                "n_heads": None,
                "n_kv_heads": None,
                "head_dim": None,
                "causal": None,
                "width": inter,
            }
        for provider, t in timings.items():
            rows.append(
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
            )

    for shape in shapes:
        for case in (_mlp_case(shape), _attn_case(shape)):
            if (shape.label, case) in seen:
                continue
            seen.add((shape.label, case))
            notes: dict[str, str] = {}
            extra: list[_Case] = []
            if shape.label != "dense":
                what, width, variants = _rounding_variants(shape, case)
                if width % _MULTIPLES[-1]:
                    by_width = {width: runner.timings(case)}
                    if on_gpu:
                        for _, w, rcase in variants:
                            by_width[w] = runner.timings(rcase)
                            if w != width and rcase not in extra:
                                extra.append(rcase)
                    for provider in runner.providers:
                        notes[provider] = _rounding_note(
                            what, width, variants, by_width, provider, on_gpu
                        )
            add_rows(shape.label, case, notes)
            for rcase in extra:
                if ("rounded", rcase) not in seen:
                    seen.add(("rounded", rcase))
                    add_rows("rounded", rcase, {})

    _fill_speedups(rows)
    return rows


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


def plot(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """PNG: ms per op/shape/provider, and measured vs ideal speedup of the non-dense rows.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend switch).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plot() needs matplotlib: pip install matplotlib") from exc
    path = Path(path)
    colors = {"triton": "tab:orange", "torch": "tab:blue"}
    names = [f"{r['label']} {r['op']} {r['shape']} [{r['provider']}]" for r in rows]
    compared = [
        (n, r) for n, r in zip(names, rows, strict=True) if r["speedup_vs_dense"] is not None
    ]

    height = 2.0 + 0.32 * (len(rows) + len(compared))
    fig = Figure(figsize=(13, max(4.0, height)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_ms, ax_sp = fig.subplots(2, 1, height_ratios=[max(len(rows), 1), max(len(compared), 1)])

    ypos = list(range(len(rows)))
    xerr = [
        [max(r["ms"] - r["ms_p20"], 0.0) for r in rows],
        [max(r["ms_p80"] - r["ms"], 0.0) for r in rows],
    ]
    ax_ms.barh(
        ypos,
        [r["ms"] for r in rows],
        xerr=xerr,
        capsize=2,
        color=[colors.get(r["provider"], "tab:gray") for r in rows],
    )
    ax_ms.set_yticks(ypos, names, fontsize=7)
    ax_ms.invert_yaxis()
    ax_ms.set_xlabel("ms (median, whiskers p20-p80)")
    device = rows[0]["device"] if rows else ""
    ax_ms.set_title(f"time per op and shape ({device})")
    for provider, color in colors.items():
        if any(r["provider"] == provider for r in rows):
            ax_ms.barh([], [], color=color, label=provider)
    ax_ms.legend(loc="lower right", fontsize=8)

    if compared:
        y = list(range(len(compared)))
        ax_sp.barh(
            [i - 0.2 for i in y],
            [r["speedup_vs_dense"] for _, r in compared],
            height=0.4,
            color="tab:green",
            label="measured",
        )
        ax_sp.barh(
            [i + 0.2 for i in y],
            [r["ideal_speedup"] for _, r in compared],
            height=0.4,
            color="tab:gray",
            label="ideal (FLOP ratio)",
        )
        ax_sp.axvline(1.0, color="black", linewidth=0.8)
        ax_sp.set_yticks(y, [n for n, _ in compared], fontsize=7)
        ax_sp.invert_yaxis()
        ax_sp.legend(loc="lower right", fontsize=8)
    else:
        ax_sp.text(
            0.5,
            0.5,
            "no dense row to compare with",
            ha="center",
            va="center",
            transform=ax_sp.transAxes,
        )
        ax_sp.set_yticks([])
    ax_sp.set_xlabel("speedup vs dense (x)")
    ax_sp.set_title("measured speedup vs ideal")

    tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main_bench(
    shapes: Iterable[LayerShape | Mapping[str, Any]], out_dir: str | os.PathLike, **kw: Any
) -> list[dict[str, Any]]:
    """Run :func:`bench_layer_shapes`, print the table, write kernels.csv and kernels.png.

    Keyword arguments go to :func:`bench_layer_shapes`. Returns the rows.
    """
    device = _resolve_device(kw.get("device"))
    if device.type != "cuda":
        why = f"device {device}" if torch.cuda.is_available() else "no CUDA GPU found"
        print(f"{why}: timing the torch path only (the Triton kernels are timed on a GPU only)")
    elif not _triton_runs(device):
        print("Triton is not installed: timing the torch path only")
    rows = bench_layer_shapes(shapes, **kw)
    print(format_table(rows))
    out_dir = Path(out_dir)
    csv_path = write_csv(rows, out_dir / "kernels.csv")
    png_path = plot(rows, out_dir / "kernels.png")
    print(f"wrote {csv_path} and {png_path}")
    return rows
