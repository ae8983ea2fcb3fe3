"""Several models timed side by side in one process (:func:`compare_latency`): the one
routine behind the report's speed rows (:mod:`prunekit.core.speed_stage`) and
``benchmarks/latency.py``.

Timing each model once, minutes apart, is biased: the model measured first is consistently
slow (warm-up, allocator, thread pool), so a 1.2x FLOP cut showed as a 3.6x-7.8x "speedup".
Here every model is warmed up, then the models run in interleaved rounds with the order
reversed every other round, with the CPU thread count fixed; each figure is a median with its
min..max over the rounds, and a speedup is the median of per-round ratios with their min..max
and a ``significant`` flag (:func:`speedup`). ``clock="cpu"`` times this process's CPU time
instead of wall time, for a machine shared with other work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.quality import eval_mode, is_causal, model_device, vocab_size
from prunekit.core.speed import _timed_run, peak_memory, weights_memory_mb

__all__ = ["MIN_ROUNDS", "LatencySettings", "compare_latency", "speedup"]


# ---- side by side ---------------------------------------------------------------------------
@dataclass
class LatencySettings:
    """How :func:`compare_latency` times models side by side."""

    batch_size: int = field(default=1, metadata={"help": "sequences per batch"})
    prompt_len: int = field(default=128, metadata={"help": "prompt tokens (prefill)"})
    new_tokens: int = field(default=32, metadata={"help": "greedy decode steps (0: none)"})
    rounds: int = field(
        default=5,
        metadata={
            "help": "interleaved rounds, one run of every model each (>= 5 to claim a speedup)"
        },
    )
    best_of: int = field(
        default=1,
        metadata={
            "help": "back-to-back runs of a model per round; the round counts the fastest "
            "(1: every run counts; more: a run another process interrupted does not)"
        },
    )
    warmup: int = field(default=1, metadata={"help": "untimed runs per model before round 1"})
    order: str = field(
        default="alternate",
        metadata={
            "help": "order within a round: alternate (reversed every other round) or "
            "random (shuffled each round, from seed)"
        },
    )
    clock: str = field(
        default="wall",
        metadata={
            "help": "wall: elapsed time (what a user waits); cpu: this process's CPU time, "
            "which other processes on a shared machine do not inflate (CPU models only; with "
            "several threads it sums them, so it compares models rather than quoting speed)"
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads while timing (None: the current count)"}
    )
    memory: bool = field(
        default=False, metadata={"help": "also measure each model's peak memory (one run)"}
    )
    min_effect: float = field(
        default=0.05,
        metadata={"help": "a speedup closer to 1 than this (0.05: within 5%) is not significant"},
    )
    seed: int = field(default=0, metadata={"help": "random prompt ids (and random order)"})

    def __post_init__(self) -> None:
        for name, low in (
            ("batch_size", 1),
            ("prompt_len", 1),
            ("new_tokens", 0),
            ("rounds", 1),
            ("best_of", 1),
            ("warmup", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.order not in ("alternate", "random"):
            raise ValueError(f"order must be 'alternate' or 'random', got {self.order!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: the fewest rounds whose unanimous verdict is unlikely by chance (2^(1-5) = 6%)
MIN_ROUNDS = 5


def speedup(base: Sequence[float], other: Sequence[float], settings: LatencySettings) -> dict:
    """The speedup of ``other`` over ``base`` from per-round throughputs (tokens/s) measured
    in the same rounds: each round's ratio ``other / base``, their median, and their min..max
    as ``low``/``high``.

    ``significant`` is true when (1) there are at least :data:`MIN_ROUNDS` rounds, (2) every
    round agrees on which model is faster (``low > 1`` or ``high < 1``; with no real
    difference and independent rounds that happens with probability ``2^(1-n)``: 6% for 5
    rounds, 0.4% for 9 -- the two-sided sign test) and (3) the median is at least
    ``settings.min_effect`` away from 1 (``max(m, 1/m) - 1 >= min_effect``), so that a
    consistent 1-2% drift of a shared machine is not reported as a speedup. Otherwise the
    report says "not significant"."""
    ratios = [o / b for b, o in zip(base, other, strict=True)]
    low, high, med = min(ratios), max(ratios), statistics.median(ratios)
    significant = (
        len(ratios) >= MIN_ROUNDS
        and (low > 1.0 or high < 1.0)
        and max(med, 1 / med) - 1 >= settings.min_effect
    )
    return {"median": med, "low": low, "high": high, "significant": significant, "rounds": ratios}


def _round_orders(names: list[str], settings: LatencySettings) -> list[list[str]]:
    if settings.order == "random":
        rng = random.Random(settings.seed)
        return [rng.sample(names, len(names)) for _ in range(settings.rounds)]
    return [names if r % 2 == 0 else names[::-1] for r in range(settings.rounds)]


def _prepare(models: Mapping[str, nn.Module], s: LatencySettings):
    """Warm every model up (and measure its memory); a model that cannot run is left out
    with the reason. Returns ``(runs, info, failed)``."""
    vocab = min(vocab_size(m) for m in models.values())
    ids = torch.randint(
        0, vocab, (s.batch_size, s.prompt_len), generator=torch.Generator().manual_seed(s.seed)
    )
    runs: dict[str, Callable[[], tuple[float, float]]] = {}
    info: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for name, model in models.items():
        try:
            device, causal = model_device(model), is_causal(model)
            if s.clock == "cpu" and device.type != "cpu":
                raise ValueError(f"clock 'cpu' times CPU work only; this model is on {device}")
            clock = time.process_time if s.clock == "cpu" else time.perf_counter
            new_tokens = s.new_tokens if causal else 0
            run_once = _timed_run(model, ids.to(device), new_tokens, causal, clock)
            for _ in range(s.warmup):
                run_once()
            mem = peak_memory(run_once, device) if s.memory else None
        except Exception as e:  # noqa: BLE001 -- a model that cannot run here is reported
            failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            continue
        runs[name] = run_once
        info[name] = {
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "causal": causal,
        }
        if mem is not None:
            info[name].update(
                peak_memory_mb=mem["peak_memory_mb"],
                memory_method=mem["method"],
                weights_memory_mb=weights_memory_mb(model),
            )
    return runs, info, failed


def _rounds(runs, info, s: LatencySettings, on_round) -> tuple[dict[str, list], list[list[str]]]:
    """Time every model once per round (its fastest of ``best_of`` back-to-back runs) in that
    round's order; ``{name: [(prefill_s, decode_s), ...]}`` and the orders."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    orders = _round_orders(list(runs), s)
    gc.collect()
    for r, order in enumerate(orders):
        for name in order:
            tries = [_without_gc(runs[name]) for _ in range(s.best_of)]
            times[name].append((min(t[0] for t in tries), min(t[1] for t in tries)))
            if on_round is not None:
                on_round(r, name, _throughput(times[name][-1:], s, info[name]["causal"]))
    return times, orders


def _without_gc(run_once: Callable[[], tuple[float, float]]) -> tuple[float, float]:
    """One timed run with the garbage collector held off, so a collection of the objects
    another model left behind is not charged to this one."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return run_once()
    finally:
        if was_enabled:
            gc.enable()


def _throughput(times: list[tuple[float, float]], s: LatencySettings, causal: bool) -> dict:
    """Per-round tokens/s and their median and min..max range."""
    out: dict[str, Any] = {}
    for key, i, tokens in (("prefill", 0, s.prompt_len), ("decode", 1, s.new_tokens)):
        if key == "decode" and not (causal and s.new_tokens):
            out.update(decode_tokens_per_s=None, decode_s=None)
            continue
        secs = [t[i] for t in times]
        rates = [s.batch_size * tokens / t for t in secs]
        out[f"{key}_tokens_per_s"] = statistics.median(rates)
        out[f"{key}_tokens_per_s_range"] = [min(rates), max(rates)]
        out[f"{key}_tokens_per_s_rounds"] = rates
        out[f"{key}_s"] = statistics.median(secs)
    return out


def compare_latency(
    models: Mapping[str, nn.Module],
    settings: LatencySettings | None = None,
    *,
    baseline: str | None = None,
    on_round: Callable[[int, str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time several models side by side in this process and compare them to ``baseline``
    (default: the first), the one routine behind the report's speed rows and
    ``benchmarks/latency.py``.

    The CPU thread count is fixed for the duration (``settings.threads``; restored after).
    Each model gets ``warmup`` untimed runs, then ``rounds`` rounds in which every model runs
    once (or ``best_of`` times back to back, the fastest counting): a prefill of
    ``batch_size x prompt_len`` random ids and ``new_tokens`` greedy steps (as
    :func:`~prunekit.core.speed.latency`), the order within a round reversed every other
    round (or shuffled), so warm-up, allocator and thread-pool drift hit every model alike.
    ``on_round(r, name, figures)`` is called after each model's turn. Returns::

        {"models": {name: {"prefill_tokens_per_s": median, "prefill_tokens_per_s_range":
                           [min, max], "prefill_tokens_per_s_rounds": [...], "prefill_s",
                           "decode_..." (None for encoders), "device", "dtype", "causal",
                           ["peak_memory_mb", "memory_method", "weights_memory_mb"]}},
         "speedups": {name: {"prefill": speedup(), "decode": speedup() or None}},
         "baseline", "order": [[names of round 0], ...], "failed": {name: why},
         "settings": {..., "threads", "spread", "interval"}}

    Spread of a model's figure: min..max over the rounds. Speedup: per-round ratios of
    tokens/s; its median, interval and ``significant`` flag are defined in :func:`speedup`.
    A model that fails its warm-up is left out and named in ``failed``.
    """
    s = settings or LatencySettings()
    if not models:
        raise ValueError("compare_latency: no models given")
    baseline = next(iter(models)) if baseline is None else baseline
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {list(models)}")
    threads_before = torch.get_num_threads()
    threads = s.threads or threads_before
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            for model in models.values():
                stack.enter_context(eval_mode(model))
            runs, info, failed = _prepare(models, s)
            times, orders = _rounds(runs, info, s, on_round)
    finally:
        torch.set_num_threads(threads_before)
    result: dict[str, Any] = {
        "models": {n: {**_throughput(times[n], s, info[n]["causal"]), **info[n]} for n in runs},
        "speedups": {},
        "baseline": baseline,
        "order": orders,
        "failed": failed,
        "settings": {
            **s.to_dict(),
            "threads": threads,
            "spread": "min-max over rounds",
            "speedup_spread": "min-max of the per-round ratios",
        },
    }
    base = result["models"].get(baseline)
    for name, figures in result["models"].items():
        if base is None or name == baseline:
            continue
        result["speedups"][name] = {
            key: None
            if figures[f"{key}_tokens_per_s"] is None or base[f"{key}_tokens_per_s"] is None
            else speedup(
                base[f"{key}_tokens_per_s_rounds"], figures[f"{key}_tokens_per_s_rounds"], s
            )
            for key in ("prefill", "decode")
        }
    return result
