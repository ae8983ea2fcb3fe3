"""Sub-block scorers: Block Influence of each layer's attention and MLP sub-block.

A pre-norm layer computes ``h = x + attn(norm1(x))`` and ``y = h + mlp(norm2(h))``. The
attention sub-block's influence compares x with h, the MLP's compares h with y (ShortGPT's
block influence, Men et al. 2024, applied per sub-block as in He et al. 2024, "What Matters in
Transformers? Not All Attention Is Needed", arXiv 2406.15786):

    BI_attn,i = 1 − E_t cos(x_i,t, h_i,t),    BI_mlp,i = 1 − E_t cos(h_i,t, y_i,t).

Both come from the same capture pass: the attention output is the output projection applied
to the head outputs (the ``head_inputs`` tap), h = x + that, and the layer's input and output
come from the ``layer_io`` tap. Streaming: one running sum of cosines per layer; only the
current layer's attention output is held. A layer whose sub-block is already gone scores NaN
(the selection never picks it).
"""

from __future__ import annotations

from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers.base import Scorer


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


class _SubblockAccumulator(Accumulator):
    """Running 1 − cos sums for one sub-block kind (``"attention"`` or ``"mlp"``)."""

    taps = frozenset({"layer_io", "head_inputs"})
    which = "attention"

    def __init__(self, ctx: Context, config: Any = None):
        self.adapter = ctx.adapter
        self.present = [
            s.has_attention if self.which == "attention" else s.has_mlp for s in ctx.shapes
        ]
        self.sums = torch.zeros(ctx.n_layers, dtype=torch.float64)
        self.counts = torch.zeros(ctx.n_layers, dtype=torch.float64)
        self.attn_out: dict[int, torch.Tensor] = {}

    def on_head_inputs(self, i, z, layer):
        # the output projection by hand: calling the module would re-enter this hook
        proj = self.adapter.head_output_projection(layer)
        weight = self.adapter.linear_weight(proj)
        with torch.no_grad():
            self.attn_out[i] = torch.nn.functional.linear(z, weight, getattr(proj, "bias", None))

    def on_layer_io(self, i, x_in, x_out, rows):
        attn = self.attn_out.pop(i, None)
        h = x_in if attn is None else x_in + attn.to(x_in.dtype)
        c = _cos(x_in, h) if self.which == "attention" else _cos(h, x_out)
        self.sums[i] += c.sum().double().cpu()
        self.counts[i] += c.numel()

    def result(self):
        out = (1.0 - self.sums / self.counts.clamp(min=1)).float()
        gone = torch.tensor([not p for p in self.present], dtype=torch.bool)
        return out.masked_fill(gone, float("nan"))


class _MLPAccumulator(_SubblockAccumulator):
    which = "mlp"


class AttentionInfluence(Scorer):
    """Block Influence of each layer's attention sub-block, BI = 1 − E cos(x, x + attn(x))
    (input vs output of the sub-block on the residual stream). Shape ``[n_layers]``, higher =
    keep; removes attention with ``PrunePlan(attention=...)`` / ``--attention N``."""

    name = "attention_influence"
    unit = "attention"
    accumulator_class = _SubblockAccumulator


class MLPInfluence(Scorer):
    """Block Influence of each layer's MLP sub-block, BI = 1 − E cos(h, h + mlp(h)) with h the
    residual stream after attention. Shape ``[n_layers]``, higher = keep; removes MLPs with
    ``PrunePlan(mlp=...)`` / ``--mlps N``."""

    name = "mlp_influence"
    unit = "mlps"
    accumulator_class = _MLPAccumulator


SCORERS = (AttentionInfluence(), MLPInfluence())
