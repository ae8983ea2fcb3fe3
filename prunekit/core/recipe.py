"""Recipes: everything one ``prunekit compress`` run does, as a dataclass tree.

A recipe round-trips through YAML/JSON (``Recipe.from_file``, ``recipe.to_dict()``) and is
validated when built, with errors that name the field (``recovery.steps: ...``)::

    targets:                # what to remove and how to choose it (prunekit.core.select.Targets)
      layers: 0.2           # a fraction in [0, 1) or a count
      heads: 0.1
      neurons: 0.25
      layer_scorer: block_influence
      mode: uniform         # or per_layer
    iterative: 1            # score -> select -> apply (-> recover) this many times
    calibration: {source: null, n_samples: 64, seq_len: 256, seed: 0}   # null: Brown (bundled)
    recovery: {method: lora, steps: 100, options: {lr: 1.0e-4}}         # method null: none
    quantize: {method: torchao, options: {scheme: int8_weight_only}}    # method null: none
    evaluation: {text: null, max_chars: 100000, context_len: 2048}      # none: no perplexity
    heal: {method: linear, options: {ridge: 1.0e-4}}   # fold a fitted map per removed run
    placement: {device: auto, dtype: auto}   # cuda, bfloat16, device_map: auto, max_memory
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.core.calibration import Calibration
from prunekit.core.select import Targets


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {message}")


@dataclass
class CalibrationSection(Calibration):
    """The recipe's :class:`~prunekit.core.calibration.Calibration`, with smaller defaults
    (64 x 256 tokens) and errors that name the recipe field."""

    n_samples: int = field(default=64, metadata={"help": "number of calibration sequences"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})

    def __post_init__(self) -> None:
        _check(self.n_samples >= 1, "calibration.n_samples", f"must be >= 1, got {self.n_samples}")
        _check(self.seq_len >= 2, "calibration.seq_len", f"must be >= 2, got {self.seq_len}")
        super().__post_init__()


@dataclass
class EvaluationSection:
    text: str | None = field(
        default=None,
        metadata={
            "help": "held-out text for perplexity: a file/folder, a preset, a datasets spec, or "
            "'none' (skip); None: WikiText-2 test via datasets or the local copy, else skipped"
        },
    )
    context_len: int = field(default=2048, metadata={"help": "perplexity window (tokens)"})
    max_chars: int | None = field(
        default=100_000, metadata={"help": "use only the first N characters (None: all)"}
    )
    max_tokens: int | None = field(default=None, metadata={"help": "token budget (None: all)"})
    latency: bool = field(default=True, metadata={"help": "measure prefill/decode speed"})
    prompt_len: int = field(default=128, metadata={"help": "latency prompt length"})
    new_tokens: int = field(default=32, metadata={"help": "latency decode length"})
    repeats: int = field(
        default=5,
        metadata={"help": "latency: interleaved rounds of every model (>= 5 to claim a speedup)"},
    )

    def __post_init__(self) -> None:
        _check(self.context_len >= 2, "evaluation.context_len", "must be >= 2")
        for name in ("max_chars", "max_tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"evaluation.{name}", "must be >= 1 or null")
        for name in ("prompt_len", "new_tokens", "repeats"):
            _check(getattr(self, name) >= 1, f"evaluation.{name}", "must be >= 1")

    def evaluate_kwargs(self) -> dict[str, Any]:
        """:func:`prunekit.core.evaluate.evaluate`'s keywords from this section (all but the
        text, which :func:`prunekit.core.data.resolve_eval_text` resolves once)."""
        speed = ("prompt_len", "new_tokens", "repeats")
        return {
            "context_len": self.context_len,
            "max_tokens": self.max_tokens,
            "max_chars": self.max_chars,
            "latency_kwargs": {name: getattr(self, name) for name in speed},
            "measure_latency": self.latency,
        }


@dataclass
class PlacementSection:
    """``placement: {device, dtype, device_map, max_memory}``: where a model given as a path
    is loaded and run (an in-memory model keeps its own); the CLI's ``--device`` / ``--dtype``
    / ``--device-map`` / ``--max-memory`` override it. Checked here for form; whether the
    device exists is checked before any work (:func:`prunekit.core.devices.resolve_device`)."""

    device: str = field(
        default="auto", metadata={"help": "auto|cpu|cuda|cuda:N (auto: CUDA when available)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto|bfloat16|float16|float32 (auto: the checkpoint's own dtype)"},
    )
    device_map: str | None = field(
        default=None, metadata={"help": "auto|balanced|sequential: spread over GPUs/CPU/disk"}
    )
    max_memory: dict[Any, str] | None = field(
        default=None, metadata={"help": "with device_map: per-device budget {0: 20GiB, cpu: 60GiB}"}
    )

    def __post_init__(self) -> None:
        from prunekit.core.devices import DTYPE_CHOICES, parse_device

        _check(self.dtype in DTYPE_CHOICES, "placement.dtype", f"must be one of {DTYPE_CHOICES}")
        parse_device(self.device, "placement.device")
        _check(
            self.device_map in (None, "auto", "balanced", "sequential"),
            "placement.device_map",
            f"must be auto, balanced, sequential or null, got {self.device_map!r}",
        )
        _check(
            self.max_memory is None or isinstance(self.max_memory, dict),
            "placement.max_memory",
            "must be a mapping of device to size, e.g. {0: 20GiB, cpu: 60GiB}",
        )
        _check(
            not self.max_memory or self.device_map is not None,
            "placement.max_memory",
            "needs placement.device_map (e.g. auto)",
        )

    def override(self, **given: Any) -> PlacementSection:
        """This section with the fields given (not ``None``) replaced: the API's and the
        CLI's ``device`` / ``dtype`` / ``device_map`` / ``max_memory`` win over the recipe's."""
        names = {"device": str, "dtype": lambda d: str(d).removeprefix("torch.")}
        given = {k: names.get(k, lambda v: v)(v) for k, v in given.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    def load_kwargs(self) -> dict[str, Any]:
        """:func:`prunekit.load_model`'s ``device`` / ``dtype`` / ``device_map`` /
        ``max_memory``, checked against this machine (a :class:`DeviceError` otherwise)."""
        from prunekit.core.devices import check_device_map, resolve_device

        max_memory = {
            int(k) if str(k).isdigit() else k: v for k, v in (self.max_memory or {}).items()
        } or None
        check_device_map(self.device_map, max_memory)
        device = None if self.device_map else resolve_device(self.device)
        return {
            "device": device,
            "dtype": self.dtype,
            "device_map": self.device_map,
            "max_memory": max_memory,
        }


@dataclass
class PluginSection:
    """A recipe section that names a plugin and passes its options through:
    ``{method: NAME, options: {...}}``. The plugin object is resolved once, by the caller
    (:func:`prunekit.core.pipeline.preflight`), and handed to :meth:`config`."""

    method: str | None = field(default=None, metadata={"help": "plugin name (null: skip)"})
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "the plugin's own options (its config fields)"}
    )

    def __post_init__(self) -> None:
        section = _section_name(self)
        _check(self.method is None or isinstance(self.method, str), f"{section}.method", "a name")
        _check(isinstance(self.options, dict), f"{section}.options", "must be a mapping")

    def convenience(self) -> dict[str, Any]:
        """The section's shorthand fields that are set (they fold into the options)."""
        names = {f.name for f in dataclasses.fields(PluginSection)}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in names and getattr(self, f.name) is not None
        }


@dataclass
class RecoverySection(PluginSection):
    """``recovery: {method, options}``; ``steps`` and ``minutes`` are shorthands for the
    options of the same name."""

    method: str | None = field(
        default=None, metadata={"help": "recovery plugin name (lora, full, distill, qlora)"}
    )
    steps: int | None = field(default=None, metadata={"help": "step budget (None: default)"})
    minutes: float | None = field(default=None, metadata={"help": "time budget in minutes"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.steps is None or self.steps >= 1, "recovery.steps", "must be >= 1 or null")
        _check(self.minutes is None or self.minutes > 0, "recovery.minutes", "must be > 0 or null")

    def config(self, method: Any) -> Any:
        """``method``'s validated config (the recovery plugin object) from the options, with
        ``steps``/``minutes`` on top."""
        from prunekit.core.recovery import recovery_config

        return recovery_config(method, {**self.options, **self.convenience()})


@dataclass
class QuantizeSection(PluginSection):
    """``quantize: {method, options}``; ``bits``, ``group_size`` and ``scheme`` are shorthands
    mapped onto the quantizer's options as the CLI flags are (``options`` win)."""

    method: str | None = field(
        default=None, metadata={"help": "quantizer plugin name (awq, gptq, torchao)"}
    )
    bits: int | None = field(default=None, metadata={"help": "weight bits (awq/gptq: 4)"})
    group_size: int | None = field(
        default=None,
        metadata={"help": "group size (null: the largest of 128, 64, 32 that fits the model)"},
    )
    scheme: str | None = field(
        default=None, metadata={"help": "torchao scheme (int8_weight_only, int8_dynamic...)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.bits is None or self.bits >= 2, "quantize.bits", "must be >= 2 or null")
        _check(
            self.group_size is None or self.group_size >= 1 or self.group_size == -1,
            "quantize.group_size",
            "must be >= 1, -1 (per channel) or null",
        )

    def config(self, quantizer: Any) -> Any:
        """``quantizer``'s validated config (the quantizer plugin object)."""
        from prunekit.core.quantize import quantizer_config

        return quantizer_config(quantizer, self.options, **self.convenience())


@dataclass
class HealSection(PluginSection):
    """``heal: {method: linear, options: {ridge, objective, sequential}}``: training-free
    healing of the removed layers (:mod:`prunekit.core.heal`), after selection and before
    the layers are removed."""

    method: str | None = field(default=None, metadata={"help": "'linear' (null: no healing)"})

    def config(self, healer: Any) -> Any:
        """``healer``'s validated config from the options."""
        from prunekit.contracts import build_config

        return build_config(healer, self.options, section="heal.options")


def _section_name(section: Any) -> str:
    names = {RecoverySection: "recovery", QuantizeSection: "quantize", HealSection: "heal"}
    return names.get(type(section), "plugin")


_SECTIONS = {
    "placement": PlacementSection,
    "calibration": CalibrationSection,
    "evaluation": EvaluationSection,
    "recovery": RecoverySection,
    "quantize": QuantizeSection,
    "heal": HealSection,
}


@dataclass
class Recipe:
    """A whole compression run: targets and selection, calibration, recovery, quantization,
    evaluation. The steps always run prune -> recover -> quantize."""

    targets: Targets = field(default_factory=Targets)
    iterative: int = field(
        default=1, metadata={"help": "repeat score -> select -> apply (-> recover) k times"}
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "score layer by layer from the safetensors and stream the plan to the "
            "output: a model larger than memory (prunekit.core.sequential)"
        },
    )
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    heal: HealSection = field(default_factory=HealSection)
    placement: PlacementSection = field(default_factory=PlacementSection)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.iterative, int) and self.iterative >= 1,
            "iterative",
            f"must be an integer >= 1, got {self.iterative!r}",
        )
        _check(
            self.heal.method is None or self.iterative == 1,
            "heal",
            "linear healing fits on the unpruned model; use iterative: 1",
        )

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"targets": self.targets.to_dict(), "iterative": self.iterative}
        if self.sequential:
            out["sequential"] = True
        for name in _SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise ValueError(f"recipe: expected a mapping, got {type(data).__name__}")
        known = {"targets", "iterative", "sequential", *_SECTIONS}
        unknown = sorted(set(data) - known)
        _check(not unknown, "recipe", f"unknown sections {unknown}; valid: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "targets" in data:
            kwargs["targets"] = Targets.from_dict(data["targets"] or {})
        if "iterative" in data:
            kwargs["iterative"] = data["iterative"]
        if "sequential" in data:
            _check(isinstance(data["sequential"], bool), "sequential", "must be true or false")
            kwargs["sequential"] = data["sequential"]
        for name, section_cls in _SECTIONS.items():
            if name in data:
                kwargs[name] = _build_section(name, section_cls, data[name] or {})
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} not found")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data or {})

    def to_file(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def replace(self, **sections: Any) -> Recipe:
        return dataclasses.replace(self, **sections)


def _build_section(name: str, section_cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, name, f"unknown fields {unknown}; valid: {sorted(names)}")
    return section_cls(**data)
