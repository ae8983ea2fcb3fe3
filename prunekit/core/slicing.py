"""The one keep-index helper that slices every projection (in the spirit of transformers'
old ``prune_linear_layer``): ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 layout)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Dim = Literal["out", "in"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D stores weight as [in, out] and has `nf` (= out).
    return hasattr(module, "nf") and module.weight.dim() == 2


def slice_linear(module: nn.Module, keep: torch.Tensor | list[int], dim: Dim) -> nn.Module:
    """Keep only ``keep`` features of ``module`` along its output (``"out"``) or input (``"in"``)
    side, in place, and return it. The bias is sliced with the output side. ``keep`` must be
    sorted, unique and in range; works on meta tensors too (used by the per-layer loader)."""
    if dim not in ("out", "in"):
        raise ValueError(f"dim must be 'out' or 'in', got {dim!r}")
    weight = module.weight
    keep = torch.as_tensor(keep, dtype=torch.long, device="cpu")
    conv = _is_conv1d(module)
    # Axis of `weight` that holds the requested side.
    axis = {("out", False): 0, ("in", False): 1, ("out", True): 1, ("in", True): 0}[(dim, conv)]
    size = weight.shape[axis]
    if keep.numel() == 0:
        raise ValueError("slice_linear: keep is empty; at least one feature must stay")
    if keep.min() < 0 or keep.max() >= size:
        raise IndexError(f"slice_linear: keep indices out of range [0, {size})")
    idx = keep.to(weight.device)
    new_weight = weight.detach().index_select(axis, idx).clone()
    module.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    bias = getattr(module, "bias", None)
    if dim == "out" and bias is not None:
        module.bias = nn.Parameter(bias.detach().index_select(0, idx).clone(), bias.requires_grad)
    n = int(keep.numel())
    if conv:
        if dim == "out":
            module.nf = n
    elif dim == "out":
        module.out_features = n
    else:
        module.in_features = n
    return module


def head_rows(heads: torch.Tensor | list[int], head_dim: int) -> torch.Tensor:
    """Feature indices covered by ``heads`` in a head-major projection of ``head_dim`` each."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
