"""Group sizes that fit the model (issue 15): the one place that decides the ``group_size`` a
grouped quantizer (``gptq``, ``awq``, torchao's ``int4_grouped``) uses.

Each group of ``group_size`` input columns of a Linear shares a scale, so a group size must
divide the input width of every quantized Linear: ``hidden_size`` (q/k/v, gate/up), the
attention output ``n_heads x head_dim`` (o) and the MLP width (down), *after pruning*.
SmolLM2-135M's hidden size 576 = 9 x 64 is not a multiple of the usual 128.

The rule:

- ``group_size=None`` (the default of the built-in quantizers): the largest power of two
  from :data:`DEFAULT_GROUP_SIZE` (128) down to :data:`MIN_GROUP_SIZE` (32) that divides every
  width: 128 -> 64 -> 32. What was fitted and why is printed and recorded in the sidecar's
  ``quantization.group_size`` (requested, used, widths, note) and in the report.
- An explicit group size (``--quant-group-size``, ``group_size`` option) is used as given; one
  that does not divide a width is refused (in preflight, from the planned shapes), naming the
  width and proposing the value that fits (the user chose it; a silent change would make the
  recipe say one thing and the checkpoint another).
- ``-1`` (one scale per output channel, GPTQ and torchao) always fits.
- A width that no power of two >= 32 divides (odd, or e.g. 100 = 4 x 25) is refused: groups of
  16 or fewer columns cost a 16-bit scale per <= 16 weights (>= 1 extra bit per weight at
  4 bits) and are not what the 4-bit kernels are tuned for. The error says what to pass (a
  group size that divides it, ``-1``, or pruning to multiples of 32 with ``round_to``); an
  explicit group size below 32 that divides every width is still accepted.

Widths come from a built model (:func:`model_widths`: the ``in_features`` of every Linear in
the decoder layers, read without touching weights) or from a config and a plan before any
weight is loaded (:func:`planned_widths`, used by :mod:`prunekit.core.preflight`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.core.quant_marks import QuantizationError
from prunekit.core.shapes import LayerShape, config_global

#: the group size used when none is given, if it divides every width
DEFAULT_GROUP_SIZE = 128
#: the smallest group size the default is fitted down to
MIN_GROUP_SIZE = 32


class GroupSizeError(QuantizationError):
    """No sensible group size divides the model's quantized input widths, or the one given
    does not (raised before any weight is loaded when preflight knows the shapes)."""


@dataclass(frozen=True)
class GroupSizeFit:
    """The group size a quantizer uses: ``requested`` (None: the default), ``used``, the
    distinct quantized input ``widths``, and ``note`` (one line saying what and why)."""

    requested: int | None
    used: int
    widths: tuple[int, ...]
    note: str

    @property
    def fitted(self) -> bool:
        """The default did not divide every width and a smaller group size is used."""
        return self.requested is None and self.used != DEFAULT_GROUP_SIZE

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": "default" if self.requested is None else self.requested,
            "default": DEFAULT_GROUP_SIZE,
            "used": self.used,
            "widths": list(self.widths),
            "note": self.note,
        }


def _where(widths: Mapping[int, str] | Iterable[int]) -> dict[int, str]:
    if isinstance(widths, Mapping):
        return {int(w): str(name) for w, name in widths.items() if int(w) > 0}
    return {int(w): "a quantized layer" for w in widths if int(w) > 0}


def largest_fit(widths: Iterable[int], start: int, minimum: int = MIN_GROUP_SIZE) -> int | None:
    """The largest power of two in ``[minimum, start]`` dividing every width, or None."""
    widths = list(widths)
    g = 1 << (max(start, 1).bit_length() - 1)  # start rounded down to a power of two
    while g >= minimum:
        if all(w % g == 0 for w in widths):
            return g
        g //= 2
    return None


def _refusal(where: dict[int, str], bad: list[int], per_channel_ok: bool) -> str:
    w = bad[0]
    odd_part = w // (w & -w)
    hint = f"{w} = {w & -w} x {odd_part}" if odd_part > 1 else f"{w}"
    options = [f"--quant-group-size {w & -w} (groups of {w & -w} columns)"] if w & -w >= 8 else []
    if per_channel_ok:
        options.append("--quant-group-size -1 (one scale per output channel)")
    options.append(
        f"prune to widths that are multiples of {MIN_GROUP_SIZE} (recipe targets.round_to: "
        f"{MIN_GROUP_SIZE})"
    )
    return (
        f"{where[w]} has {w} input features ({hint}): no group size from {MIN_GROUP_SIZE} to "
        f"{DEFAULT_GROUP_SIZE} divides it; pass " + ", or ".join(options)
    )


def fit_group_size(
    requested: int | None,
    widths: Mapping[int, str] | Iterable[int],
    *,
    per_channel_ok: bool = True,
) -> GroupSizeFit:
    """The group size to use for quantized input ``widths`` (a mapping width -> where it
    occurs, for the messages, or plain widths) when ``requested`` was asked (None: the default,
    fitted; see the module docstring). Raises :class:`GroupSizeError` saying what to pass."""
    where = _where(widths)
    distinct = tuple(sorted(where))
    if requested == -1:
        return GroupSizeFit(-1, -1, distinct, "group size -1 (one scale per output channel)")
    if requested is not None:
        bad = [w for w in distinct if w % requested]
        if not bad:
            return GroupSizeFit(requested, requested, distinct, f"group size {requested}")
        fit = largest_fit(distinct, requested)
        if fit is None:
            raise GroupSizeError(_refusal(where, bad, per_channel_ok))
        raise GroupSizeError(
            f"{where[bad[0]]} has {bad[0]} input features, not a multiple of group_size "
            f"{requested}; pass --quant-group-size {fit} (group_size={fit}), which divides every "
            f"quantized width ({', '.join(map(str, distinct))}), or leave the group size out: "
            f"the default is fitted to the model"
        )
    used = largest_fit(distinct, DEFAULT_GROUP_SIZE)
    if used is None:
        bad = [w for w in distinct if w % MIN_GROUP_SIZE]
        raise GroupSizeError(_refusal(where, bad, per_channel_ok))
    if used == DEFAULT_GROUP_SIZE:
        return GroupSizeFit(None, used, distinct, f"group size {used} (the default)")
    bad = [w for w in distinct if w % DEFAULT_GROUP_SIZE]
    note = (
        f"group size {used}: the default {DEFAULT_GROUP_SIZE} does not divide {where[bad[0]]} "
        f"({bad[0]} input features); {used} divides every quantized input width "
        f"({', '.join(map(str, distinct))})"
    )
    return GroupSizeFit(None, used, distinct, note)


# ---- widths ----------------------------------------------------------------------------------
def model_widths(model: nn.Module) -> dict[int, str]:
    """Input width -> the first Linear that has it, over every ``nn.Linear`` in the decoder
    layers (what the built-in quantizers quantize); read from ``in_features``."""
    from prunekit.plugins import get_adapter

    out: dict[int, str] = {}
    for i, layer in enumerate(get_adapter(model).layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                out.setdefault(int(module.in_features), f"layer {i} {name}")
    return out


def shapes_after(shapes: list[LayerShape], plan: Any) -> list[LayerShape]:
    """Per-layer shapes after ``plan`` (removed layers dropped, sub-blocks zeroed), from the
    shapes alone; the plan is validated as :func:`prunekit.apply_plan` does."""
    head_keeps = plan.validate(shapes)
    out = []
    for i, s in enumerate(shapes):
        if i in plan.layers:
            continue
        n_heads, n_kv = s.n_heads, s.n_kv_heads
        if i in head_keeps:
            n_heads, n_kv = len(head_keeps[i][0]), len(head_keeps[i][1])
        neurons = len(set(plan.neurons.get(i, [])))
        shape = LayerShape(n_heads, n_kv, s.head_dim, s.intermediate - neurons)
        out.append(shape.without(attention=i in plan.attention, mlp=i in plan.mlp))
    return out


def planned_widths(config: Any, shapes: list[LayerShape]) -> dict[int, str]:
    """Input width -> where, of the Linears a model of ``shapes`` (e.g. :func:`shapes_after`)
    has in its decoder layers: the hidden size (q/k/v, gate/up), ``n_heads x head_dim`` (the
    attention output) and the MLP width (down)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(config_global(text, "hidden_size"))
    out: dict[int, str] = {}
    for i, s in enumerate(shapes):
        if s.has_attention or s.has_mlp:
            out.setdefault(hidden, "the hidden size")
        if s.has_attention:
            out.setdefault(s.n_heads * s.head_dim, f"layer {i} attention output (heads x dim)")
        if s.has_mlp:
            out.setdefault(s.intermediate, f"layer {i} MLP")
    return out


# ---- a quantizer's config --------------------------------------------------------------------
def uses_group_size(quantizer: Any, config: Any) -> bool:
    """Whether ``config`` quantizes in groups: it has a ``group_size`` field and the quantizer
    does not say otherwise (optional ``uses_group_size(config)``; torchao: int4_grouped only)."""
    if not dataclasses.is_dataclass(config) or "group_size" not in {
        f.name for f in dataclasses.fields(config)
    }:
        return False
    own = getattr(quantizer, "uses_group_size", None)
    return bool(own(config)) if own is not None else True


def _accepts(config: Any, group_size: int) -> bool:
    try:
        dataclasses.replace(config, group_size=group_size)
    except ValueError:
        return False
    return True


def fit_config(
    quantizer: Any, config: Any, widths: Mapping[int, str] | Iterable[int]
) -> tuple[Any, GroupSizeFit | None]:
    """``config`` with the group size :func:`fit_group_size` chooses for ``widths``, and the
    fit (None when the quantizer does not quantize in groups with this config)."""
    if not uses_group_size(quantizer, config):
        return config, None
    fit = fit_group_size(config.group_size, widths, per_channel_ok=_accepts(config, -1))
    return dataclasses.replace(config, group_size=fit.used), fit


def check_planned(quantizer: Any, config: Any, model_config: Any, shapes: list[LayerShape]):
    """Preflight: fit (or refuse) the group size for a model of ``shapes`` (after the plan)
    described by ``model_config``; returns the :class:`GroupSizeFit` or None."""
    return fit_config(quantizer, config, planned_widths(model_config, shapes))[1]


def report_lines(out_dir: str | Path) -> list[str]:
    """The report's quantization section, from the ``quantization`` entry of the sidecar in
    ``out_dir`` (nothing when the model was not quantized)."""
    path = Path(out_dir) / "prunekit.json"
    try:
        quantization = json.loads(path.read_text(encoding="utf-8")).get("quantization")
    except (OSError, ValueError):
        return []
    if not quantization:
        return []
    method, backend = quantization.get("method"), quantization.get("backend")
    lines = ["## Quantization", "", f"- method: {method}" + (f" ({backend})" if backend else "")]
    config = quantization.get("config") or {}
    settings = ", ".join(f"{k} {config[k]}" for k in ("bits", "scheme", "sym") if k in config)
    if settings:
        lines.append(f"- settings: {settings}")
    group = quantization.get("group_size")
    if group:
        lines.append(f"- {group['note']} (requested: {group['requested']})")
    if quantization.get("size_on_disk_mb") is not None:
        lines.append(f"- weights on disk: {quantization['size_on_disk_mb']:.1f} MB")
    return [*lines, ""]


__all__ = [
    "DEFAULT_GROUP_SIZE",
    "MIN_GROUP_SIZE",
    "GroupSizeError",
    "GroupSizeFit",
    "check_planned",
    "fit_config",
    "fit_group_size",
    "largest_fit",
    "model_widths",
    "planned_widths",
    "report_lines",
    "shapes_after",
    "uses_group_size",
]
