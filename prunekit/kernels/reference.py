"""Plain-torch references of the kernels, and their FLOP counts.

These are what the Triton kernels are tested against and what ``bench-kernels`` times as the
``torch`` provider (cuBLAS and SDPA on a GPU, torch's own kernels on a CPU). This module does
not import Triton, so the torch path of the benchmark runs where Triton is not installed.
:mod:`prunekit.kernels.mlp` and :mod:`prunekit.kernels.attention` re-export them next to
their kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "attention_flops",
    "attention_reference",
    "gated_mlp_reference",
    "gelu_mlp_reference",
    "mlp_flops",
]


def gated_mlp_reference(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """What ``LlamaMLP.forward`` computes: ``(silu(x W_g^T) * (x W_u^T)) W_d^T`` (SwiGLU,
    Shazeer 2020, "GLU Variants Improve Transformer")."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def gelu_mlp_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """What ``BertIntermediate`` + ``BertOutput.dense`` compute (no dropout/residual/norm):
    ``gelu(x W1^T + b1) W2^T + b2`` with the exact GELU ``x * Phi(x)``."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="none"), w2, b2)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale [+ causal mask]) v`` with K/V repeated to the query heads the
    way transformers' ``repeat_kv`` does (query head ``h`` reads KV head ``h // group``).

    The causal mask is aligned at the top left (query ``i`` sees keys ``0..i``), as in SDPA's
    ``is_causal``.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def mlp_flops(tokens: int, hidden: int, intermediate: int, gated: bool) -> int:
    """Matmul FLOPs of one MLP forward: ``2 * tokens * hidden * intermediate`` per projection
    (3 projections gated, 2 for BERT); the activation is negligible."""
    return 2 * tokens * hidden * intermediate * (3 if gated else 2)


def attention_flops(batch: int, n_heads: int, seq_len: int, head_dim: int, causal: bool) -> int:
    """Matmul FLOPs of the attention core (``q k^T`` and ``p v``; projections excluded):
    ``4 * batch * n_heads * pairs * head_dim``, where ``pairs`` is ``T^2``, or
    ``T (T + 1) / 2`` query-key pairs on or below the diagonal when causal."""
    pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    return 4 * batch * n_heads * pairs * head_dim
