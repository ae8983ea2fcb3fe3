"""Training-free healing of removed layers by block linearization (ReplaceMe).

ReplaceMe (Shopkhoev et al., NeurIPS 2025, arXiv 2505.02819) replaces a contiguous run of
removed transformer layers by one linear map estimated on calibration activations and folds
that map into the layer just before the run, so the healed model has no new parameter and a
stock config.

Derivation (pre-norm decoder: Llama, Mistral, Qwen2/3, ...)
-----------------------------------------------------------
Layer ``k`` computes ``h_k = x_k + Attn_k(norm(x_k))`` and ``L_k = h_k + M_k`` with the MLP
output ``M_k = a_k W_kᵀ + b_k`` (``W_k``/``b_k``: weight and bias of ``down_proj``, ``a_k`` its
input). Remove the run of layers ``s..e``; the last kept layer before it is ``p = s - 1`` and
the dense model hands ``Y = L_e`` to layer ``e + 1``. After removal layer ``e + 1`` receives
``L_p = h_p + M_p`` instead.

The only thing that can change without a new parameter is ``down_proj`` of layer ``p``:
replacing ``W_p, b_p`` by ``Tᵀ W_p, Tᵀ b_p`` turns layer ``p``'s MLP output into ``M_p T`` (an
exact identity: ``(a Wᵀ + b) T = a (TᵀW)ᵀ + Tᵀb``), while ``h_p`` -- the residual stream
including ``x_p`` -- cannot be transformed by any weight of layer ``p``. The healed model
therefore hands ``h_p + M_p T`` to layer ``e + 1``, and the map to estimate is::

    T = argmin_T  Σ_tokens ‖ M_p T − (Y − h_p) ‖²  + λ ‖T‖²
      = (M_pᵀ M_p + λ I)⁻¹ M_pᵀ (Y − h_p)

with ``h_p = L_p − M_p`` (the input of layer ``s`` minus ``M_p``). This is the paper's
least-squares estimator: regressor the MLP output of the preceding layer, target the block's
output minus the residual that bypasses the MLP. If the dense block satisfies
``L_e − h_p = M_p T*`` for some ``T*`` (the removed run adds to the stream only a linear
function of ``M_p``), the fit recovers ``T*`` and the healed model equals the dense model
exactly -- ``tests/test_heal.py`` builds such a model. Only the Gram matrix ``M_pᵀM_p`` and the
cross term ``M_pᵀ(Y − h_p)`` are accumulated, in float64, batch by batch; the solve is in
float64 with ridge ``λ = ridge · trace(MᵀM) / d``; the fold is done in float64 and cast back to
the model's dtype.

The **cosine** estimator (the paper's second one) minimises the mean cosine distance between
the healed and the dense block output, ``1 − cos(h_p + M_p T, Y)`` per token. It has no closed
form and the accumulated statistics do not determine it, so a uniform random subsample of at
most ``cosine_tokens`` calibration tokens per run is kept and ``cosine_steps`` full-batch Adam
steps run from the least-squares solution (which is therefore never worse than its start on
that subsample).

Several runs (a non-contiguous selection) are all fitted on the *dense* model in one pass, as
ReplaceMe does. A run that starts at layer 0 has no preceding layer to fold into and is
refused. Post-norm models (BERT: ``L = LayerNorm(h + M)``) are refused too: the normalisation
after the sum is not linear, so no map folded into the output dense reproduces the block.

Selectors that use these statistics: :mod:`prunekit.core.heal_select`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.capture import Accumulator, capture
from prunekit.core.masking import masked
from prunekit.core.plan import PrunePlan
from prunekit.core.surgery import applied_plans, apply_plan
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter

Run = tuple[int, int]  # (first removed layer, last removed layer), original indices, inclusive
OBJECTIVES = ("lstsq", "cosine")


def layer_runs(removed: Iterable[int]) -> list[Run]:
    """Split removed layer indices into maximal contiguous runs: ``[3, 4, 7]`` ->
    ``[(3, 4), (7, 7)]``."""
    runs: list[list[int]] = []
    for i in sorted(set(int(x) for x in removed)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [(a, b) for a, b in runs]


def check_healable(model: nn.Module, runs: Sequence[Run]) -> None:
    """Refuse what cannot be folded, before anything is computed or modified."""
    adapter = get_adapter(model)
    if not getattr(adapter, "pre_norm", adapter.causal):
        raise PruningPlanError(
            f"linear healing needs a pre-norm decoder; {adapter.name!r} is post-norm (its "
            "layer output is LayerNorm(h + M), which no map folded into the output dense "
            "reproduces). Remove layers without --heal, or recover by fine-tuning.",
            entry="heal",
        )
    if applied_plans(model):
        raise PruningPlanError(
            "the model was already pruned; fit and fold the maps on the unpruned model (plans "
            "index its original layers), then apply the plan",
            entry="heal",
        )
    n_layers = len(adapter.layers(model))
    for first, last in runs:
        if first < 1 or last >= n_layers or first > last:
            raise PruningPlanError(
                f"cannot heal run {first}..{last} of a {n_layers}-layer model: it needs a kept "
                "layer before it to fold into (keep layer 0)",
                entry="heal",
            )


def _down_output(adapter, layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """``down_proj(a)`` computed functionally (calling the module would re-enter the hook)."""
    proj = adapter.neuron_output_projection(layer)
    return nn.functional.linear(a, adapter.linear_weight(proj), getattr(proj, "bias", None))


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


@dataclass
class RunStats:
    """Streaming statistics of one run: ``G = MᵀM``, ``C = Mᵀ(Y − h)``, ``tt = ‖Y − h‖²``,
    ``yy = ‖Y‖²`` (float64), plus an optional token subsample for the cosine objective."""

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
        """The ridge least-squares map ``T`` (float64, ``[d, d]``)."""
        d = self.gram.shape[0]
        if ridge <= 0:
            return torch.linalg.lstsq(self.gram, self.cross).solution
        lam = ridge * float(torch.trace(self.gram)) / d
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        return torch.linalg.solve(self.gram + lam * eye, self.cross)

    def residual(self, t: torch.Tensor) -> float:
        """``‖(Y − h) − M T‖²`` summed over the calibration tokens, from the statistics."""
        r = self.tt - 2 * float((t * self.cross).sum()) + float((t * (self.gram @ t)).sum())
        return max(r, 0.0)


class HealAccumulator(Accumulator):
    """Collects :class:`RunStats` for runs ``(first, last)`` during :func:`capture`.

    ``prev[run]`` is the kept layer whose MLP output is the regressor (``first - 1`` unless
    the layers in between are masked out). Runs sharing it share one Gram matrix (computed
    once per batch), so memory is one ``[d, d]`` float64 matrix per run plus one per ``p``.
    It needs a whole batch through all layers at once: normal mode only, not sequential.
    """

    taps = frozenset({"layer_io", "neuron_inputs"})

    def __init__(self, adapter, prev: dict[Run, int], sample_fraction: float = 0):
        self.adapter = adapter
        self.prev = dict(prev)
        self.stats: dict[Run, RunStats] = {}
        self.grams: dict[int, torch.Tensor] = {}  # p -> Σ M_pᵀ M_p, shared by its runs
        self.before = set(self.prev.values())
        self.mlp_out: dict[int, torch.Tensor] = {}  # p -> M_p of the current batch
        self.added: set[int] = set()  # p whose Gram already has the current batch
        self.resid: dict[Run, tuple[torch.Tensor, torch.Tensor]] = {}  # run -> (M_p, h_p)
        self.sample_fraction = sample_fraction
        self.rng = random.Random(0)

    def on_neuron_inputs(self, i: int, a: torch.Tensor, layer: nn.Module) -> None:
        if i in self.before:
            self.mlp_out[i] = _flat64(_down_output(self.adapter, layer, a))

    def on_layer_io(self, i: int, x_in: torch.Tensor, x_out: torch.Tensor, rows: slice) -> None:
        for run, p in self.prev.items():
            if run[0] == i:
                m = self.mlp_out[p]
                self.resid[run] = (m, _flat64(x_in) - m)
            if run[1] == i:
                m, h = self.resid.pop(run)
                self._add(run, p, m, h, _flat64(x_out))

    def _add(self, run: Run, p: int, m: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        d = m.shape[1]
        if p not in self.grams:
            self.grams[p] = torch.zeros(d, d, dtype=torch.float64, device=m.device)
        if p not in self.added:
            self.grams[p] += m.T @ m
            self.added.add(p)
        if run not in self.stats:
            self.stats[run] = RunStats(gram=self.grams[p], cross=torch.zeros_like(self.grams[p]))
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
    batch_size: int = 8,
    progress: bool = False,
) -> dict[Run, RunStats]:
    """One forward pass over ``calib_ids`` accumulating :class:`RunStats` for every run (and a
    uniform subsample of about ``sample_tokens`` tokens per run when it is positive).

    ``removed``: layers already taken out (masked during the pass); a run's regressor is then
    the MLP output of the last kept layer before it (:func:`preceding_kept`)."""
    fraction = min(1.0, sample_tokens / max(1, calib_ids.numel()))
    prev = {tuple(r): preceding_kept(r[0], removed) for r in runs}
    acc = HealAccumulator(get_adapter(model), prev, fraction)
    with masked(model, PrunePlan(layers=sorted(set(removed)))):
        capture(model, calib_ids, [acc], batch_size=batch_size, progress=progress)
    return acc.result()


def _cosine_refine(stats: RunStats, t0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Adam on ``mean(1 − cos(h + M T, Y))`` over the kept token subsample, from ``t0``."""
    m, h, y = (torch.cat(parts) for parts in zip(*stats.sample, strict=True))
    t = t0.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    best, best_loss = t0.clone(), float("inf")
    for _ in range(steps + 1):
        with torch.enable_grad():
            loss = 1 - nn.functional.cosine_similarity(h + m @ t, y, dim=-1).mean()
            if loss.item() < best_loss:
                best, best_loss = t.detach().to(torch.float64).clone(), loss.item()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return best


def fit_linear_heal(
    model: nn.Module,
    calib_ids: torch.Tensor,
    removed_layers: Iterable[int],
    *,
    ridge: float = 1e-4,
    objective: str = "lstsq",
    sequential: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    cosine_tokens: int = 8192,
    cosine_steps: int = 200,
    cosine_lr: float = 1e-4,
) -> dict[Run, torch.Tensor]:
    """Fit one linear map per contiguous run of ``removed_layers`` (see the module docstring).

    Returns ``{(first, last): T}`` with ``T`` a float64 ``[hidden, hidden]`` tensor, indexed by
    the original layer numbers; fold the maps with :func:`apply_linear_heal` before applying
    the plan. ``ridge`` is relative to the mean eigenvalue of ``MᵀM`` (0: plain least squares);
    ``objective="cosine"`` refines the least-squares map on the paper's cosine objective.
    ``sequential`` (several runs): each run is fitted on the model whose earlier runs are
    already healed and removed, so its target is what the healed model will really compute
    (one pass per run; the model is restored afterwards); ``False`` fits every run on the dense
    model in one pass, as ReplaceMe does.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    runs = layer_runs(removed_layers)
    check_healable(model, runs)
    sample = cosine_tokens if objective == "cosine" else 0

    def solve(stats: dict[Run, RunStats]) -> dict[Run, torch.Tensor]:
        maps = {}
        for run, st in stats.items():
            t = st.solve(ridge)
            maps[run] = _cosine_refine(st, t, cosine_steps, cosine_lr) if sample else t
        return maps

    kw = {"batch_size": batch_size, "progress": progress, "sample_tokens": sample}
    if not sequential or len(runs) < 2:
        return solve(accumulate_run_stats(model, calib_ids, runs, **kw)) if runs else {}
    maps: dict[Run, torch.Tensor] = {}
    with temporary_folds(model) as fold:
        for run in runs:
            done = [i for a, b in maps for i in range(a, b + 1)]
            maps |= solve(accumulate_run_stats(model, calib_ids, [run], removed=done, **kw))
            fold(run[0] - 1, maps[run])
    return maps


@contextlib.contextmanager
def temporary_folds(model: nn.Module) -> Iterator:
    """Yields ``fold(p, T)`` (:func:`_fold`, which first saves layer ``p``'s ``down_proj``);
    on exit every folded weight and bias is restored exactly."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    saved: dict[int, list] = {}

    def fold(p: int, t: torch.Tensor) -> None:
        if p not in saved:
            proj = adapter.neuron_output_projection(layers[p])
            params = (adapter.linear_weight(proj), getattr(proj, "bias", None))
            saved[p] = [(x, x.detach().clone()) for x in params if x is not None]
        _fold(model, p, t)

    try:
        yield fold
    finally:
        with torch.no_grad():
            for pairs in saved.values():
                for x, original in pairs:
                    x.copy_(original)


@torch.no_grad()
def _fold(model: nn.Module, p: int, t: torch.Tensor) -> None:
    """``down_proj`` of layer ``p`` becomes ``Tᵀ W``, ``Tᵀ b`` (float64 product, dtype kept)."""
    adapter = get_adapter(model)
    proj = adapter.neuron_output_projection(adapter.layers(model)[p])
    weight = adapter.linear_weight(proj)
    t = t.to(device=weight.device, dtype=torch.float64)
    weight.copy_((t.T @ weight.to(torch.float64)).to(weight.dtype))
    bias = getattr(proj, "bias", None)
    if bias is not None:
        bias.copy_((t.T @ bias.to(torch.float64)).to(bias.dtype))


def apply_linear_heal(model: nn.Module, maps: dict[Run, torch.Tensor]) -> nn.Module:
    """Fold each run's map into ``down_proj`` of the layer before the run, in place (weight and
    bias become ``Tᵀ W`` and ``Tᵀ b``; the model's dtype is kept). The model must still have
    its original layers: call this *before* :func:`prunekit.apply_plan` removes the runs."""
    check_healable(model, list(maps))
    for (first, _last), t in maps.items():
        _fold(model, first - 1, t)
    return model


METHODS = ("linear",)


@dataclass
class HealConfig:
    """Options of linear healing (the recipe's ``heal.options``, ``--heal-opt key=value``)."""

    ridge: float = field(
        default=1e-4,
        metadata={"help": "ridge, relative to the mean eigenvalue of MᵀM (0: plain lstsq)"},
    )
    objective: str = field(
        default="lstsq", metadata={"help": "'lstsq' or 'cosine' (the paper's cosine variant)"}
    )
    sequential: bool = field(
        default=True,
        metadata={"help": "fit each run on the model with the earlier runs already healed"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise ValueError(f"ridge must be a number >= 0, got {self.ridge!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "objective": self.objective, "sequential": self.sequential}


class LinearHeal:
    """Linear healing as the pipeline sees it: ``name``, ``config_class``, ``available()``
    (the plugin contract, so its options go through :func:`prunekit.contracts.build_config`)
    and :meth:`heal`, which fits and folds the maps for the layers a plan removes."""

    name = "linear"
    config_class = HealConfig

    def available(self) -> tuple[bool, str]:
        return True, ""

    def heal(
        self, model: nn.Module, calib_ids: torch.Tensor, layers: Iterable[int], config: HealConfig
    ) -> dict[Run, torch.Tensor]:
        maps = fit_linear_heal(
            model,
            calib_ids,
            layers,
            ridge=config.ridge,
            objective=config.objective,
            sequential=config.sequential,
        )
        apply_linear_heal(model, maps)
        return maps


def get_healer(method: str) -> LinearHeal:
    """The healing method object for a recipe's ``heal.method``."""
    if method not in METHODS:
        raise ValueError(f"heal.method: unknown method {method!r}; valid: {', '.join(METHODS)}")
    return LinearHeal()


def heal_and_remove(
    model: nn.Module, calib_ids: torch.Tensor, removed_layers: Iterable[int], **fit_kwargs
) -> nn.Module:
    """Fit the maps, fold them, and remove ``removed_layers`` with :func:`prunekit.apply_plan`."""
    removed = sorted(set(removed_layers))
    apply_linear_heal(model, fit_linear_heal(model, calib_ids, removed, **fit_kwargs))
    return apply_plan(model, PrunePlan(layers=removed))
