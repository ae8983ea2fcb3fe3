"""Attention-head scorers: magnitude, output norm, Taylor. One score per *query* head
(``[L, n_heads]``); :meth:`prunekit.core.scores.Scores.head_groups` sums them per KV group."""

from __future__ import annotations

from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers.base import (
    MagnitudeAccumulator,
    Scorer,
    TaylorAccumulator,
    TaylorConfig,
    stack_or_list,
    weight_grad,
)


def head_units(adapter, layer, *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head h: the rows of W_q belonging to h (``[n_heads, d, hidden]``) and the
    columns of W_o reading h's output (``[n_heads, d, hidden]``); with ``grad`` the same
    views of their gradients."""
    s = adapter.layer_shape(layer)
    q, _, _ = adapter.qkv_projections(layer)
    o = adapter.head_output_projection(layer)
    get = (lambda p: weight_grad(adapter, p)) if grad else adapter.linear_weight
    wq, wo = get(q), get(o)
    wq = wq.reshape(s.n_heads, s.head_dim, -1)
    wo = wo.reshape(wo.shape[0], s.n_heads, s.head_dim).permute(1, 2, 0)
    return wq, wo


# ---- magnitude -------------------------------------------------------------------------------
class _HeadMagnitude(MagnitudeAccumulator):
    def parts(self, layer):
        wq, wo = head_units(self.adapter, layer)
        return [(wq, (1, 2)), (wo, (1, 2))]


class HeadMagnitude(Scorer):
    """Weight magnitude of a head: the L2 norm of every weight that belongs to query head h
    only -- its rows of W_q and its columns of W_o:
    s_h = sqrt(‖W_q[h·d:(h+1)·d, :]‖²_F + ‖W_o[:, h·d:(h+1)·d]‖²_F).
    (Torch-Pruning's group MagnitudeImportance with p = 2.) Needs no data.

    As a neuron scorer, ``magnitude`` means
    :class:`~prunekit.scorers.neurons.NeuronMagnitude` (``counterparts``)."""

    name = "magnitude"
    unit = "heads"
    counterparts = {"neurons": "neuron_magnitude"}

    accumulator_class = _HeadMagnitude


# ---- output norm -----------------------------------------------------------------------------
class _HeadOutputNorm(Accumulator):
    taps = frozenset({"weights", "head_inputs"})

    def __init__(self, ctx: Context, config: Any = None):
        self.adapter = ctx.adapter
        L = ctx.n_layers
        self.gram: list[torch.Tensor | None] = [None] * L
        self.sums: list[torch.Tensor | None] = [None] * L
        self.counts = [0] * L

    def on_weights(self, i, layer):
        _, wo = head_units(self.adapter, layer)  # [h, d, hidden]
        wo = wo.float()
        self.gram[i] = wo @ wo.transpose(1, 2)  # [h, d, d] = W_hᵀ W_h per head

    def on_head_inputs(self, i, z, layer):
        g = self.gram[i].to(z.device)
        n_h, d = g.shape[0], g.shape[1]
        z = z.float().reshape(-1, n_h, d)  # [T, h, d]
        sq = torch.einsum("thd,hde,the->th", z, g, z).clamp(min=0)
        s = sq.sqrt().sum(0).double().cpu()
        self.sums[i] = s if self.sums[i] is None else self.sums[i] + s
        self.counts[i] += z.shape[0]

    def result(self):
        return stack_or_list([(s / c).float() for s, c in zip(self.sums, self.counts, strict=True)])


class HeadOutputNorm(Scorer):
    """Output norm of a head: the mean over calibration tokens t of the L2 norm of the head's
    contribution to the residual stream, s_h = E_t ‖W_o[:, h] z_{h,t}‖₂, where z_{h,t} is the
    head's attention output (input of the output projection). Computed through the per-head Gram
    matrix G_h = W_o[:, h]ᵀ W_o[:, h] (d × d), so no per-head output is materialised:
    ‖W_o[:, h] z‖² = zᵀ G_h z. (Activation-norm head importance, as in the pruning lesson.)"""

    name = "output_norm"
    unit = "heads"

    accumulator_class = _HeadOutputNorm


# ---- Taylor ----------------------------------------------------------------------------------
class _HeadTaylor(TaylorAccumulator):
    def products(self, layer):
        wq, wo = head_units(self.adapter, layer)
        gq, go = head_units(self.adapter, layer, grad=True)
        return [(wq * gq, (1, 2)), (wo * go, (1, 2))]


class HeadTaylor(Scorer):
    """First-order Taylor importance of a head (Molchanov et al. 2019; LLM-Pruner, Ma et al.
    2023): with W_h the weights of query head h (its W_q rows and W_o columns) and g = ∂L/∂W
    the gradient of the calibration loss, ``element``: s_h = Σ_{w∈W_h} |g_w · w| (default),
    ``vector``: s_h = |Σ_{w∈W_h} g_w · w| ≈ |L(W_h = 0) − L|. Averaged over calibration
    batches; one forward + backward pass per batch, shared with other gradient scorers.

    As a neuron scorer, ``taylor`` means :class:`~prunekit.scorers.neurons.NeuronTaylor`
    (``counterparts``), the same criterion over a neuron's weights."""

    name = "taylor"
    unit = "heads"
    kind = "gradient"
    config_class = TaylorConfig
    sequential_ok = False
    counterparts = {"neurons": "neuron_taylor"}

    accumulator_class = _HeadTaylor

    def params(self, model, adapter):
        out = []
        for layer in adapter.layers(model):
            out.append(adapter.qkv_projections(layer)[0].weight)
            out.append(adapter.head_output_projection(layer).weight)
        return out


SCORERS = (HeadMagnitude(), HeadOutputNorm(), HeadTaylor())
