"""How fast and how large a model runs: prefill/decode throughput of one model
(:func:`latency`; several side by side: :mod:`prunekit.core.speed_compare`), the peak memory
of a run (:func:`peak_memory`) and the memory its weights take."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunekit.core.quality import eval_mode, is_causal, model_device, synchronize, vocab_size

__all__ = ["latency", "peak_memory", "weights_memory_mb"]

_MB = 1024 * 1024


# ---- memory -------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand the memory glibc keeps from freed tensors back to the kernel (``malloc_trim``).

    After a first pass frees its activations, glibc raises its mmap threshold and keeps the
    pages in its heap; a second pass reuses them without the resident set growing, so a peak
    read from the RSS would miss it. A no-op off glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``fn()`` and measure the memory it needed above what was in use before.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before (``method:
    "cuda_max_allocated"``). On CPU: the peak resident set size minus the RSS before, read
    from Linux's ``VmHWM`` after handing glibc's free heap back to the kernel and resetting the
    counter through ``/proc/self/clear_refs`` (``method: "rss_hwm"``); elsewhere the
    process-lifetime ``ru_maxrss`` delta, which reads 0 when an earlier peak was higher
    (``method: "ru_maxrss_delta"``). Returns ``{"peak_memory_mb", "method"}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_mb": (peak - before) / _MB, "method": "cuda_max_allocated"}
    if _reset_peak_rss():
        before = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        if before is not None and peak is not None:
            return {"peak_memory_mb": max(peak - before, 0) / 1024, "method": "rss_hwm"}
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mb": (peak - before) / 1024, "method": "ru_maxrss_delta"}


def weights_memory_mb(model: nn.Module) -> float:
    """Memory held by the parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total / _MB


# ---- latency ------------------------------------------------------------------------------
def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _timed_run(
    model: nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    causal: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> Callable[[], tuple[float, float]]:
    """A function that runs one prefill of ``ids`` and ``new_tokens`` greedy decode steps and
    returns their times on ``clock`` (default: wall time) ``(prefill_s, decode_s)``."""
    device = ids.device
    keep_last = _accepts(model, "logits_to_keep")

    def prefill():
        if not causal:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids))
        kwargs = {"logits_to_keep": 1} if keep_last else {}
        return model(input_ids=ids, use_cache=True, **kwargs)

    def run_once() -> tuple[float, float]:
        synchronize(device)
        t0 = clock()
        out = prefill()
        synchronize(device)
        t1 = clock()
        if new_tokens == 0:
            return t1 - t0, 0.0
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        return t1 - t0, clock() - t1

    return run_once


def latency(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    memory: bool = True,
) -> dict[str, Any]:
    """Prefill and decode throughput on random token ids (median of ``repeats`` runs after
    ``warmup`` untimed ones).

    Prefill: one forward pass over ``batch_size x prompt_len`` tokens that fills the KV cache
    and computes the logits of the last position only (what ``generate`` does);
    ``prefill_tokens_per_s = batch_size * prompt_len / median time``. Decode: ``new_tokens``
    greedy steps of one token per sequence with the KV cache;
    ``decode_tokens_per_s = batch_size * new_tokens / median time``. Encoders (no KV cache,
    no generation) get prefill only: a full forward pass. ``memory=True`` adds the peak memory
    of one prefill + decode run (:func:`peak_memory`) and the weights' size. Timings include
    a CUDA synchronise on GPU. The settings, device, dtype and CPU threads are recorded.
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 0),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    device = model_device(model)
    causal = is_causal(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size(model), (batch_size, prompt_len), generator=g).to(device)
    run_once = _timed_run(model, ids, new_tokens if causal else 0, causal)
    prefill_s: list[float] = []
    decode_s: list[float] = []
    mem: dict[str, Any] = {}
    with eval_mode(model):
        for _ in range(warmup):
            run_once()
        if memory:
            mem = peak_memory(run_once, device)
        for _ in range(repeats):
            p, d = run_once()
            prefill_s.append(p)
            decode_s.append(d)
    p_med = statistics.median(prefill_s)
    result: dict[str, Any] = {
        "prefill_tokens_per_s": batch_size * prompt_len / p_med,
        "prefill_s": p_med,
        "decode_tokens_per_s": None,
        "decode_s": None,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens if causal else 0,
        "repeats": repeats,
        "warmup": warmup,
        "causal": causal,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    if causal and new_tokens > 0:
        d_med = statistics.median(decode_s)
        result["decode_s"] = d_med
        result["decode_tokens_per_s"] = batch_size * new_tokens / d_med
    if memory:
        result["peak_memory_mb"] = mem["peak_memory_mb"]
        result["memory_method"] = mem["method"]
        result["weights_memory_mb"] = weights_memory_mb(model)
    return result
