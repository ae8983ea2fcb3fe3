"""Hook specifications: how adapters, scorers, quantizers and recovery methods plug into
prunekit.

Built-in plugins use exactly these hooks; third-party packages declare a module under the
``prunekit`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.prunekit]
    my_plugin = "my_package.prunekit_hooks"

Each hook receives a ``register`` callback (as in simonw/llm) instead of returning values.
Every registered object follows the one plugin contract of :mod:`prunekit.contracts`:
``name``, ``config_class`` (a dataclass of its options) and ``available() -> (ok, why)``.
Each hook's docstring ends with a complete, runnable example module (a test runs them all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("prunekit")
hookimpl = pluggy.HookimplMarker("prunekit")


@hookspec
def register_adapters(register: Callable[[Any], None]) -> None:
    """Register architecture adapters (instances of :class:`prunekit.adapters.Adapter`).

    An adapter is looked up by each ``model_type`` it declares; it says where the layers,
    attention projections and MLP projections live, and the shared slicing does the rest.

    Example::

        from prunekit import hookimpl
        from prunekit.adapters import DecoderAdapter


        # A Llama-style decoder (model.layers[i].self_attn / .mlp) under its own model_type.
        class MyDecoderAdapter(DecoderAdapter):
            name = "my_decoder"
            model_types = ("my_decoder",)


        @hookimpl
        def register_adapters(register):
            register(MyDecoderAdapter())
    """


@hookspec
def register_scorers(register: Callable[[Any], None]) -> None:
    """Register importance scorers (subclasses of :class:`prunekit.core.scores.Scorer`).

    Metadata, never the name, says what a scorer is: ``unit`` (``layers``, ``heads``,
    ``neurons``), ``kind`` (``forward``, ``gradient``, ``custom``) and ``block``. Its options
    are the fields of ``config_class``; users set them with ``--scorer-opt NAME.KEY=VALUE``.

    Example::

        from dataclasses import dataclass, field

        import torch

        from prunekit import hookimpl
        from prunekit.core.scores import Scorer


        @dataclass
        class MlpWidthOptions:
            offset: float = field(default=0.0, metadata={"help": "added to every score (>= 0)"})

            def __post_init__(self):
                if self.offset < 0:
                    raise ValueError(f"offset must be >= 0, got {self.offset!r}")


        # Layers scored by their MLP width: wider layers are kept (higher = keep).
        class MlpWidth(Scorer):
            name = "mlp_width"
            unit = "layers"
            kind = "custom"  # computes its scores itself, in run()
            config_class = MlpWidthOptions

            def run(self, model, samples, ctx, config, *, batch_size, progress):
                widths = [float(shape.intermediate) for shape in ctx.shapes]
                return torch.tensor(widths) + config.offset


        @hookimpl
        def register_scorers(register):
            register(MlpWidth())
    """


@hookspec
def register_quantizers(register: Callable[[Any], None]) -> None:
    """Register quantizers, applied after pruning and recovery (see
    :mod:`prunekit.core.quantize` for the contract: ``quantize(model, tokenizer, calib_ids,
    config)`` returns a new quantized model). Users set options with ``--quant-opt KEY=VALUE``.

    Example::

        import copy
        from dataclasses import dataclass, field

        from prunekit import hookimpl
        from prunekit.contracts import PluginBase
        from prunekit.core.quantize import missing_modules


        @dataclass
        class Int8Options:
            dynamic: bool = field(default=False, metadata={"help": "int8 activations too"})


        class TorchaoInt8(PluginBase):
            name = "my_int8"
            config_class = Int8Options

            def available(self):
                missing = missing_modules("torchao")
                return not missing, f"pip install {' '.join(missing)}" if missing else ""

            def quantize(self, model, tokenizer, calib_ids, config):
                from torchao.quantization import (
                    Int8DynamicActivationInt8WeightConfig,
                    Int8WeightOnlyConfig,
                    quantize_,
                )

                out = copy.deepcopy(model)
                scheme = Int8DynamicActivationInt8WeightConfig if config.dynamic else None
                quantize_(out, (scheme or Int8WeightOnlyConfig)())
                return out


        @hookimpl
        def register_quantizers(register):
            register(TorchaoInt8())
    """


@hookspec
def register_recoveries(register: Callable[[Any], None]) -> None:
    """Register recovery methods, run after pruning and before quantization (see
    :class:`prunekit.core.recovery.RecoveryMethod`: ``prepare(model, config)`` says what is
    trained, ``objective(...)`` with which loss; the shared loop does the rest). A method's
    ``config_class`` extends :class:`~prunekit.core.recovery.RecoveryConfig` with its own
    options; users set them with ``--recover-opt KEY=VALUE``.

    Example::

        from dataclasses import dataclass, field

        from prunekit import get_adapter, hookimpl
        from prunekit.core.recovery import RecoveryConfig, RecoveryMethod
        from prunekit.core.training import (
            TrainingSession,
            requires_grad_flags,
            set_requires_grad_flags,
        )


        @dataclass
        class LastLayersOptions(RecoveryConfig):
            n_layers: int = field(default=2, metadata={"help": "how many last layers train"})

            def __post_init__(self):
                super().__post_init__()
                if self.n_layers < 1:
                    raise ValueError(f"n_layers must be >= 1, got {self.n_layers!r}")


        # Fine-tune the last n_layers decoder layers only.
        class LastLayers(RecoveryMethod):
            name = "last_layers"
            config_class = LastLayersOptions

            def prepare(self, model, config):
                flags = requires_grad_flags(model)
                model.requires_grad_(False)
                last = get_adapter(model).layers(model)[-config.n_layers :]
                last.requires_grad_(True)
                params = dict(last.named_parameters())

                def finish():
                    set_requires_grad_flags(model, flags)
                    return model

                return TrainingSession(model=model, module=model, params=params, _finish=finish)


        @hookimpl
        def register_recoveries(register):
            register(LastLayers())
    """
