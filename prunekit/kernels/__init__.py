"""Triton kernels for the shapes that pruning produces.

Pruned layers end up with widths that are rarely multiples of a block size: 7706 MLP neurons,
24 query heads over 6 KV groups, 9 heads over 3 groups. The kernels here run those shapes as
they are (masked tails, GQA indexing), so a pruned checkpoint can be timed against the dense
one without padding it back:

- :func:`gated_mlp` - Llama/Mistral MLP, ``down(silu(gate(x)) * up(x))``.
- :func:`gelu_mlp` - BERT MLP, ``gelu(x W1^T + b1) W2^T + b2`` with the exact (erf) GELU.
- :func:`attention` - flash-attention forward, causal or not, any ``Hq`` that is a multiple
  of ``Hkv``.
- :mod:`prunekit.kernels.bench` - times dense and pruned layer shapes, Triton against torch.

This package needs Triton (``pip install 'prunekit[kernels]'``); ``import prunekit`` does not
import it. Without a GPU the kernels still run, slowly, under ``TRITON_INTERPRET=1`` (set it
before this package is imported).
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "prunekit.kernels needs Triton, which is not installed: pip install 'prunekit[kernels]'"
    ) from exc

# The launcher `attention` shares its name with the submodule `prunekit.kernels.attention`.
# Importing the submodule here, before binding the function, keeps `prunekit.kernels.attention`
# the function: later `import prunekit.kernels.attention` statements find the module in
# sys.modules and no longer overwrite the package attribute.
from prunekit.kernels import attention as _attention_module  # noqa: E402
from prunekit.kernels import mlp as _mlp_module  # noqa: E402

attention = _attention_module.attention
attention_reference = _attention_module.attention_reference
gated_mlp = _mlp_module.gated_mlp
gated_mlp_reference = _mlp_module.gated_mlp_reference
gelu_mlp = _mlp_module.gelu_mlp
gelu_mlp_reference = _mlp_module.gelu_mlp_reference

_BENCH_NAMES = (
    "LayerShape",
    "bench_layer_shapes",
    "format_table",
    "main_bench",
    "plot",
    "write_csv",
)


def __getattr__(name: str):
    # The benchmark helpers are loaded on first use.
    if name in _BENCH_NAMES:
        from prunekit.kernels import bench

        return getattr(bench, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention",
    "attention_reference",
    "gated_mlp",
    "gated_mlp_reference",
    "gelu_mlp",
    "gelu_mlp_reference",
    *_BENCH_NAMES,
]
