"""Fused MLP forward kernels for pruned intermediate sizes.

Two launches per MLP, one kernel (:func:`_mlp_kernel`):

1. up:   ``h = silu(x W_gate^T) * (x W_up^T)`` (gated, Llama/Mistral) or
         ``h = gelu(x W1^T + b1)`` (BERT, erf GELU) - both projections share the loads of
         ``x`` and the activation is applied to the fp32 accumulators before ``h`` is written;
2. down: ``y = h W_down^T (+ b2)``.

Fusing the down projection into the same launch would need either a reduction across
programs (atomics, non-deterministic) or recomputing ``h`` once per output tile, so ``h`` makes
one round trip through memory, as in Liger-Kernel's SwiGLU and in cuBLAS-based modules.

Any intermediate size works: tails of every dimension are masked, so 7706 neurons run as 7706,
not 7744. Weights are taken in ``nn.Linear`` layout (``[out_features, in_features]``) with
arbitrary strides, so ``module.weight`` is passed as is.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from prunekit.kernels.reference import gated_mlp_reference, gelu_mlp_reference, mlp_flops

__all__ = ["gated_mlp", "gated_mlp_reference", "gelu_mlp", "gelu_mlp_reference", "mlp_flops"]

# Values of the ACTIVATION meta-parameter.
_ACT_NONE = 0
_ACT_GELU = 1
_ACT_SILU_MUL = 2

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _mlp_kernel(
    # pointers
    x_ptr,
    w_ptr,
    u_ptr,
    b_ptr,
    out_ptr,
    # sizes: out[M, N] = act(x[M, K] @ w[N, K]^T + b[N]) (* x @ u[N, K]^T)
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_un,
    stride_uk,
    stride_om,
    stride_on,
    # meta-parameters
    ACTIVATION: tl.constexpr,  # 0 none, 1 erf GELU, 2 SiLU(x w^T) * (x u^T)
    HAS_BIAS: tl.constexpr,
    FP32_IEEE: tl.constexpr,  # fp32 inputs without TF32, as torch does by default
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering of the output tiles (Triton matmul tutorial): GROUP_M row-blocks are
    # swept together so the weight tiles they share stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # weight tiles are read transposed, [BLOCK_K, BLOCK_N], straight from nn.Linear layout
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = u_ptr + offs_n[None, :] * stride_un + offs_k[:, None] * stride_uk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # read only when ACTIVATION == 2
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if FP32_IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        if ACTIVATION == 2:
            u = tl.load(u_ptrs, mask=w_mask, other=0.0)
            if FP32_IEEE:
                acc_u = tl.dot(x, u, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(x, u, acc_u)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACTIVATION == 1:
        # exact GELU, as BERT's "gelu" (not the tanh approximation)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 2:
        acc = acc * tl.sigmoid(acc) * acc_u

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# autotuning
# --------------------------------------------------------------------------------------------
def _mlp_autotune_configs(interpret: bool) -> list[triton.Config]:
    """Candidate tilings. One config under the interpreter (it cannot time configs)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); the gated up-projection keeps two
    # accumulators, so the largest tiles of the matmul tutorial (128x256) are left out.
    tiles = [
        (128, 128, 64, 3, 8),
        (128, 128, 32, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 2),
        (32, 64, 64, 4, 4),
        (16, 64, 128, 4, 4),  # few tokens (decode-like batches)
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tiles
    ]


@functools.cache
def _tuned_mlp_kernel(interpret: bool):
    return triton.autotune(
        configs=_mlp_autotune_configs(interpret), key=["M", "N", "K", "ACTIVATION", "HAS_BIAS"]
    )(_mlp_kernel)


# --------------------------------------------------------------------------------------------
# launcher helpers (shared with attention.py)
# --------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    """Whether the kernels of this process were compiled for the Triton interpreter.

    Triton decides when a ``@triton.jit`` function is created, so this reflects
    ``TRITON_INTERPRET`` at the time this module was imported.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_mlp_kernel, InterpretedFunction)


def _check_interpreter_consistent(op: str) -> None:
    """Our kernels and ``triton.language``'s helpers must agree on interpreted or compiled.

    They disagree when ``TRITON_INTERPRET=1`` was set after Triton was imported (or unset in
    between); a launch would then fail deep inside Triton with "Cannot call @triton.jit'd
    outside of the scope of a kernel".
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.cdiv, InterpretedFunction) != _interpreting():
        raise RuntimeError(
            f"{op}: TRITON_INTERPRET changed after Triton was imported, so triton.language "
            "and prunekit.kernels were built for different modes; set TRITON_INTERPRET=1 "
            "before anything imports triton (or run the kernels in a fresh process)"
        )


def _check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """Same device, same supported dtype, and a device Triton can run on."""
    present = {name: t for name, t in tensors.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise ValueError(
                f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; "
                "cast all inputs to one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "move all inputs to one device"
            )
    if first.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: dtype {first.dtype} is not supported; use float32, float16 or bfloat16"
        )
    if first.dtype == torch.bfloat16 and _interpreting():
        raise ValueError(
            f"{op}: bfloat16 cannot run under TRITON_INTERPRET=1 (the interpreter stores bf16 "
            "as uint16 and its tl.dot multiplies the raw bits); use float16 or float32 there"
        )
    _check_interpreter_consistent(op)
    if first.device.type == "cpu" and not _interpreting():
        raise ValueError(
            f"{op}: inputs are on the CPU; Triton kernels need a GPU. To run them on the CPU "
            "(slowly, for testing), set TRITON_INTERPRET=1 before importing prunekit.kernels"
        )


def _on_device(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _fp32_ieee(dtype: torch.dtype) -> bool:
    # fp32 matmuls use TF32 tensor cores only when torch would too, so the kernel and the
    # cuBLAS reference do the same arithmetic.
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _linear(x2d, w, u, b, activation: int) -> torch.Tensor:
    """``act(x2d @ w.T + b) [* x2d @ u.T]`` via one launch of the tuned kernel."""
    M, K = x2d.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty sum (e.g. a fully pruned MLP): the pre-activation is the bias or 0
        pre = torch.zeros((M, N), device=x2d.device, dtype=torch.float32)
        if b is not None:
            pre += b.float()
        if activation == _ACT_GELU:
            pre = F.gelu(pre)
        elif activation == _ACT_SILU_MUL:
            pre = F.silu(pre) * 0.0  # the up projection is an empty sum too
        return out.copy_(pre)
    u = w if u is None else u  # placeholders for pointers the kernel does not read
    b_arg = w if b is None else b
    kernel = _tuned_mlp_kernel(_interpreting())

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with _on_device(x2d.device):
        kernel[grid](
            x2d,
            w,
            u,
            b_arg,
            out,
            M,
            N,
            K,
            x2d.stride(0),
            x2d.stride(1),
            w.stride(0),
            w.stride(1),
            u.stride(0),
            u.stride(1),
            out.stride(0),
            out.stride(1),
            ACTIVATION=activation,
            HAS_BIAS=b is not None,
            FP32_IEEE=_fp32_ieee(x2d.dtype),
        )
    return out


def _flatten_tokens(op: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(
            f"{op}: x must be [tokens, hidden] (or [..., hidden]), got shape {tuple(x.shape)}"
        )
    return x.reshape(-1, x.shape[-1])


def _check_mlp_weights(
    op: str, hidden: int, w_in: tuple[str, torch.Tensor], w_out: tuple[str, torch.Tensor]
) -> int:
    """Check the input and output projections (nn.Linear layout); return the MLP width."""
    for name, w in (w_in, w_out):
        if w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(w.shape)}")
    (in_name, w1), (out_name, w2) = w_in, w_out
    if w1.shape[1] != hidden:
        raise ValueError(
            f"{op}: {in_name} must be [intermediate, hidden={hidden}] (nn.Linear layout), "
            f"got {tuple(w1.shape)}"
        )
    intermediate = w1.shape[0]
    if tuple(w2.shape) != (hidden, intermediate):
        raise ValueError(
            f"{op}: {out_name} must be [hidden={hidden}, intermediate={intermediate}] "
            f"(nn.Linear layout), got {tuple(w2.shape)}"
        )
    return intermediate


# --------------------------------------------------------------------------------------------
# public launchers
# --------------------------------------------------------------------------------------------
def gated_mlp(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Llama/Mistral MLP forward: ``(silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T``.

    Args:
        x: ``[tokens, hidden]`` (leading batch dimensions are flattened and restored).
        w_gate, w_up: ``[intermediate, hidden]`` (``nn.Linear.weight`` layout).
        w_down: ``[hidden, intermediate]``.

    Returns a tensor shaped and typed like ``x``. Accumulates in fp32; the intermediate
    activation is stored in the input dtype. Any ``intermediate`` works.

    >>> y = gated_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    """
    op = "gated_mlp"
    _check_tensors(op, x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    x2d = _flatten_tokens(op, x)
    if w_up.shape != w_gate.shape:
        raise ValueError(
            f"{op}: w_up {tuple(w_up.shape)} must have the shape of w_gate {tuple(w_gate.shape)}"
        )
    _check_mlp_weights(op, x2d.shape[1], ("w_gate", w_gate), ("w_down", w_down))
    h = _linear(x2d, w_gate, w_up, None, _ACT_SILU_MUL)
    y = _linear(h, w_down, None, None, _ACT_NONE)
    return y.reshape(x.shape)


def gelu_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """BERT MLP forward: ``gelu(x @ w1.T + b1) @ w2.T + b2`` with the exact (erf) GELU.

    Args:
        x: ``[tokens, hidden]`` (leading batch dimensions are flattened and restored).
        w1: ``[intermediate, hidden]``, b1: ``[intermediate]`` or None
            (``BertIntermediate.dense``).
        w2: ``[hidden, intermediate]``, b2: ``[hidden]`` or None (``BertOutput.dense``;
            dropout, residual and LayerNorm stay outside).

    >>> y = gelu_mlp(x, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias)
    """
    op = "gelu_mlp"
    _check_tensors(op, x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    x2d = _flatten_tokens(op, x)
    hidden = x2d.shape[1]
    intermediate = _check_mlp_weights(op, hidden, ("w1", w1), ("w2", w2))
    if b1 is not None and tuple(b1.shape) != (intermediate,):
        raise ValueError(f"{op}: b1 must be [{intermediate}], got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (hidden,):
        raise ValueError(f"{op}: b2 must be [{hidden}], got {tuple(b2.shape)}")
    h = _linear(x2d, w1, None, b1, _ACT_GELU)
    y = _linear(h, w2, None, b2, _ACT_NONE)
    return y.reshape(x.shape)
