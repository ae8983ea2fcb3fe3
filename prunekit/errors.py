"""Exceptions raised by prunekit.

Each subclasses the builtin a caller would naturally catch, carries the offending value as an
attribute, and says how to fix the problem.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base class of every prunekit error."""


class UnsupportedArchitectureError(PrunekitError, KeyError):
    """No adapter is registered for a model's ``model_type``."""

    def __init__(self, model_type: str, supported: list[str]):
        self.model_type = model_type
        self.supported = sorted(supported)
        super().__init__(
            f"no prunekit adapter for model_type {model_type!r}; supported: "
            f"{', '.join(self.supported) or '(none)'}. To add one, write a plugin with a "
            "`register_adapters(register)` hook and declare it under the `prunekit` entry-point "
            "group (see README, 'Writing a plugin')."
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class PruningPlanError(PrunekitError, ValueError):
    """A plan cannot be applied to a model; raised before any tensor is touched."""

    def __init__(self, message: str, *, entry: str | None = None):
        self.entry = entry
        super().__init__(f"{entry}: {message}" if entry else message)


class RegistryError(PrunekitError, KeyError):
    """A name is unknown to, or already taken in, a plugin registry."""

    def __init__(self, message: str, *, name: str, valid: list[str] | None = None):
        self.name = name
        self.valid = sorted(valid or [])
        super().__init__(message)

    def __str__(self) -> str:
        return self.args[0]


class OutputExistsError(PrunekitError, FileExistsError):
    """The output directory exists and is not empty, and ``overwrite`` was not given."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"output directory {path} exists and is not empty; choose another path or pass "
            "overwrite=True (CLI: --overwrite)"
        )


class OutputPathError(PrunekitError, ValueError):
    """An output path that cannot be written safely: it is, contains or lies inside the input,
    or holds files that are not a model or prunekit output."""

    def __init__(self, path: str, why: str):
        self.path, self.why = path, why
        super().__init__(f"output {path} {why}")


class UnsafeCheckpointError(PrunekitError, ValueError):
    """A checkpoint stores pickled weights (``.bin``/``.pt``), which can run arbitrary code."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"{path} holds only pickled weights (.bin/.pt/.pth), which can execute code when "
            "loaded. Convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) "
            "if you trust its source."
        )


class ModelLoadError(PrunekitError, OSError):
    """A model directory is missing files or cannot be read."""


class DeviceError(PrunekitError, ValueError):
    """An unknown or unavailable ``device`` / ``dtype`` / ``device_map`` was asked for."""

    def __init__(self, option: str, value: object, why: str):
        self.option, self.value, self.why = option, value, why
        super().__init__(f"{option} {value!r}: {why}")


class PluginUnavailableError(PrunekitError, RuntimeError):
    """A plugin's backend is not usable here (package missing, no CUDA, ...)."""

    def __init__(self, kind: str, name: str, why: str):
        self.kind = kind
        self.name = name
        self.why = why
        super().__init__(f"{kind} {name!r} is not usable here: {why}")


class StageFailedError(PrunekitError, RuntimeError):
    """An optional stage after pruning (evaluation, latency, plots, report) failed; the
    compressed model was saved first and is complete. ``failures``: stage -> what went wrong;
    ``result``: the :class:`~prunekit.core.pipeline.CompressResult`. CLI exit code 1."""

    exit_code = 1

    def __init__(self, output: str, failures: dict[str, str], result: object = None):
        self.output, self.failures, self.result = output, dict(failures), result
        what = "; ".join(f"{stage} failed ({why})" for stage, why in self.failures.items())
        super().__init__(f"the compressed model was saved to {output}, but {what}; see report.md")


class ExportError(PrunekitError, ValueError):
    """A model cannot be written in a serving format; ``problems`` lists what does not fit."""

    def __init__(self, fmt: str, problems: list[str]):
        self.format = fmt
        self.problems = list(problems)
        super().__init__(f"cannot export to {fmt}: " + "; ".join(self.problems))
