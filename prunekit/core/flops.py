"""How much a model computes: parameter count and analytic FLOPs per token from the
per-layer shapes. Both work on quantized models too: shapes and parameter counts of packed
linears come from ``in_features``/``out_features``, never from a ``.weight`` they lack."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["flops_breakdown", "flops_per_token", "packed_linear_params", "param_count"]


# ---- size ---------------------------------------------------------------------------------
def param_count(model: nn.Module, *, embeddings: bool = True) -> int:
    """Number of parameters (tied tensors counted once). ``embeddings=False`` leaves out the
    input embedding and a separate (untied) output embedding.

    A quantized linear that keeps its weights packed in buffers (GPTQ/AWQ ``qweight``, no
    ``weight``) counts ``in_features x out_features`` (+ its bias), the parameters it stands
    for, so a quantized model has the parameter count of the model it was quantized from
    (its size shows on disk and in memory, not here)."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(packed_linear_params(m) for m in model.modules())
    if not embeddings:
        seen: set[int] = set()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and id(module.weight) not in seen:
                seen.add(id(module.weight))
                total -= module.weight.numel()
    return total


def packed_linear_params(module: nn.Module) -> int:
    """The parameters a quantized linear holds packed in buffers (0 for any other module):
    it has integer ``in_features``/``out_features``, no ``weight`` tensor and buffers of its
    own (``qweight``, ``scales``...). Read from the features, never from ``.weight``."""
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        return 0
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not (isinstance(n_in, int) and isinstance(n_out, int)) or not module._buffers:
        return 0
    bias = module._buffers.get("bias")
    return n_in * n_out + (bias.numel() if isinstance(bias, torch.Tensor) else 0)


def flops_breakdown(model: nn.Module, seq_len: int = 2048) -> dict[str, float]:
    """Analytic forward FLOPs per token, by part, from the per-layer shapes.

    A matrix product ``[1, a] @ [a, b]`` costs ``2ab`` FLOPs (one multiply and one add per
    weight). With hidden size ``D`` and, per layer ``l``, ``H_l`` query heads, ``K_l`` KV
    heads, head size ``d`` and MLP width ``I_l``::

        attention_proj  = sum_l 2 D d (2 H_l + 2 K_l)        # q, o  and  k, v projections
        attention_score = sum_l 4 H_l d c                    # Q K^T and A V over c keys
        mlp             = sum_l 2 m D I_l                    # m = 3 (gate, up, down) or 2
        lm_head         = 2 D V                              # when the model has an LM head

    ``c`` is the mean number of keys a token attends to in a forward pass over ``seq_len``
    tokens: ``(seq_len + 1) / 2`` for causal models, ``seq_len`` for bidirectional encoders
    (sliding windows are ignored). Embedding look-ups, norms, biases, activations, softmax
    and rotary embeddings are lower-order and left out. Kaplan et al. 2020 ("Scaling Laws for
    Neural Language Models", Table 1) count the same terms.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    from prunekit.core.shapes import config_global
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    hidden = int(config_global(model.config.get_text_config(), "hidden_size"))
    m = 3 if adapter.gated else 2
    c = (seq_len + 1) / 2 if adapter.causal else float(seq_len)
    proj = score = mlp = 0.0
    for s in adapter.shapes(model):
        proj += 2 * hidden * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
        score += 4 * s.n_heads * s.head_dim * c
        mlp += 2 * m * hidden * s.intermediate
    head = model.get_output_embeddings() if adapter.causal else None
    lm_head = 0.0 if head is None else 2.0 * adapter.out_features(head) * adapter.in_features(head)
    return {
        "attention_proj": proj,
        "attention_score": score,
        "mlp": mlp,
        "lm_head": lm_head,
        "total": proj + score + mlp + lm_head,
    }


def flops_per_token(model: nn.Module, seq_len: int = 2048, *, lm_head: bool = True) -> float:
    """Analytic forward FLOPs per token at sequence length ``seq_len`` (formula in
    :func:`flops_breakdown`); ``lm_head=False`` leaves out the output projection."""
    parts = flops_breakdown(model, seq_len)
    return parts["total"] - (0.0 if lm_head else parts["lm_head"])
