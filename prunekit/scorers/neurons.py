"""MLP-neuron scorers: activation frequency, magnitude, Taylor, Wanda. One score per neuron
(``[L, intermediate]``). The neuron activation is the input of the down projection
(``act(gate(x)) * up(x)`` for gated MLPs, ``act(W_in x)`` otherwise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers import base
from prunekit.scorers.base import Scorer, stack_or_list


def neuron_weights(adapter, layer, *, grad: bool = False) -> list[tuple[torch.Tensor, int]]:
    """(weight in Linear layout, neuron dimension) for every projection a neuron owns; with
    ``grad`` the weights' gradients instead."""
    projs = [(p, 0) for p in adapter.mlp_input_projections(layer)]
    projs.append((adapter.neuron_output_projection(layer), 1))
    get = (lambda p: base.weight_grad(adapter, p)) if grad else adapter.linear_weight
    return [(get(p), dim) for p, dim in projs]


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

    accumulator_class = _Frequency


# ---- magnitude -------------------------------------------------------------------------------
class _NeuronMagnitude(base.MagnitudeAccumulator):
    def parts(self, layer):
        return [(w, 1 - dim) for w, dim in neuron_weights(self.adapter, layer)]


class NeuronMagnitude(Scorer):
    """Weight magnitude of an MLP neuron j: the L2 norm of all weights that belong to it --
    row j of the gate and up projections and column j of the down projection:
    s_j = sqrt(‖W_gate[j]‖² + ‖W_up[j]‖² + ‖W_down[:, j]‖²). Needs no data."""

    name = "neuron_magnitude"
    unit = "neurons"

    accumulator_class = _NeuronMagnitude


# ---- Wanda (structured) ----------------------------------------------------------------------
class _Wanda(Accumulator):
    taps = frozenset({"weights", "neuron_inputs"})

    def __init__(self, ctx: Context, config: Any = None):
        self.adapter = ctx.adapter
        #: per layer: Σ_i |W_down[i, j]|, Σ_t a_{j,t}², token count
        self.colsum: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.sq: list[torch.Tensor | None] = [None] * ctx.n_layers
        self.counts = [0] * ctx.n_layers

    def on_weights(self, i, layer):
        w = self.adapter.linear_weight(self.adapter.neuron_output_projection(layer))
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

    accumulator_class = _Wanda


# ---- Taylor ----------------------------------------------------------------------------------
class _NeuronTaylor(base.TaylorAccumulator):
    def products(self, layer):
        grads = neuron_weights(self.adapter, layer, grad=True)
        return [
            (w * g, 1 - dim)
            for (w, dim), (g, _) in zip(neuron_weights(self.adapter, layer), grads, strict=True)
        ]


class NeuronTaylor(Scorer):
    """First-order Taylor importance of an MLP neuron j (LLM-Pruner, Ma et al. 2023): with W_j
    its gate/up rows and down column and g = ∂L/∂W, ``element``: s_j = Σ_{w∈W_j} |g_w·w|,
    ``vector``: s_j = |Σ_{w∈W_j} g_w·w|. Averaged over calibration batches."""

    name = "neuron_taylor"
    unit = "neurons"
    kind = "gradient"
    config_class = base.TaylorConfig
    sequential_ok = False

    accumulator_class = _NeuronTaylor

    def params(self, model, adapter):
        out = []
        for layer in adapter.layers(model):
            out += [p.weight for p in adapter.mlp_input_projections(layer)]
            out.append(adapter.neuron_output_projection(layer).weight)
        return out


SCORERS = (ActivationFrequency(), NeuronMagnitude(), Wanda(), NeuronTaylor())
