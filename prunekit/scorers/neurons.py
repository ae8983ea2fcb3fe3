"""MLP-neuron scorers: activation frequency, magnitude, Taylor, Wanda. One score per neuron
(``[L, intermediate]``). The neuron activation is the input of the down projection
(``act(gate(x)) * up(x)`` for gated MLPs, ``act(W_in x)`` otherwise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers.base import Scorer, stack_or_list
from prunekit.scorers.heads import TaylorConfig, linear_weight, linear_weight_grad


def neuron_weights(adapter, layer) -> list[tuple[torch.Tensor, int]]:
    """(weight in Linear layout, neuron dimension) for every projection a neuron owns."""
    out = [(linear_weight(p), 0) for p in adapter.mlp_input_projections(layer)]
    out.append((linear_weight(adapter.neuron_output_projection(layer)), 1))
    return out


# ---- activation frequency --------------------------------------------------------------------
@dataclass
class ActivationFrequencyConfig:
    threshold: float = field(
        default=0.1,
        metadata={"help": "a neuron fires at a token when |a| > threshold (× the RMS if relative)"},
    )
    relative: bool = field(
        default=True,
        metadata={
            "help": "compare |a_j| with threshold × RMS of the layer's activation vector at the "
            "same token (scale-free; SwiGLU activations are rarely exactly 0)"
        },
    )

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "relative": self.relative}


class _Frequency(Accumulator):
    taps = frozenset({"neuron_inputs"})

    def __init__(self, ctx: Context, config: ActivationFrequencyConfig):
        self.config = config
        self.sums: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.counts = [0] * ctx.n_layers

    def on_neuron_inputs(self, i, a, layer):
        a = a.float().reshape(-1, a.shape[-1])
        limit = self.config.threshold
        if self.config.relative:
            limit = limit * a.pow(2).mean(-1, keepdim=True).sqrt()
        fired = (a.abs() > limit).sum(0).double().cpu()
        self.sums[i] = fired if self.sums[i] is None else self.sums[i] + fired
        self.counts[i] += a.shape[0]

    def result(self):
        return stack_or_list([(s / c).float() for s, c in zip(self.sums, self.counts, strict=True)])


class ActivationFrequency(Scorer):
    """Activation frequency of an MLP neuron: the fraction of calibration tokens at which it
    fires, f_j = E_t 1[|a_{j,t}| > τ] (``relative=True``: τ = threshold · RMS_k(a_{k,t}), the
    RMS of the layer's activation vector at the same token). A neuron that never fires has
    f = 0 and is removed first (the structured-pruning lesson's neuron criterion; cf. Hu et al.
    2016, "Network Trimming", APoZ)."""

    name = "activation_frequency"
    unit = "neurons"
    config_class = ActivationFrequencyConfig

    def accumulator(self, ctx, config):
        return _Frequency(ctx, config)


# ---- magnitude -------------------------------------------------------------------------------
class _NeuronMagnitude(Accumulator):
    taps = frozenset({"weights"})

    def __init__(self, ctx: Context):
        self.adapter = ctx.adapter
        self.rows: list[torch.Tensor | None] = [None] * ctx.n_layers

    def on_weights(self, i, layer):
        sq = None
        for w, dim in neuron_weights(self.adapter, layer):
            v = w.float().pow(2).sum(1 - dim)
            sq = v if sq is None else sq + v
        self.rows[i] = sq.sqrt().cpu()

    def result(self):
        return stack_or_list(self.rows)


class NeuronMagnitude(Scorer):
    """Weight magnitude of an MLP neuron j: the L2 norm of all weights that belong to it --
    row j of the gate and up projections and column j of the down projection:
    s_j = sqrt(‖W_gate[j]‖² + ‖W_up[j]‖² + ‖W_down[:, j]‖²). Needs no data."""

    name = "neuron_magnitude"
    unit = "neurons"

    def accumulator(self, ctx, config):
        return _NeuronMagnitude(ctx)


# ---- Wanda (structured) ----------------------------------------------------------------------
class _Wanda(Accumulator):
    taps = frozenset({"weights", "neuron_inputs"})

    def __init__(self, ctx: Context):
        self.adapter = ctx.adapter
        L = ctx.n_layers
        self.colsum: list[torch.Tensor | None] = [None] * L
        self.sq: list[torch.Tensor | None] = [None] * L
        self.counts = [0] * L

    def on_weights(self, i, layer):
        w = linear_weight(self.adapter.neuron_output_projection(layer))
        self.colsum[i] = w.float().abs().sum(0).cpu()

    def on_neuron_inputs(self, i, a, layer):
        a = a.float().reshape(-1, a.shape[-1])
        s = a.pow(2).sum(0).double().cpu()
        self.sq[i] = s if self.sq[i] is None else self.sq[i] + s
        self.counts[i] += a.shape[0]

    def result(self):
        triples = zip(self.colsum, self.sq, self.counts, strict=True)
        rows = [c * (s / n).sqrt().float() for c, s, n in triples]
        return stack_or_list(rows)


class Wanda(Scorer):
    """Structured Wanda (FLAP's ``wanda_sp``, An et al. 2024, arXiv 2312.11983; Wanda: Sun et
    al. 2023): for input channel j of the down projection,
    s_j = Σ_i |W_down[i, j]| · ‖a_j‖₂, with ‖a_j‖₂ = sqrt(E_t a_{j,t}²) the RMS of neuron j's
    activation over the calibration tokens (a running sum of squares)."""

    name = "wanda"
    unit = "neurons"

    def accumulator(self, ctx, config):
        return _Wanda(ctx)


# ---- Taylor ----------------------------------------------------------------------------------
class _NeuronTaylor(Accumulator):
    taps = frozenset({"gradients"})

    def __init__(self, ctx: Context, config: TaylorConfig):
        self.adapter = ctx.adapter
        self.granularity = config.granularity
        self.sums: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.batches = [0] * ctx.n_layers

    def on_gradients(self, i, layer):
        projs = [(p, 0) for p in self.adapter.mlp_input_projections(layer)]
        projs.append((self.adapter.neuron_output_projection(layer), 1))
        with torch.no_grad():
            total = None
            for p, dim in projs:
                prod = (linear_weight(p) * linear_weight_grad(p)).float()
                if self.granularity == "element":
                    v = prod.abs().sum(1 - dim)
                else:
                    v = prod.sum(1 - dim)
                total = v if total is None else total + v
            if self.granularity == "vector":
                total = total.abs()
            total = total.double().cpu()
        self.sums[i] = total if self.sums[i] is None else self.sums[i] + total
        self.batches[i] += 1

    def result(self):
        pairs = zip(self.sums, self.batches, strict=True)
        return stack_or_list([(s / b).float() for s, b in pairs])


class NeuronTaylor(Scorer):
    """First-order Taylor importance of an MLP neuron j (LLM-Pruner, Ma et al. 2023): with W_j
    its gate/up rows and down column and g = ∂L/∂W, ``element``: s_j = Σ_{w∈W_j} |g_w·w|,
    ``vector``: s_j = |Σ_{w∈W_j} g_w·w|. Averaged over calibration batches."""

    name = "neuron_taylor"
    unit = "neurons"
    kind = "gradient"
    config_class = TaylorConfig
    sequential_ok = False

    def accumulator(self, ctx, config):
        return _NeuronTaylor(ctx, config)

    def params(self, model, adapter):
        out = []
        for layer in adapter.layers(model):
            out += [p.weight for p in adapter.mlp_input_projections(layer)]
            out.append(adapter.neuron_output_projection(layer).weight)
        return out


SCORERS = (ActivationFrequency(), NeuronMagnitude(), Wanda(), NeuronTaylor())
