"""Hook specifications: how adapters, scorers, quantizers and recovery methods plug into
prunekit.

Built-in plugins use exactly these hooks; third-party packages declare a module under the
``prunekit`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.prunekit]
    my_plugin = "my_package.prunekit_hooks"

Each hook receives a ``register`` callback (as in simonw/llm) instead of returning values.
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

    An adapter is looked up by each ``model_type`` it declares.

    Example::

        from prunekit import hookimpl
        from prunekit.adapters import DecoderAdapter

        class MyAdapter(DecoderAdapter):
            name = "mymodel"
            model_types = ("mymodel",)

        @hookimpl
        def register_adapters(register):
            register(MyAdapter())
    """


@hookspec
def register_scorers(register: Callable[[Any], None]) -> None:
    """Register importance scorers (objects with a ``name`` and a ``unit`` attribute).

    Example::

        @hookimpl
        def register_scorers(register):
            register(MyScorer())
    """


@hookspec
def register_quantizers(register: Callable[[Any], None]) -> None:
    """Register quantizers (objects with a ``name`` attribute), applied after pruning.

    Example::

        @hookimpl
        def register_quantizers(register):
            register(MyQuantizer())
    """


@hookspec
def register_recoveries(register: Callable[[Any], None]) -> None:
    """Register recovery methods (objects with a ``name`` attribute), run after pruning and
    before quantization.

    Example::

        @hookimpl
        def register_recoveries(register):
            register(MyRecovery())
    """
