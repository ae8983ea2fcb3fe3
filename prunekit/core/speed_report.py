"""The speed rows of the report's table and bars of ``before_after.png``, from the figures
:mod:`prunekit.core.speed_stage` records: each stage's median tokens/s with its min..max over
the interleaved rounds, the measured speedup over the dense model with its interval beside
the analytic FLOP ratio, and "not significant" instead of a speedup the rounds do not support
(:func:`prunekit.core.speed_compare.speedup` defines it)."""

from __future__ import annotations

from typing import Any

__all__ = ["SPEED_KEYS", "draw_speed_bar", "speed_notes", "speed_rows"]

#: the table rows this module renders: key -> (label, number format)
SPEED_KEYS = {
    "prefill_tokens_per_s": ("prefill", "{:.1f}"),
    "decode_tokens_per_s": ("decode", "{:.1f}"),
}
NOT_SIGNIFICANT = "not significant"


def _latency(stage_metrics: dict[str, Any]) -> dict[str, Any]:
    lat = stage_metrics.get("latency")
    return lat if isinstance(lat, dict) else {}


def _figure(lat: dict[str, Any], key: str, fmt: str) -> str:
    value = lat.get(key)
    if value is None:
        return "–"
    spread = lat.get(f"{key}_range")
    if not spread:
        return fmt.format(value)
    low, high = (fmt.format(v) for v in spread)
    return f"{fmt.format(value)} ({low}–{high})"


def speedup_text(speedup: dict[str, Any] | None, flop_ratio: float | None = None) -> str:
    """``1.21x (1.15–1.30)`` or ``not significant (0.95–1.10)``, with the FLOP ratio."""
    if not speedup:
        return "–"
    interval = f"{speedup['low']:.2f}–{speedup['high']:.2f}"
    text = (
        f"{speedup['median']:.2f}x ({interval})"
        if speedup["significant"]
        else f"{NOT_SIGNIFICANT} ({speedup['median']:.2f}x, {interval})"
    )
    if flop_ratio:
        text += f"; FLOPs {flop_ratio:.2f}x"
    return text


def speed_rows(key: str, metrics: list[dict[str, Any]]) -> list[str]:
    """The table rows of one speed metric (``prefill_tokens_per_s`` or
    ``decode_tokens_per_s``) for the stages' metric dicts: tokens/s as ``median (min–max)``,
    and, when some stage was timed beside the dense model, its speedup row."""
    name, fmt = SPEED_KEYS[key]
    lats = [_latency(m) for m in metrics]
    cells = [_figure(lat, key, fmt) for lat in lats]
    if all(c == "–" for c in cells):
        return []
    rows = [f"| {name} tokens/s | {' | '.join(cells)} |"]
    compared = [lat.get("speedup") or {} for lat in lats]
    if any(c.get(name) for c in compared):
        texts = [speedup_text(c.get(name), c.get("flop_ratio")) for c in compared]
        rows.append(f"| {name} speedup vs dense (FLOP ratio) | {' | '.join(texts)} |")
    return rows


def speed_notes(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Lines under the table (with a blank line after them, none when there is nothing to
    say): how the speed was measured, and why a figure is missing."""
    notes = [
        f"- {stage}: {lat['note']}"
        for stage, m in metrics.items()
        if (lat := _latency(m)).get("note")
    ]
    settings = next(
        (lat["settings"] for m in metrics.values() if (lat := _latency(m)).get("settings")),
        None,
    )
    if settings is not None:
        s = settings
        clock = "CPU time" if s.get("clock") == "cpu" else "wall time"
        notes.insert(
            0,
            f"- Speed: {s['rounds']} interleaved rounds after {s['warmup']} warm-up run(s) per "
            f"model (order reversed every other round, {s['threads']} CPU threads, {clock}), "
            f"batch {s['batch_size']} x {s['prompt_len']} prompt tokens + {s['new_tokens']} "
            f"new; tokens/s as median (min–max over rounds); speedup = median (min–max) of "
            f"the per-round ratios; {NOT_SIGNIFICANT} unless every round agrees on which model "
            f"is faster (at least 5 rounds) and the median is {s['min_effect']:.0%} or more "
            f"away from 1.",
        )
    return [*notes, ""] if notes else []


def draw_speed_bar(
    ax, x: float, width: float, stage_metrics: dict[str, Any], key: str, color: Any
) -> None:
    """Draw one stage's bar of a speed metric at ``x``: the measured speedup over dense with
    its interval as an error bar, or the words "not significant" (or "not side by side")
    instead of a bar. The dense stage is the reference line at 1."""
    lat = _latency(stage_metrics)
    speedup = (lat.get("speedup") or {}).get(SPEED_KEYS[key][0])
    if speedup is None:
        if lat.get(key) is not None and not lat.get("side_by_side", True):
            ax.annotate("not side\nby side", (x, 0.05), ha="center", va="bottom", fontsize=6)
        return
    if not speedup["significant"]:
        ax.annotate(NOT_SIGNIFICANT, (x, 0.05), ha="center", va="bottom", fontsize=6, rotation=90)
        return
    med = speedup["median"]
    yerr = [[med - speedup["low"]], [speedup["high"] - med]]
    ax.bar([x], [med], width, yerr=yerr, capsize=2, color=color)
    ax.annotate(f"{med:.2f}", (x, speedup["high"]), ha="center", va="bottom", fontsize=7)
