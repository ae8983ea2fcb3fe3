"""Layer scorers: Block Influence, angular distance, perplexity drop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from prunekit.core.capture import Accumulator, Context
from prunekit.scorers.base import Scorer
from prunekit.scorers.perplexity import PerplexityDropConfig, layer_drop_losses


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension, computed in fp32."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


# ---- Block Influence -------------------------------------------------------------------------
class _BIAccumulator(Accumulator):
    taps = frozenset({"layer_io"})

    def __init__(self, ctx: Context, config: Any = None):
        self.sums = torch.zeros(ctx.n_layers, dtype=torch.float64)
        self.counts = torch.zeros(ctx.n_layers, dtype=torch.float64)

    def on_layer_io(self, i, x_in, x_out, rows):
        c = _cos(x_in, x_out)
        self.sums[i] += c.sum().double().cpu()
        self.counts[i] += c.numel()

    def result(self):
        return (1.0 - self.sums / self.counts.clamp(min=1)).float()


class BlockInfluence(Scorer):
    """Block Influence (ShortGPT, Men et al. 2024, arXiv 2403.03853).

    BI_i = 1 − E_{X,t} [ x_{i,t}ᵀ x_{i+1,t} / (‖x_{i,t}‖ ‖x_{i+1,t}‖) ],

    the mean over all calibration tokens of one minus the cosine similarity between the hidden
    state entering layer i and the one leaving it. A layer that changes its input little has a
    low BI and is removed first. Streaming: one running sum of cosines per layer.
    """

    name = "block_influence"
    unit = "layers"

    accumulator_class = _BIAccumulator


# ---- angular distance ------------------------------------------------------------------------
@dataclass
class AngularDistanceConfig:
    token: str = field(
        default="last",
        metadata={
            "help": "'last': the final token of each sample (Gromov et al.); 'all': every token"
        },
    )

    def __post_init__(self) -> None:
        if self.token not in ("last", "all"):
            raise ValueError(f"token must be 'last' or 'all', got {self.token!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token}


class _AngularAccumulator(Accumulator):
    """Keeps, per layer boundary, the unit vectors of the last token of every sample
    (``[N, H]``), or for ``token='all'`` the current batch's unit vectors only."""

    taps = frozenset({"layer_io"})

    def __init__(self, ctx: Context, config: AngularDistanceConfig):
        self.L = ctx.n_layers
        self.token = config.token
        self.n = ctx.n_samples
        self.last: list[torch.Tensor | None] = [None] * (self.L + 1)
        self.batch: list[torch.Tensor | None] = [None] * (self.L + 1)
        self.sums = torch.zeros(self.L, self.L, dtype=torch.float64)
        self.count = 0

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    def _store(self, k: int, x: torch.Tensor, rows: slice) -> None:
        if self.token == "last":
            if self.last[k] is None:
                self.last[k] = torch.zeros(self.n, x.shape[-1])
            self.last[k][rows] = self._unit(x[:, -1]).cpu()
        else:
            self.batch[k] = self._unit(x).reshape(-1, x.shape[-1])

    def on_layer_io(self, i, x_in, x_out, rows):
        self._store(i, x_in, rows)
        if i == self.L - 1:
            self._store(self.L, x_out, rows)

    def end_batch(self):
        if self.token != "all":
            return
        states = self.batch
        for n in range(1, self.L + 1):
            for start in range(0, self.L - n + 1):
                cos = (states[start] * states[start + n]).sum(-1).clamp(-1.0, 1.0)
                self.sums[n - 1, start] += (torch.arccos(cos) / math.pi).sum().double().cpu()
        self.count += states[0].shape[0]
        self.batch = [None] * (self.L + 1)

    def result(self):
        out = torch.full((self.L, self.L), float("nan"))
        if self.token == "all":
            for n in range(1, self.L + 1):
                out[n - 1, : self.L - n + 1] = (
                    self.sums[n - 1, : self.L - n + 1] / self.count
                ).float()
            return out
        for n in range(1, self.L + 1):
            for start in range(0, self.L - n + 1):
                cos = (self.last[start] * self.last[start + n]).sum(-1).clamp(-1.0, 1.0)
                out[n - 1, start] = (torch.arccos(cos) / math.pi).mean()
        return out


class AngularDistance(Scorer):
    """Angular distance between layer inputs (Gromov et al. 2024, arXiv 2403.17887).

    d(x^(l), x^(l+n)) = (1/π) · arccos( x^(l)·x^(l+n) / (‖x^(l)‖ ‖x^(l+n)‖) ),

    averaged over samples (``token='last'``: the final token of each sequence, as in the paper;
    ``token='all'``: every token). x^(l) is the input of layer l, x^(L) the last layer's output.
    Result: a matrix ``D[n-1, l]`` for block size n = 1..L and start layer l (NaN where
    l + n > L). Removing the n layers l..l+n-1 is cheapest at the l minimising ``D[n-1, l]``;
    row 0 is a per-layer score (higher = keep). ``block = True``: the selection removes the
    contiguous block that minimises ``D[n-1, l]``.

    ``token='last'`` keeps only the last-token unit vectors (``[N, hidden]`` per boundary) and
    works in sequential mode; ``token='all'`` needs every boundary of one batch at once, so it
    runs in normal mode only.
    """

    name = "angular_distance"
    unit = "layers"
    config_class = AngularDistanceConfig
    block = True

    def accumulator(self, ctx, config):
        if ctx.sequential and config.token == "all":
            raise ValueError(
                "angular_distance with token='all' needs every layer's hidden states of a batch "
                "at once, which sequential mode never holds; use token='last' (the paper's "
                "choice) or normal mode"
            )
        return _AngularAccumulator(ctx, config)


# ---- perplexity drop -------------------------------------------------------------------------
class PerplexityDrop(Scorer):
    """Loss increase when one layer is skipped (SLEB, Song et al. 2024, arXiv 2402.09025, uses
    it iteratively: ``Targets.layer_steps``): score_i = L(model without layer i) − L(model),
    with L the mean next-token cross-entropy on the first ``samples`` calibration samples.
    Each layer's input is cached from one normal pass, so skipping layer i recomputes only the
    layers above it (``cache=False``: one full masked pass per layer). Higher = keep."""

    name = "perplexity_drop"
    unit = "layers"
    kind = "custom"
    sequential_ok = False
    config_class = PerplexityDropConfig

    def run(self, model, samples, ctx, config, *, batch_size, progress):
        if not ctx.causal:
            raise ValueError(
                "perplexity_drop needs a language-modelling loss; use block_influence for "
                "encoder models"
            )
        if config.samples:
            samples = samples[: config.samples]
        base, losses = layer_drop_losses(
            model, samples, ctx.adapter, batch_size=batch_size, cache=config.cache
        )
        return (losses - base).float()


SCORERS = (BlockInfluence(), AngularDistance(), PerplexityDrop())
