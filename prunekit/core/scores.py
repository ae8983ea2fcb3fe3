"""Importance scores: :func:`score` runs scorers on calibration samples; :class:`Scores` holds
the results (higher = keep) and round-trips through JSON."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.shapes import LayerShape

Value = torch.Tensor | list[torch.Tensor]


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
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(
                f"no scores for {name!r}; these scores hold {', '.join(self.values) or '(none)'}"
                " -- add the scorer to score(..., scorers=[...])"
            ) from None

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
        """The scores of ``name`` as one tensor per layer (heads / neurons)."""
        v = self[name]
        return list(v) if isinstance(v, torch.Tensor) else list(v)

    def head_groups(self, name: str) -> Value:
        """Per-KV-group aggregate of a head score: the sum over each group's query heads,
        ``[L, n_kv]`` (a list when the group counts differ between layers)."""
        if self.unit(name) != "heads":
            raise ValueError(f"{name!r} scores {self.units[name]}, not heads")
        rows = []
        for row, s in zip(self.layer_rows(name), self.shapes, strict=True):
            rows.append(row.reshape(s.n_kv_heads, s.group_size).sum(1))
        if all(r.shape == rows[0].shape for r in rows):
            return torch.stack(rows)
        return rows

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
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"scores file {path} does not exist")
            text = path.read_text()
        return cls.from_dict(json.loads(text))


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


def get_scorer(name: str, unit: str | None = None) -> Any:
    """The registered scorer ``name``; with ``unit`` also accepts the unit-less alias of the
    neuron scorers (``"taylor"`` → ``"neuron_taylor"`` for neurons)."""
    from prunekit.plugins import get_plugins

    reg = get_plugins().scorers
    if unit is not None and name in reg and reg.get(name).unit != unit:
        alias = f"neuron_{name}" if unit == "neurons" else None
        if alias and alias in reg:
            return reg.get(alias)
        raise ValueError(
            f"scorer {name!r} scores {reg.get(name).unit}, not {unit}; {unit} scorers: "
            + ", ".join(n for n in reg.names() if reg.get(n).unit == unit)
        )
    return reg.get(name)


def score(
    model: nn.Module | str | Path,
    samples: torch.Tensor,
    scorers: Sequence[str],
    *,
    batch_size: int = 8,
    sequential: bool = False,
    progress: bool = True,
    configs: dict[str, Any] | None = None,
) -> Scores:
    """Run ``scorers`` (registered names) on calibration ``samples`` (token ids
    ``[N, seq_len]``) → :class:`Scores`.

    All forward-only scorers share one capture pass; gradient scorers share one
    forward + backward pass per batch; custom scorers run their own passes.
    ``sequential=True`` runs the model layer by layer (see :mod:`prunekit.core.capture`);
    ``model`` may then be a model directory whose layers are loaded one at a time.
    ``configs`` maps a scorer name to its config dataclass or a dict of its fields.
    """
    from prunekit.core.capture import (
        Context,
        capture,
        capture_gradients,
        capture_sequential,
        is_model_dir,
    )
    from prunekit.plugins import get_adapter

    if isinstance(scorers, str):
        scorers = [s for s in scorers.split(",") if s]
    if not scorers:
        raise ValueError("no scorers requested; pass e.g. scorers=['block_influence']")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    samples = _samples_tensor(samples)
    configs = dict(configs or {})
    unknown = set(configs) - set(scorers)
    if unknown:
        raise ValueError(f"configs given for scorers not requested: {sorted(unknown)}")
    objs = {name: get_scorer(name) for name in dict.fromkeys(scorers)}
    cfgs = {name: objs[name].make_config(configs.get(name)) for name in objs}

    path_mode = isinstance(model, (str, Path))
    if path_mode:
        if not sequential:
            raise ValueError(
                "a model directory is scored in sequential mode only (sequential=True); "
                "otherwise load it first with prunekit.load_model"
            )
        if not is_model_dir(model):
            raise FileNotFoundError(f"{model} is not a model directory (no config.json)")
        from prunekit.core.io import read_config

        config = read_config(model)
        adapter = get_adapter(config)
        shapes = adapter.config_shapes(config)
    else:
        adapter = get_adapter(model)
        shapes = adapter.shapes(model)
    if sequential:
        bad = [n for n, s in objs.items() if not s.sequential_ok or s.kind != "forward"]
        if bad:
            raise ValueError(
                f"scorers {bad} need whole-model passes (gradients or repeated forward passes) "
                "and cannot run in sequential mode; drop them or use sequential=False"
            )
    ctx = Context(
        adapter=adapter,
        shapes=shapes,
        n_samples=samples.shape[0],
        seq_len=samples.shape[1],
        sequential=sequential,
        causal=adapter.causal,
    )
    started = time.perf_counter()
    results: dict[str, Value] = {}
    forward = {n: s.accumulator(ctx, cfgs[n]) for n, s in objs.items() if s.kind == "forward"}
    if forward:
        if sequential:
            capture_sequential(
                model, samples, list(forward.values()), batch_size=batch_size, progress=progress
            )
        else:
            capture(
                model, samples, list(forward.values()), batch_size=batch_size, progress=progress
            )
        results.update({n: a.result() for n, a in forward.items()})
    gradient = {n: s for n, s in objs.items() if s.kind == "gradient"}
    if gradient:
        accs = {n: s.accumulator(ctx, cfgs[n]) for n, s in gradient.items()}
        params: list[nn.Parameter] = []
        for s in gradient.values():
            params += s.params(model, adapter)
        capture_gradients(
            model,
            samples,
            list(accs.values()),
            params=params,
            batch_size=batch_size,
            progress=progress,
        )
        results.update({n: a.result() for n, a in accs.items()})
    for n, s in objs.items():
        if s.kind == "custom":
            results[n] = s.run(
                model, samples, ctx, cfgs[n], batch_size=batch_size, progress=progress
            )
    for n, s in objs.items():
        if s.kind not in ("forward", "gradient", "custom"):
            raise ValueError(f"scorer {n!r} has unknown kind {s.kind!r}")
    meta = {
        "scorers": {n: _config_dict(cfgs[n]) for n in objs},
        "n_samples": int(samples.shape[0]),
        "seq_len": int(samples.shape[1]),
        "sequential": bool(sequential),
        "seconds": round(time.perf_counter() - started, 3),
    }
    ordered = {n: results[n] for n in objs}
    return Scores(ordered, {n: objs[n].unit for n in objs}, list(shapes), meta)


def _config_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    from dataclasses import asdict, is_dataclass

    return asdict(cfg) if is_dataclass(cfg) else {}


__all__ = ["Scores", "get_scorer", "score"]
