"""Triton kernels for the shapes that pruning produces.

Pruned layers end up with widths that are rarely multiples of a block size: 7706 MLP neurons,
24 query heads over 6 KV groups, 9 heads over 3 groups. The kernels here run those shapes as
they are (masked tails, GQA indexing), so a pruned checkpoint can be timed against the dense
one without padding it back:

- :func:`gated_mlp` - Llama/Mistral MLP, ``down(silu(gate(x)) * up(x))``.
- :func:`gelu_mlp` - BERT MLP, ``gelu(x W1^T + b1) W2^T + b2`` with the exact (erf) GELU.
- :func:`attention` - flash-attention forward, causal or not, any ``Hq`` that is a multiple
  of ``Hkv``.
- :mod:`prunekit.kernels.bench` - times dense and pruned layer shapes, Triton against torch
  (shapes and cases in :mod:`~prunekit.kernels.shapes`, timing in
  :mod:`~prunekit.kernels.timing`, table/CSV/PNG in :mod:`~prunekit.kernels.output`).

The kernels need Triton (``pip install 'prunekit[kernels]'``); ``import prunekit`` does not
import this package. Without Triton the torch references (:mod:`prunekit.kernels.reference`)
and the CPU benchmark still work.

Without a GPU the kernels still run, slowly, under ``TRITON_INTERPRET=1``. Set it before
Triton is first imported in the process, not just before this package: Triton decides when a
``@triton.jit`` function is defined, and ``triton.language``'s own helpers (``tl.cdiv``,
``tl.max``...) are defined when it is imported.
"""

from __future__ import annotations

import importlib

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    _TRITON_MISSING: ImportError | None = exc
else:
    _TRITON_MISSING = None

from prunekit.kernels.reference import (  # noqa: E402 - no Triton needed
    attention_flops,
    attention_reference,
    gated_mlp_reference,
    gelu_mlp_reference,
    mlp_flops,
)

_KERNEL_NAMES = ("attention", "gated_mlp", "gelu_mlp")

if _TRITON_MISSING is None:
    # The launcher `attention` shares its name with the submodule `prunekit.kernels.attention`.
    # Importing the submodule here, before binding the function, keeps
    # `prunekit.kernels.attention` the function: later `import prunekit.kernels.attention`
    # statements find the module in sys.modules and no longer overwrite the package attribute.
    from prunekit.kernels import attention as _attention_module
    from prunekit.kernels import mlp as _mlp_module

    attention = _attention_module.attention
    gated_mlp = _mlp_module.gated_mlp
    gelu_mlp = _mlp_module.gelu_mlp

#: The benchmark helpers, loaded on first use: name -> submodule.
_BENCH_NAMES = {
    "KernelShape": "shapes",
    "bench_layer_shapes": "bench",
    "format_table": "output",
    "main_bench": "bench",
    "plot": "output",
    "write_csv": "output",
}


def __getattr__(name: str):
    if name in _KERNEL_NAMES:  # only reached when Triton is missing
        raise ImportError(
            f"prunekit.kernels.{name} needs Triton, which is not installed: "
            "pip install 'prunekit[kernels]' (the torch references and the CPU benchmark "
            "work without it)"
        ) from _TRITON_MISSING
    if name in _BENCH_NAMES:
        module = importlib.import_module(f"{__name__}.{_BENCH_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention",
    "attention_flops",
    "attention_reference",
    "gated_mlp",
    "gated_mlp_reference",
    "gelu_mlp",
    "gelu_mlp_reference",
    "mlp_flops",
    *_BENCH_NAMES,
]
