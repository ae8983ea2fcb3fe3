"""The one keep-index helper that slices every projection (in the spirit of transformers'
old ``prune_linear_layer``).

:func:`slice_linear` handles the ``nn.Linear`` layout (weight ``[out, in]``); an adapter whose
projections store their weight differently (GPT-2's ``Conv1D`` is ``[in, out]``) overrides
:meth:`prunekit.adapters.base.Adapter.slice_projection` and calls :func:`slice_weight` with
its own axis, so no architecture is special-cased here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Dim = Literal["out", "in"]


def check_dim(dim: str) -> None:
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")


def slice_weight(
    module: nn.Module, keep: torch.Tensor | list[int], axis: int, *, slice_bias: bool
) -> int:
    """Keep only the ``keep`` indices along ``axis`` of ``module.weight``, in place (and of
    ``module.bias`` when ``slice_bias``); return the new size of that axis. ``keep`` must be
    sorted, unique and in range; works on meta tensors too (used by the per-layer loader)."""
    weight = module.weight
    keep = torch.as_tensor(keep, dtype=torch.long, device="cpu")
    size = weight.shape[axis]
    if keep.numel() == 0:
        raise ValueError("slice_linear: keep is empty; at least one feature must stay")
    if keep.min() < 0 or keep.max() >= size:
        raise IndexError(f"slice_linear: keep indices out of range [0, {size})")
    idx = keep.to(weight.device)
    new_weight = weight.detach().index_select(axis, idx)  # a new tensor: no clone needed
    module.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    bias = getattr(module, "bias", None)
    if slice_bias and bias is not None:
        module.bias = nn.Parameter(bias.detach().index_select(0, idx), bias.requires_grad)
    return int(keep.numel())


def slice_linear(module: nn.Module, keep: torch.Tensor | list[int], dim: Dim) -> nn.Module:
    """Keep only ``keep`` features of an ``nn.Linear``-layout ``module`` along its output
    (``"out"``) or input (``"in"``) side, in place, and return it. The bias is sliced with the
    output side; ``out_features`` / ``in_features`` are updated."""
    check_dim(dim)
    n = slice_weight(module, keep, 0 if dim == "out" else 1, slice_bias=dim == "out")
    setattr(module, "out_features" if dim == "out" else "in_features", n)
    return module


def head_rows(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """Feature indices covered by ``heads`` in a head-major projection of ``head_dim`` each."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


__all__ = ["Dim", "check_dim", "head_rows", "slice_linear", "slice_weight"]
