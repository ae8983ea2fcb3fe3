"""Selection constraints for a serving format (``Targets.serve``, CLI ``--serve``): the
selection only makes shapes that the format expresses, so the result exports without error.

``serve="decilm"`` — DeciLM / Nemotron-NAS ``block_configs`` (vLLM serves it natively,
llama.cpp converts it; see :mod:`prunekit.core.export`):

- **One query-head count.** DeciLM has one global ``num_attention_heads``; per layer only the
  KV grouping (``n_heads_in_group``) changes, or attention is a no-op. In ``per_layer`` mode
  every layer that keeps attention therefore loses the same number ``r`` of query heads, each
  layer in its own way: whole KV groups (when ``r`` is a multiple of its group size) or the
  same count from every group (when ``r`` is a multiple of its KV heads), whichever removes
  the lower summed score (``head_removal`` is not used). ``r`` is the count nearest to
  ``target / layers`` that every layer reaches keeping ``min_heads`` and one KV group. The
  heads of the protected first/last layers go too (a per-layer count cannot be expressed);
  protection still keeps those layers and their MLP widths. ``uniform`` mode is unchanged
  (one shape everywhere already fits).
- **MLP widths ``ffn_mult`` expresses.** llama.cpp, vLLM before its ``intermediate_size``
  branch and the published modeling code read only ``ffn_mult`` (width
  ``roundup(int(2 * m * hidden / 3), 256)``): kept widths are multiples of 256, i.e.
  ``round_to`` becomes ``lcm(round_to, 256)``.
- Whole layers and attention / MLP sub-blocks need nothing (no-op blocks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from prunekit.core.scores import group_sums

#: serving format -> the multiple its readers need for MLP widths
WIDTH_MULTIPLE = {"decilm": 256}


def serve_targets(targets: Any) -> Any:
    """``targets`` with ``round_to`` raised to a multiple the serving format needs (the same
    object when ``targets.serve`` is unset)."""
    if not targets.serve:
        return targets
    round_to = math.lcm(targets.round_to, WIDTH_MULTIPLE[targets.serve])
    return dataclasses.replace(targets, round_to=round_to)


def check_serve_format(config: Any, serve: str | None) -> None:
    """Refuse, from the config alone, a model the serving format cannot hold at all (DeciLM:
    a non-Llama-family model, a sliding window, query heads that already differ per layer)."""
    if not serve:
        return
    from prunekit.core.export import decilm_problems
    from prunekit.core.serving import config_dict

    problems = decilm_problems(config_dict(config))
    if problems:
        raise ValueError(f"serve={serve!r}: this model does not fit it: {'; '.join(problems)}")


def _head_options(row: torch.Tensor, s: Any, min_heads: int) -> dict[int, tuple[float, list]]:
    """Query heads ``r`` -> (summed score, heads) of the cheapest way to remove ``r`` query
    heads from one layer: whole KV groups or the same count from every group."""
    out: dict[int, tuple[float, list]] = {}
    sums = group_sums(row, s)
    order = torch.argsort(sums, stable=True).tolist()
    for g in range(1, s.n_kv_heads):
        groups = sorted(order[:g])
        heads = [gi * s.group_size + j for gi in groups for j in range(s.group_size)]
        out[g * s.group_size] = (float(sums[groups].sum()), heads)
    grid = row.float().reshape(s.n_kv_heads, s.group_size)
    ranked = torch.argsort(grid, dim=1, stable=True)
    for m in range(1, s.group_size):
        lowest = ranked[:, :m]
        cost = float(grid.gather(1, lowest).sum())
        r = m * s.n_kv_heads
        if r not in out or cost < out[r][0]:
            heads = [g * s.group_size + int(j) for g in range(s.n_kv_heads) for j in lowest[g]]
            out[r] = (cost, sorted(heads))
    return {r: v for r, v in out.items() if s.n_heads - r >= max(min_heads, 1)}


def serve_heads(rows: list, shapes: list, pool: list[int], k: int, targets: Any) -> dict:
    """Query heads to remove per layer of ``pool`` (``k`` in total asked) under
    ``targets.serve``: the same count ``r`` from every layer (see the module doc)."""
    pool = [i for i in pool if shapes[i].has_attention]
    counts = {shapes[i].n_heads for i in pool}
    if len(counts) > 1:
        detail = ", ".join(f"layer {i}: {shapes[i].n_heads}" for i in pool)
        raise ValueError(
            f"serve={targets.serve!r} keeps one query-head count in every layer, but this "
            f"model's layers already differ ({detail}); prune it without --serve or start "
            "from a model with uniform query heads"
        )
    options = {i: _head_options(rows[i], shapes[i], targets.min_heads) for i in pool}
    reachable = set.intersection(*(set(o) for o in options.values()))
    if not reachable:
        raise ValueError(
            f"serve={targets.serve!r}: no query-head count can be removed from every layer "
            f"keeping min_heads={targets.min_heads} and one KV group; lower min_heads"
        )
    want = k / len(pool)
    r = min(reachable, key=lambda n: (abs(n - want), n))
    if want < r / 2:
        raise ValueError(
            f"heads target ({k}) is below half the smallest step for serve={targets.serve!r} "
            f"({r * len(pool)}: {r} query heads in each of the {len(pool)} layers); ask for "
            "more or drop --serve"
        )
    return {i: options[i][r][1] for i in pool}


__all__ = ["WIDTH_MULTIPLE", "check_serve_format", "serve_heads", "serve_targets"]
