"""Timing of one case per provider: inputs built once, ``do_bench`` on a GPU, repeats on a CPU.

Providers: ``triton`` (the kernels of this package, on a CUDA GPU only, and only where Triton
is installed) and ``torch`` (the references: cuBLAS and SDPA on a GPU, torch's CPU kernels
otherwise). The device helpers here also name the device and the versions for the rows.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
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
from prunekit.kernels.shapes import Case

__all__ = ["Runner", "device_name", "resolve_device", "time_ms", "triton_runs", "triton_version"]


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, ...]:
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
# device and versions
# --------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "cpu"
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "not installed"


def triton_runs(device: torch.device) -> bool:
    """Triton is timed on CUDA devices only, and only where it is installed."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_supports(case: Case) -> bool:
    """Whether the Triton kernel of ``case`` can run (attention needs head_dim 2^k, 16-256)."""
    if case.op != "attention":
        return True
    head_dim = case.dims[2]
    return 16 <= head_dim <= 256 and not head_dim & (head_dim - 1)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------
# one case, every provider
# --------------------------------------------------------------------------------------------
class Runner:
    """Builds inputs for a case, times every provider, caches the timings."""

    def __init__(self, *, tokens, seq_len, batch, device, dtype, repeats):
        self.tokens, self.seq_len, self.batch = tokens, seq_len, batch
        self.device, self.dtype, self.repeats = device, dtype, repeats
        self.providers = ["triton", "torch"] if triton_runs(device) else ["torch"]
        self._cache: dict[Case, dict[str, dict[str, Any]]] = {}

    def flops(self, case: Case) -> int:
        if case.op == "attention":
            heads, _, head_dim, causal = case.dims
            return attention_flops(self.batch, heads, self.seq_len, head_dim, causal)
        hidden, intermediate = case.dims
        return mlp_flops(self.tokens, hidden, intermediate, case.op == "gated_mlp")

    def _randn(self, *shape, scale=1.0):
        return (
            torch.randn(*shape, device=self.device, dtype=torch.float32).mul_(scale).to(self.dtype)
        )

    def _attention_functions(self, case: Case, triton_on: bool) -> dict[str, Callable]:
        heads, kv_heads, head_dim, causal = case.dims
        q = self._randn(self.batch, heads, self.seq_len, head_dim)
        k = self._randn(self.batch, kv_heads, self.seq_len, head_dim)
        v = self._randn(self.batch, kv_heads, self.seq_len, head_dim)
        fns: dict[str, Callable[[], torch.Tensor]] = {}
        if triton_on:  # imported only when a GPU runs the kernels
            from prunekit.kernels.attention import attention

            fns["triton"] = lambda: attention(q, k, v, causal=causal)
        fns["torch"] = lambda: _sdpa_gqa(q, k, v, causal)
        return fns

    def _mlp_functions(self, case: Case, triton_on: bool) -> dict[str, Callable]:
        hidden, inter = case.dims
        x = self._randn(self.tokens, hidden)
        w1 = self._randn(inter, hidden, scale=hidden**-0.5)
        w2 = self._randn(hidden, inter, scale=inter**-0.5)
        if case.op == "gated_mlp":
            w3 = self._randn(inter, hidden, scale=hidden**-0.5)
            args, reference = (x, w1, w3, w2), gated_mlp_reference
        else:
            b1 = self._randn(inter, scale=0.1)
            b2 = self._randn(hidden, scale=0.1)
            args, reference = (x, w1, b1, w2, b2), gelu_mlp_reference
        fns: dict[str, Callable[[], torch.Tensor]] = {}
        if triton_on:  # imported only when a GPU runs the kernels
            from prunekit.kernels.mlp import gated_mlp, gelu_mlp

            kernel = gated_mlp if case.op == "gated_mlp" else gelu_mlp
            fns["triton"] = lambda: kernel(*args)
        fns["torch"] = lambda: reference(*args)
        return fns

    def _functions(self, case: Case) -> dict[str, Callable[[], torch.Tensor]]:
        """One closure per provider, over inputs built once for the case."""
        triton_on = "triton" in self.providers and _triton_supports(case)
        if case.op == "attention":
            return self._attention_functions(case, triton_on)
        return self._mlp_functions(case, triton_on)

    def timings(self, case: Case) -> dict[str, dict[str, Any]]:
        """``{provider: {ms, ms_p20, ms_p80, max_abs_err}}`` of ``case`` (cached)."""
        if case not in self._cache:
            torch.manual_seed(0)
            fns = self._functions(case)
            result: dict[str, dict[str, Any]] = {}
            for provider, fn in fns.items():
                ms, p20, p80 = time_ms(fn, self.device, self.repeats)
                result[provider] = {"ms": ms, "ms_p20": p20, "ms_p80": p80, "max_abs_err": None}
            if "triton" in result:  # sanity check of the kernel on this device
                err = (fns["triton"]().float() - fns["torch"]().float()).abs().max().item()
                result["triton"]["max_abs_err"] = err
            del fns
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._cache[case] = result
        return self._cache[case]
