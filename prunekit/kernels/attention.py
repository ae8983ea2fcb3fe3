"""Flash-attention forward for pruned (GQA) head counts.

One program computes one block of ``BLOCK_M`` queries of one query head against all keys of
the KV head its group reads, with the online softmax of FlashAttention (Dao et al. 2022; the
Triton fused-attention tutorial): the ``T x T`` score matrix is never materialised and
statistics are kept in fp32.

Head counts are free: query head ``h`` reads KV head ``h // (Hq // Hkv)``, the grouping of
``repeat_interleave`` in transformers' ``repeat_kv``, so 24 heads over 6 KV groups or 9 over 3
run without padding heads back. Sequence lengths need not be multiples of the block sizes
(tails are masked). ``head_dim`` must be a power of two from 16 to 256 (64 and 128 in real
models); a pruned model keeps its head_dim, only the number of heads changes.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from prunekit.kernels.mlp import _check_tensors, _fp32_ieee, _interpreting, _on_device
from prunekit.kernels.reference import attention_flops, attention_reference

__all__ = ["attention", "attention_flops", "attention_reference"]


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    # sizes
    n_q_heads,
    group_size,
    seq_q,
    seq_k,
    qk_scale,  # qk_scale = softmax scale * log2(e)
    # strides ([batch, head, token, dim] for each tensor)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_q_heads
    head = pid_bh % n_q_heads
    kv_head = head // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seq_q

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh

    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None],
        other=0.0,
    )

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    # Causal: keys after the last query of this block are never read. Key 0 is always in
    # range, so every row sees at least one finite score and m_i never stays -inf.
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < seq_k
        k = tl.load(
            k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :],
            other=0.0,
        )  # [HEAD_DIM, BLOCK_N]
        if FP32_IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = qk * qk_scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        qk = tl.where(valid, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        if FP32_IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        acc.to(o_ptr.dtype.element_ty),
        mask=mask_m[:, None],
    )


# --------------------------------------------------------------------------------------------
# autotuning
# --------------------------------------------------------------------------------------------
def _attention_autotune_configs(interpret: bool) -> list[triton.Config]:
    """Candidate tilings. One config under the interpreter (it cannot time configs).

    BLOCK_M and BLOCK_N differ there on purpose, so the tests cover unequal blocks.
    """
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})]
    # (BLOCK_M, BLOCK_N, num_stages, num_warps), after the fused-attention tutorial; configs
    # that do not fit in shared memory for a head_dim/dtype are skipped by the autotuner.
    tiles = [
        (128, 64, 3, 8),
        (128, 64, 4, 8),
        (128, 32, 3, 4),
        (64, 64, 3, 4),
        (64, 64, 4, 4),
        (64, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
        for bm, bn, stages, warps in tiles
    ]


@functools.cache
def _tuned_attention_kernel(interpret: bool):
    return triton.autotune(
        configs=_attention_autotune_configs(interpret),
        key=["seq_q", "seq_k", "HEAD_DIM", "CAUSAL"],
    )(_attention_kernel)


def _check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[int, int]:
    """Check shapes, dtypes and devices before anything is launched; return (Hkv, Tk)."""
    op = "attention"
    _check_tensors(op, q=q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
            )
    batch, n_q_heads, seq_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    kb, n_kv_heads, seq_k, kd = k.shape
    if kb != batch:
        raise ValueError(f"{op}: q has batch {batch} but k/v have batch {kb}")
    if kd != head_dim:
        raise ValueError(f"{op}: q has head_dim {head_dim} but k/v have head_dim {kd}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"{op}: head_dim must be a power of two from 16 to 256, got {head_dim}")
    if n_kv_heads == 0 or n_q_heads % n_kv_heads:
        raise ValueError(
            f"{op}: the number of query heads ({n_q_heads}) must be a multiple of the number "
            f"of KV heads ({n_kv_heads}); GQA pruning removes whole groups or the same number "
            "of query heads from every group"
        )
    if causal and seq_q != seq_k:
        raise ValueError(
            f"{op}: causal attention needs as many queries as keys, got {seq_q} and {seq_k}"
        )
    return n_kv_heads, seq_k


# --------------------------------------------------------------------------------------------
# public launcher
# --------------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention forward, ``softmax(q k^T * scale [+ causal mask]) v``.

    Args:
        q: ``[batch, Hq, T, head_dim]``.
        k, v: ``[batch, Hkv, Tk, head_dim]`` with ``Hq`` a multiple of ``Hkv`` (GQA; query
            head ``h`` uses KV head ``h // (Hq // Hkv)``). ``Tk == T`` when ``causal``.
        causal: mask key ``j > i`` for query ``i`` (decoders); False for encoders (BERT).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Any strides are accepted, so ``x.view(B, T, H, D).transpose(1, 2)`` needs no copy.
    Returns ``[batch, Hq, T, head_dim]`` in the dtype of ``q``, contiguous.

    >>> out = attention(q, k, v, causal=True)  # q [1, 24, 2048, 128], k/v [1, 6, 2048, 128]
    """
    n_kv_heads, seq_k = _check_attention_inputs(q, k, v, causal)
    batch, n_q_heads, seq_q, head_dim = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    out = torch.empty((batch, n_q_heads, seq_q, head_dim), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if seq_k == 0:
        raise ValueError("attention: k/v have no tokens; softmax over zero keys is undefined")

    kernel = _tuned_attention_kernel(_interpreting())

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * n_q_heads)

    with _on_device(q.device):
        kernel[grid](
            q,
            k,
            v,
            out,
            n_q_heads,
            n_q_heads // n_kv_heads,
            seq_q,
            seq_k,
            scale * 1.4426950408889634,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            HEAD_DIM=head_dim,
            CAUSAL=bool(causal),
            FP32_IEEE=_fp32_ieee(q.dtype),
        )
    return out
