"""Streaming statistics of linear healing (:mod:`prunekit.core.heal`): per removed run, the Gram
matrix of the regressor, its cross term with the target and the target's norm, accumulated
batch by batch in float64 during one :func:`~prunekit.core.capture.capture` pass.

Two regressors (``fit``):

- ``"map"`` (ReplaceMe): the MLP output ``M_p`` of the layer ``p`` before the run, ``[d]``
  per token; the solution ``T`` (``[d, d]``) is folded as ``down_proj ← Tᵀ W``, ``Tᵀ b``.
- ``"down_proj"``: the *input* of that layer's ``down_proj`` (the MLP activations ``a_p``,
  ``[I]`` per token, plus a constant 1 when ``down_proj`` has a bias); the solution
  (``[I(+1), d]``) *is* the new ``down_proj`` weight (and bias). Every map ReplaceMe can fold
  (``W' = TᵀW``) is one such weight, so this fit is never worse on the calibration tokens; it
  has ``I / d`` times the parameters (no new ones in the model) and a ``[I, I]`` Gram matrix.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.core.capture import Accumulator, capture
from prunekit.core.masking import masked
from prunekit.core.plan import PrunePlan
from prunekit.plugins import get_adapter

Run = tuple[int, int]  # (first removed layer, last removed layer), original indices, inclusive
FITS = ("map", "down_proj")


def _down_output(adapter, layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``down_proj(a)`` computed functionally (calling the module would re-enter the hook)."""
    proj = adapter.neuron_output_projection(layer)
    return nn.functional.linear(a, adapter.linear_weight(proj), getattr(proj, "bias", None))


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def _with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones_like(a[:, :1])], dim=1)


@dataclass
class RunStats:
    """Streaming statistics of one run: ``G = RᵀR``, ``C = Rᵀ(Y − h)``, ``tt = ‖Y − h‖²``,
    ``yy = ‖Y‖²`` (float64; ``R`` the regressor), plus an optional token subsample for the
    cosine objective."""

    gram: torch.Tensor
    cross: torch.Tensor
    tt: float = 0.0
    yy: float = 0.0
    n_tokens: int = 0
    sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, m: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch: regressor ``m``, target ``Y − h`` and block output ``y``."""
        self.gram += m.T @ m
        self.add_cross(m, target, y)

    def add_cross(self, m: torch.Tensor, target: torch.Tensor, y: torch.Tensor) -> None:
        """Everything but the Gram matrix (when it is shared and added by the caller)."""
        self.cross += m.T @ target
        self.tt += float((target * target).sum())
        self.yy += float((y * y).sum())
        self.n_tokens += m.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """The ridge least-squares solution (float64, ``[regressor dim, d]``)."""
        d = self.gram.shape[0]
        if ridge <= 0:
            return torch.linalg.lstsq(self.gram, self.cross).solution
        lam = ridge * float(torch.trace(self.gram)) / d
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross)

    def residual(self, t: torch.Tensor) -> float:
        """``‖(Y − h) − R T‖²`` summed over the calibration tokens, from the statistics."""
        r = self.tt - 2 * float((t * self.cross).sum()) + float((t * (self.gram @ t)).sum())
        return max(r, 0.0)


class HealAccumulator(Accumulator):
    """Collects :class:`RunStats` for runs ``(first, last)`` during :func:`capture`.

    ``prev[run]`` is the kept layer whose MLP is the regressor's source (``first - 1`` unless
    the layers in between are masked out). Runs sharing it share one Gram matrix (computed
    once per batch), so memory is one ``[r, d]`` float64 matrix per run plus one ``[r, r]``
    per ``p`` (``r`` = d for ``fit="map"``, the MLP width for ``"down_proj"``).
    It needs a whole batch through all layers at once: normal mode only, not sequential.
    """

    taps = frozenset({"layer_io", "neuron_inputs"})

    def __init__(self, adapter, prev: dict[Run, int], sample_fraction: float = 0, fit="map"):
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.adapter = adapter
        self.fit = fit
        self.prev = dict(prev)
        self.stats: dict[Run, RunStats] = {}
        self.grams: dict[int, torch.Tensor] = {}  # p -> Σ R_pᵀ R_p, shared by its runs
        self.before = set(self.prev.values())
        self.mlp_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # p -> (R_p, M_p)
        self.added: set[int] = set()  # p whose Gram already has the current batch
        self.resid: dict[Run, tuple[torch.Tensor, torch.Tensor]] = {}  # run -> (R_p, h_p)
        self.sample_fraction = sample_fraction
        self.rng = random.Random(0)

    def on_neuron_inputs(self, i: int, a: torch.Tensor, layer: nn.Module) -> None:
        if i not in self.before:
            return
        m = _flat64(_down_output(self.adapter, layer, a))
        if self.fit == "map":
            self.mlp_out[i] = (m, m)
            return
        r = _flat64(a)
        bias = getattr(self.adapter.neuron_output_projection(layer), "bias", None)
        self.mlp_out[i] = (r if bias is None else _with_ones(r), m)

    def on_layer_io(self, i: int, x_in: torch.Tensor, x_out: torch.Tensor, rows: slice) -> None:
        for run, p in self.prev.items():
            if run[0] == i:
                r, m = self.mlp_out[p]
                self.resid[run] = (r, _flat64(x_in) - m)
            if run[1] == i:
                r, h = self.resid.pop(run)
                self._add(run, p, r, h, _flat64(x_out))

    def _add(self, run: Run, p: int, m: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        d = m.shape[1]
        if p not in self.grams:
            self.grams[p] = torch.zeros(d, d, dtype=torch.float64, device=m.device)
        if p not in self.added:
            self.grams[p] += m.T @ m
            self.added.add(p)
        if run not in self.stats:
            cross = torch.zeros(d, y.shape[1], dtype=torch.float64, device=m.device)
            self.stats[run] = RunStats(gram=self.grams[p], cross=cross)
        self.stats[run].add_cross(m, y - h, y)
        if self.sample_fraction > 0:
            self._keep_sample(run, m, h, y)

    def _keep_sample(self, run: Run, m, h, y) -> None:
        """Uniform token subsample (same fraction of every batch) for the cosine objective."""
        k = min(m.shape[0], max(1, round(self.sample_fraction * m.shape[0])))
        idx = torch.tensor(sorted(self.rng.sample(range(m.shape[0]), k)), device=m.device)
        self.stats[run].sample.append((m[idx].float(), h[idx].float(), y[idx].float()))

    def end_batch(self) -> None:
        self.mlp_out.clear()
        self.added.clear()

    def result(self) -> dict[Run, RunStats]:
        return self.stats


def preceding_kept(first: int, removed: Iterable[int]) -> int:
    """The last layer before ``first`` that is not in ``removed`` (-1 if none)."""
    gone = set(removed)
    p = first - 1
    while p in gone:
        p -= 1
    return p


def accumulate_run_stats(
    model: nn.Module,
    calib_ids: torch.Tensor,
    runs: Sequence[Run],
    *,
    removed: Sequence[int] = (),
    sample_tokens: int = 0,
    fit: str = "map",
    batch_size: int = 8,
    progress: bool = False,
) -> dict[Run, RunStats]:
    """One forward pass over ``calib_ids`` accumulating :class:`RunStats` for every run (and a
    uniform subsample of about ``sample_tokens`` tokens per run when it is positive).

    ``removed``: layers already taken out (masked during the pass); a run's regressor then
    comes from the last kept layer before it (:func:`preceding_kept`)."""
    fraction = min(1.0, sample_tokens / max(1, calib_ids.numel()))
    prev = {tuple(r): preceding_kept(r[0], removed) for r in runs}
    acc = HealAccumulator(get_adapter(model), prev, fraction, fit)
    with masked(model, PrunePlan(layers=sorted(set(removed)))):
        capture(model, calib_ids, [acc], batch_size=batch_size, progress=progress)
    return acc.result()
