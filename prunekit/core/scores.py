"""Importance scores: the scorer contract (:class:`Scorer`), :func:`score` that runs scorers
on calibration samples, and :class:`Scores` that holds the results (higher = keep) and
round-trips through JSON.

A scorer is a plugin (:mod:`prunekit.contracts`): ``name``, ``config_class``, ``available()``,
plus metadata that says what it is -- never its name:

- ``unit``: ``"layers"``, ``"heads"``, ``"neurons"``, ``"attention"`` or ``"mlps"`` (the
  last two: a layer's attention / MLP sub-block, scores ``[L]``);
- ``kind``: ``"forward"`` (streams statistics from the shared capture pass: set
  ``accumulator_class`` or implement ``accumulator(ctx, config) -> Accumulator``),
  ``"gradient"`` (shares one forward + backward pass per batch with the other gradient
  scorers: implement ``accumulator`` with the ``"gradients"`` tap and
  ``params(model, adapter) -> list[Parameter]``), or ``"custom"``
  (implement ``run(model, samples, ctx, config, *, batch_size, progress) -> Tensor``);
- ``block``: the selection removes one contiguous block of layers (angular distance);
- ``sequential_ok``: whether it runs in sequential (layer-by-layer) mode;
- ``counterparts``: ``{unit: scorer name}`` -- the scorer that plays this one's role for
  another unit (Taylor heads → ``neuron_taylor`` for neurons), so a target may say
  ``neuron_scorer="taylor"``.

Results: higher = keep. Layers ``[L]`` (a block scorer: ``[L, L]``, row ``n-1`` the cost of
removing ``n`` layers from each start); heads ``[L, n_query_heads]``; neurons
``[L, intermediate]`` (a list when widths differ).

A scorer name is resolved to its object once (:func:`get_scorer`); :func:`score` and the
selection accept either and hold objects from then on.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit import plugins
from prunekit.contracts import (
    PluginBase,
    build_config,
    check_available,
    option_fields,
    parse_options,
)
from prunekit.core.capture import (
    Accumulator,
    Context,
    capture,
    capture_gradients,
    capture_sequential,
    is_model_dir,
)
from prunekit.core.devices import load_or_check, resolve_device, resolve_dtype
from prunekit.core.jsonfile import read_json_object
from prunekit.core.shapes import LayerShape
from prunekit.errors import DeviceError

Value = torch.Tensor | list[torch.Tensor]
_UNITS = ("layers", "heads", "neurons", "attention", "mlps")
_KINDS = ("forward", "gradient", "custom")


# ---- the contract ----------------------------------------------------------------------------
class Scorer(PluginBase):
    """Base class of scorers (see the module docstring for the metadata)."""

    name: ClassVar[str]
    unit: ClassVar[str]
    kind: ClassVar[str] = "forward"
    block: ClassVar[bool] = False
    sequential_ok: ClassVar[bool] = True
    counterparts: ClassVar[Mapping[str, str]] = {}
    #: built as ``accumulator_class(ctx, config)`` by the default :meth:`accumulator`
    accumulator_class: ClassVar[type[Accumulator] | None] = None

    def accumulator(self, ctx: Context, config: Any) -> Accumulator:
        if self.accumulator_class is None:
            raise NotImplementedError(f"scorer {self.name!r} has no accumulator")
        return self.accumulator_class(ctx, config)

    def params(self, model: Any, adapter: Any) -> list[nn.Parameter]:
        return []

    def run(self, model, samples, ctx: Context, config, *, batch_size: int, progress: bool):
        raise NotImplementedError(f"scorer {self.name!r} has no run()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.unit}, {self.kind})>"


def is_block(scorer: Any) -> bool:
    """Whether a scorer's selection removes one contiguous block of layers."""
    return bool(getattr(scorer, "block", False))


def get_scorer(scorer: Any, unit: str | None = None) -> Any:
    """The scorer object for a registered name (an object passes through), checked against
    the contract and ``available()``. With ``unit``, a scorer of another unit is replaced by
    the counterpart it declares for ``unit`` (``taylor`` → ``neuron_taylor`` for neurons)."""
    reg = plugins.get_plugins().scorers
    obj = reg.get(scorer) if isinstance(scorer, str) else scorer
    if unit is not None and obj.unit != unit:
        other = getattr(obj, "counterparts", {}).get(unit)
        if other is None:
            raise ValueError(
                f"scorer {obj.name!r} scores {obj.unit}, not {unit}; {unit} scorers: "
                + ", ".join(n for n in reg.names() if reg.get(n).unit == unit)
            )
        return get_scorer(other, unit)
    if obj.unit not in _UNITS or getattr(obj, "kind", None) not in _KINDS:
        raise ValueError(
            f"scorer {obj.name!r}: unit must be one of {_UNITS} (got {obj.unit!r}) and kind "
            f"one of {_KINDS} (got {getattr(obj, 'kind', None)!r})"
        )
    check_available(obj, "scorer")
    return obj


def scorer_options(
    pairs: Iterable[str] | None, scorers: Sequence[Any], flag: str = "--scorer-opt"
) -> dict[str, dict[str, str]]:
    """CLI ``key=value`` pairs → ``{scorer name: {key: value}}`` for ``configs=``.

    ``name.key=value`` sets an option of scorer ``name``; a plain ``key=value`` goes to every
    one of ``scorers`` (objects) whose config has a field ``key``. Either way an option no
    requested scorer takes is an error naming the valid ones."""
    objs = {s.name: s for s in scorers}
    out: dict[str, dict[str, str]] = {}
    for key, value in parse_options(pairs, flag).items():
        name, dot, option = key.rpartition(".")
        if dot and name not in objs:
            raise ValueError(
                f"{flag} {key}={value}: {name!r} is not a requested scorer "
                f"({', '.join(objs) or 'none'})"
            )
        takers = [objs[name]] if dot else [s for s in objs.values() if _has_option(s, option)]
        if not takers or not all(_has_option(s, option) for s in takers):
            valid = sorted(f"{s.name}.{f}" for s in objs.values() for f in _option_names(s))
            raise ValueError(
                f"{flag} {key}={value}: no requested scorer has option {option!r}; valid: "
                f"{', '.join(valid) or '(none)'}"
            )
        for s in takers:
            out.setdefault(s.name, {})[option] = value
    return out


def _option_names(scorer: Any) -> list[str]:
    return list(option_fields(scorer.config_class))


def _has_option(scorer: Any, option: str) -> bool:
    return option in _option_names(scorer)


# ---- results ---------------------------------------------------------------------------------
def group_sums(row: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """A layer's per-query-head scores summed per KV group (``[n_kv_heads]``)."""
    return row.reshape(shape.n_kv_heads, shape.group_size).sum(1)


@dataclass
class Scores:
    """Scorer name → scores. ``units[name]`` is ``"layers"``, ``"heads"`` or ``"neurons"``;
    ``shapes`` are the per-layer shapes of the scored model (to aggregate heads per KV group);
    ``meta`` records how the scores were made (scorer configs, samples, mode, seconds)."""

    values: dict[str, Value] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    shapes: list[LayerShape] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- mapping -----------------------------------------------------------------------
    def __getitem__(self, name: str) -> Value:
        if name not in self.values:
            held = ", ".join(self.values) or "(none)"
            raise KeyError(
                f"no scores for {name!r}; these scores hold {held} -- add the scorer to "
                "score(..., scorers=[...])"
            )
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def names(self) -> list[str]:
        return list(self.values)

    def unit(self, name: str) -> str:
        self[name]
        return self.units[name]

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    def layer_rows(self, name: str) -> list[torch.Tensor]:
        """The scores of ``name`` as one tensor per layer (a stacked tensor or a list)."""
        return list(self[name])

    def head_groups(self, name: str) -> Value:
        """Per-KV-group aggregate of a head score: the sum over each group's query heads,
        ``[L, n_kv]`` (a list when the group counts differ between layers)."""
        if self.unit(name) != "heads":
            raise ValueError(f"{name!r} scores {self.units[name]}, not heads")
        pairs = zip(self.layer_rows(name), self.shapes, strict=True)
        return stack_or_list([group_sums(row, s) for row, s in pairs])

    def merge(self, other: Scores) -> Scores:
        """Scores of both (``other`` wins on a name clash)."""
        meta = {**self.meta, **other.meta}
        meta["scorers"] = {**self.meta.get("scorers", {}), **other.meta.get("scorers", {})}
        return Scores(
            {**self.values, **other.values},
            {**self.units, **other.units},
            other.shapes or self.shapes,
            meta,
        )

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "prunekit.scores/1",
            "scores": {
                name: {"unit": self.units[name], "values": _to_list(v)}
                for name, v in self.values.items()
            },
            "shapes": [s.to_dict() for s in self.shapes],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scores:
        if d.get("format") != "prunekit.scores/1":
            raise ValueError(
                f"not a prunekit scores file (format {d.get('format')!r}); write one with "
                "Scores.to_json or `prunekit score`"
            )
        values, units = {}, {}
        for name, entry in d["scores"].items():
            units[name] = entry["unit"]
            values[name] = _from_list(entry["values"])
        shapes = [LayerShape(**s) for s in d.get("shapes", [])]
        return cls(values, units, shapes, d.get("meta", {}))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Scores:
        """Read scores from inline JSON or a file (``FileNotFoundError`` if it is missing)."""
        return cls.from_dict(read_json_object(text_or_path, "scores"))


def stack_or_list(rows: list[torch.Tensor]) -> Value:
    """One tensor when every layer has the same width, else the per-layer list."""
    if rows and all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    return rows


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _to_list(v: Value) -> Any:
    if isinstance(v, torch.Tensor):
        return {"tensor": _nan_to_none(v.tolist())}
    return {"rows": [_nan_to_none(r.tolist()) for r in v]}


def _none_to_nan(x: Any) -> Any:
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return float("nan") if x is None else x


def _from_list(d: dict[str, Any]) -> Value:
    if "tensor" in d:
        return torch.tensor(_none_to_nan(d["tensor"]), dtype=torch.float32)
    return [torch.tensor(r, dtype=torch.float32) for r in d["rows"]]


# ---- the API ---------------------------------------------------------------------------------
def _samples_tensor(samples: Any) -> torch.Tensor:
    if hasattr(samples, "load") and not isinstance(samples, torch.Tensor):
        raise TypeError(
            "pass calibration token ids: call calibration.load(tokenizer) (or "
            "prunekit.core.calibration.load_calibration) first"
        )
    if not isinstance(samples, torch.Tensor):
        samples = torch.as_tensor(samples)
    if samples.dim() != 2 or samples.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"samples must be integer token ids [n_samples, seq_len], got {samples.dtype} "
            f"{tuple(samples.shape)}; build them with load_calibration()"
        )
    return samples.long()


def _resolve(scorers: Any, configs: Mapping[str, Any] | None) -> tuple[dict, dict]:
    """``{name: scorer}`` and ``{name: config}`` for the requested scorers (names or objects;
    ``configs`` keyed by name, each a config instance or a mapping of its options)."""
    if isinstance(scorers, str):
        scorers = [s for s in scorers.split(",") if s]
    if not scorers:
        raise ValueError("no scorers requested; pass e.g. scorers=['block_influence']")
    objs: dict[str, Any] = {}
    for s in scorers:
        obj = get_scorer(s)
        objs.setdefault(obj.name, obj)
    configs = dict(configs or {})
    unknown = set(configs) - set(objs)
    if unknown:
        raise ValueError(f"configs given for scorers not requested: {sorted(unknown)}")
    cfgs = {n: build_config(s, configs.get(n), section=f"scorer {n}") for n, s in objs.items()}
    return objs, cfgs


def _placed(model: Any, sequential: bool, placement: dict[str, Any]) -> tuple[Any, dict]:
    """The model to score and, for a directory scored layer by layer, the ``dtype`` /
    ``device`` its layers are loaded in (:func:`prunekit.core.capture.capture_sequential`).
    Any other path is loaded with ``placement``; an in-memory model keeps its own."""
    if not (sequential and isinstance(model, (str, Path))):
        return load_or_check(model, **placement)[0], {}
    if placement["device_map"] is not None or placement["max_memory"]:
        raise DeviceError(
            "device_map",
            placement["device_map"],
            "sequential scoring loads one layer at a time onto one device; drop device_map",
        )
    device = placement["device"]
    return model, {
        "dtype": resolve_dtype(placement["dtype"], model),
        "device": resolve_device("auto" if device is None else device),
    }


def _model_shapes(model: Any) -> tuple[Any, list[LayerShape]]:
    """The adapter and layer shapes of a loaded model or (sequential mode) a model directory."""
    if not isinstance(model, (str, Path)):
        adapter = plugins.get_adapter(model)
        return adapter, adapter.shapes(model)
    if not is_model_dir(model):
        raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
    from prunekit.core.io import read_config

    config = read_config(model)
    adapter = plugins.get_adapter(config)
    return adapter, adapter.config_shapes(config)


def _run_forward(
    model, samples, ctx, objs, cfgs, *, batch_size, progress, load=None
) -> dict[str, Value]:
    accs = {n: s.accumulator(ctx, cfgs[n]) for n, s in objs.items() if s.kind == "forward"}
    if accs:
        run = functools.partial(capture_sequential, **(load or {})) if ctx.sequential else capture
        run(model, samples, list(accs.values()), batch_size=batch_size, progress=progress)
    return {n: a.result() for n, a in accs.items()}


def _run_gradient(model, samples, ctx, objs, cfgs, *, batch_size, progress) -> dict[str, Value]:
    gradient = {n: s for n, s in objs.items() if s.kind == "gradient"}
    if not gradient:
        return {}
    accs = {n: s.accumulator(ctx, cfgs[n]) for n, s in gradient.items()}
    params = [p for s in gradient.values() for p in s.params(model, ctx.adapter)]
    capture_gradients(
        model, samples, list(accs.values()), params=params, batch_size=batch_size, progress=progress
    )
    return {n: a.result() for n, a in accs.items()}


def _run_custom(model, samples, ctx, objs, cfgs, *, batch_size, progress) -> dict[str, Value]:
    return {
        n: s.run(model, samples, ctx, cfgs[n], batch_size=batch_size, progress=progress)
        for n, s in objs.items()
        if s.kind == "custom"
    }


def score(
    model: nn.Module | str | Path,
    samples: torch.Tensor,
    scorers: Sequence[Any],
    *,
    configs: Mapping[str, Any] | None = None,
    sequential: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
) -> Scores:
    """Run ``scorers`` (registered names or scorer objects) on calibration ``samples`` (token
    ids ``[N, seq_len]``) → :class:`Scores`.

    All forward-only scorers share one capture pass; gradient scorers share one
    forward + backward pass per batch; custom scorers run their own passes.
    ``sequential=True`` runs the model layer by layer (see :mod:`prunekit.core.capture`);
    ``model`` may then be a model directory whose layers are loaded one at a time.
    ``configs`` maps a scorer name to its config dataclass or a mapping of its options
    (strings from the CLI are coerced to the field types, see :func:`scorer_options`).

    ``device`` / ``dtype`` / ``device_map`` / ``max_memory`` place a ``model`` given as a
    path (as :func:`prunekit.load_model` does; ``device`` defaults to ``"auto"``, ``dtype`` to
    the checkpoint's own; a directory scored sequentially is read one layer at a time onto
    ``device``); an in-memory model keeps its own device and dtype (asking for another is a
    :class:`~prunekit.errors.DeviceError`). Statistics accumulate in float32 whatever the
    model dtype.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    samples = _samples_tensor(samples)
    objs, cfgs = _resolve(scorers, configs)
    placement = dict(device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    model, load = _placed(model, sequential, placement)
    adapter, shapes = _model_shapes(model)
    if sequential:
        bad = [n for n, s in objs.items() if not s.sequential_ok or s.kind != "forward"]
        if bad:
            raise ValueError(
                f"scorers {bad} need whole-model passes (gradients or repeated forward passes) "
                "and cannot run in sequential mode; drop them or use sequential=False"
            )
    n, seq_len = samples.shape
    ctx = Context(adapter, shapes, n, seq_len, sequential=sequential, causal=adapter.causal)
    started = time.perf_counter()
    results: dict[str, Value] = {}
    run = {"batch_size": batch_size, "progress": progress}
    results |= _run_forward(model, samples, ctx, objs, cfgs, **run, load=load)
    for stage in (_run_gradient, _run_custom):
        results |= stage(model, samples, ctx, objs, cfgs, **run)
    meta = {
        "scorers": {n: _config_dict(cfgs[n]) for n in objs},
        "n_samples": int(n),
        "seq_len": int(seq_len),
        "sequential": bool(sequential),
        "seconds": round(time.perf_counter() - started, 3),
    }
    ordered = {n: results[n] for n in objs}
    return Scores(ordered, {n: s.unit for n, s in objs.items()}, list(shapes), meta)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return asdict(cfg) if is_dataclass(cfg) else {}


__all__ = [
    "Scorer",
    "Scores",
    "get_scorer",
    "group_sums",
    "is_block",
    "score",
    "scorer_options",
    "stack_or_list",
]
