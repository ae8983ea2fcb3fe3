"""Attention-head scorers: magnitude, output norm, Taylor. One score per *query* head
(``[L, n_heads]``); :meth:`prunekit.core.scores.Scores.head_groups` sums them per KV group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers.base import Scorer, stack_or_list


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight in ``nn.Linear`` layout ``[out, in]`` (GPT-2's Conv1D is
    ``[in, out]``)."""
    w = module.weight
    return w.t() if hasattr(module, "nf") else w


def head_units(adapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head h: the rows of W_q belonging to h (``[n_heads, d, hidden]``) and the
    columns of W_o reading h's output (``[n_heads, d, hidden]``)."""
    s = adapter.layer_shape(layer)
    q, _, _ = adapter.qkv_projections(layer)
    wq = linear_weight(q).reshape(s.n_heads, s.head_dim, -1)
    wo = linear_weight(adapter.head_output_projection(layer))
    wo = wo.reshape(wo.shape[0], s.n_heads, s.head_dim).permute(1, 2, 0)
    return wq, wo


# ---- magnitude -------------------------------------------------------------------------------
class _HeadMagnitude(Accumulator):
    taps = frozenset({"weights"})

    def __init__(self, ctx: Context):
        self.adapter = ctx.adapter
        self.rows: list[torch.Tensor | None] = [None] * ctx.n_layers

    def on_weights(self, i, layer):
        wq, wo = head_units(self.adapter, layer)
        sq = wq.float().pow(2).sum((1, 2)) + wo.float().pow(2).sum((1, 2))
        self.rows[i] = sq.sqrt().cpu()

    def result(self):
        return stack_or_list(self.rows)


class HeadMagnitude(Scorer):
    """Weight magnitude of a head: the L2 norm of every weight that belongs to query head h
    only -- its rows of W_q and its columns of W_o:
    s_h = sqrt(‖W_q[h·d:(h+1)·d, :]‖²_F + ‖W_o[:, h·d:(h+1)·d]‖²_F).
    (Torch-Pruning's group MagnitudeImportance with p = 2.) Needs no data."""

    name = "magnitude"
    unit = "heads"

    def accumulator(self, ctx, config):
        return _HeadMagnitude(ctx)


# ---- output norm -----------------------------------------------------------------------------
class _HeadOutputNorm(Accumulator):
    taps = frozenset({"weights", "head_inputs"})

    def __init__(self, ctx: Context):
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

    def accumulator(self, ctx, config):
        return _HeadOutputNorm(ctx)


# ---- Taylor ----------------------------------------------------------------------------------
@dataclass
class TaylorConfig:
    granularity: str = field(
        default="element",
        metadata={
            "help": "'element': Σ_w |g·w| (LLM-Pruner element-wise); "
            "'vector': |Σ_w g·w| (first-order loss change of removing the unit)"
        },
    )

    def __post_init__(self) -> None:
        if self.granularity not in ("element", "vector"):
            raise ValueError(f"granularity must be 'element' or 'vector', got {self.granularity!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity}


def taylor_reduce(prod: torch.Tensor, dims: tuple[int, ...], granularity: str) -> torch.Tensor:
    if granularity == "element":
        return prod.abs().sum(dims)
    return prod.sum(dims).abs()


class _HeadTaylor(Accumulator):
    taps = frozenset({"gradients"})

    def __init__(self, ctx: Context, config: TaylorConfig):
        self.adapter = ctx.adapter
        self.granularity = config.granularity
        self.sums: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.batches = [0] * ctx.n_layers

    def on_gradients(self, i, layer):
        s = self.adapter.layer_shape(layer)
        q, _, _ = self.adapter.qkv_projections(layer)
        o = self.adapter.head_output_projection(layer)
        wq, wo = head_units(self.adapter, layer)
        gq = linear_weight_grad(q).reshape(s.n_heads, s.head_dim, -1)
        go = linear_weight_grad(o)
        go = go.reshape(go.shape[0], s.n_heads, s.head_dim).permute(1, 2, 0)
        with torch.no_grad():
            pq, po = (wq * gq).float(), (wo * go).float()
            if self.granularity == "element":
                v = pq.abs().sum((1, 2)) + po.abs().sum((1, 2))
            else:
                v = (pq.sum((1, 2)) + po.sum((1, 2))).abs()
            v = v.double().cpu()
        self.sums[i] = v if self.sums[i] is None else self.sums[i] + v
        self.batches[i] += 1

    def result(self):
        pairs = zip(self.sums, self.batches, strict=True)
        return stack_or_list([(s / b).float() for s, b in pairs])


def linear_weight_grad(module: torch.nn.Module) -> torch.Tensor:
    g = module.weight.grad
    if g is None:
        raise RuntimeError(f"{type(module).__name__} has no gradient; was backward() run?")
    return g.t() if hasattr(module, "nf") else g


class HeadTaylor(Scorer):
    """First-order Taylor importance of a head (Molchanov et al. 2019; LLM-Pruner, Ma et al.
    2023): with W_h the weights of query head h (its W_q rows and W_o columns) and g = ∂L/∂W
    the gradient of the calibration loss, ``element``: s_h = Σ_{w∈W_h} |g_w · w| (default),
    ``vector``: s_h = |Σ_{w∈W_h} g_w · w| ≈ |L(W_h = 0) − L|. Averaged over calibration
    batches; one forward + backward pass per batch, shared with other gradient scorers."""

    name = "taylor"
    unit = "heads"
    kind = "gradient"
    config_class = TaylorConfig
    sequential_ok = False

    def accumulator(self, ctx, config):
        return _HeadTaylor(ctx, config)

    def params(self, model, adapter):
        out = []
        for layer in adapter.layers(model):
            out.append(adapter.qkv_projections(layer)[0].weight)
            out.append(adapter.head_output_projection(layer).weight)
        return out


SCORERS = (HeadMagnitude(), HeadOutputNorm(), HeadTaylor())
