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

**Refitting down_proj** (``fit="down_proj"``, the default of ``--heal linear``): the same
place can hold any weight, not only ``TᵀW``. Regressing the target ``Y − h_p`` on the
*input* of ``down_proj`` (the MLP activations ``a_p``, ``I`` per token, plus a 1 when it has
a bias) gives the new weight directly::

    W'ᵀ = argmin ‖ a_p W'ᵀ − (Y − h_p) ‖² + λ ‖W'‖²

Every ReplaceMe map is one such weight (``W' = TᵀW``), so the calibration residual can only
be lower; the model keeps its shapes and config. On SmolLM2-135M (block 13-18 of 30, 64 × 256
Brown tokens) it left a relative residual of 0.33 against the map's 0.44 and lowered the loss
on held-out Brown rows from 4.116 (removed) to 3.881 against the map's 3.910. The Gram matrix
is ``I × I`` (float64: 19 MB for I = 1536, 1.6 GB for Llama-3-8B's 14336).

By default (``sequential``) several runs are fitted one after another, each on the model whose
earlier runs are already healed and removed; ``sequential=False`` fits them all on the *dense*
model in one pass, as ReplaceMe does. A run that starts at layer 0 has no preceding layer to
fold into and is refused. Post-norm models (BERT: ``L = LayerNorm(h + M)``) are refused too:
the normalisation after the sum is not linear, so no map folded into the output dense
reproduces the block.

Selectors that use these statistics: :mod:`prunekit.core.heal_select` and the layer scorers
``heal_residual`` and ``heal_loss`` (:mod:`prunekit.scorers.heal`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.heal_stats import (
    FITS,
    HealAccumulator,
    Run,
    RunStats,
    accumulate_run_stats,
    preceding_kept,
)
from prunekit.core.plan import PrunePlan
from prunekit.core.surgery import applied_plans, apply_plan
from prunekit.errors import PruningPlanError
from prunekit.plugins import get_adapter

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
    fit: str = "map",
) -> dict[Run, torch.Tensor]:
    """Fit one linear map per contiguous run of ``removed_layers`` (see the module docstring).

    Returns ``{(first, last): T}`` with ``T`` a float64 ``[hidden, hidden]`` tensor, indexed by
    the original layer numbers; fold the maps with :func:`apply_linear_heal` before applying
    the plan. ``ridge`` is relative to the mean eigenvalue of ``MᵀM`` (0: plain least squares);
    ``objective="cosine"`` refines the least-squares map on the paper's cosine objective.
    ``sequential`` (several runs): each run is fitted on the model whose earlier runs are
    already healed and removed, so its target is what the healed model will really compute
    (one pass per run; the model is restored afterwards); ``False`` fits every run on the dense
    model in one pass, as ReplaceMe does. ``fit="down_proj"`` refits the whole ``down_proj``
    weight instead of a map (:mod:`prunekit.core.heal_stats`); ``T`` is then that weight,
    transposed, ``[intermediate (+1 for a bias), hidden]``.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
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

    kw = {"batch_size": batch_size, "progress": progress, "sample_tokens": sample, "fit": fit}
    if not sequential or len(runs) < 2:
        return solve(accumulate_run_stats(model, calib_ids, runs, **kw)) if runs else {}
    maps: dict[Run, torch.Tensor] = {}
    with temporary_folds(model) as fold:
        for run in runs:
            done = [i for a, b in maps for i in range(a, b + 1)]
            maps |= solve(accumulate_run_stats(model, calib_ids, [run], removed=done, **kw))
            fold(run[0] - 1, maps[run], fit)
    return maps


@contextlib.contextmanager
def temporary_folds(model: nn.Module) -> Iterator:
    """Yields ``fold(p, T, fit)`` (:func:`_fold`, which first saves layer ``p``'s ``down_proj``);
    on exit every folded weight and bias is restored exactly."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    saved: dict[int, list] = {}

    def fold(p: int, t: torch.Tensor, fit: str = "map") -> None:
        if p not in saved:
            proj = adapter.neuron_output_projection(layers[p])
            params = (adapter.linear_weight(proj), getattr(proj, "bias", None))
            saved[p] = [(x, x.detach().clone()) for x in params if x is not None]
        _fold(model, p, t, fit)

    try:
        yield fold
    finally:
        with torch.no_grad():
            for pairs in saved.values():
                for x, original in pairs:
                    x.copy_(original)


@torch.no_grad()
def _fold(model: nn.Module, p: int, t: torch.Tensor, fit: str = "map") -> None:
    """``down_proj`` of layer ``p`` becomes ``Tᵀ W``, ``Tᵀ b`` (``fit="map"``: float64
    product) or ``T``'s rows (``"down_proj"``: the weight, then the bias); dtype kept."""
    adapter = get_adapter(model)
    proj = adapter.neuron_output_projection(adapter.layers(model)[p])
    weight = adapter.linear_weight(proj)
    bias = getattr(proj, "bias", None)
    t = t.to(device=weight.device, dtype=torch.float64)
    if fit == "down_proj":
        n_in = weight.shape[1]
        if t.shape[0] != n_in + (bias is not None) or t.shape[1] != weight.shape[0]:
            raise ValueError(f"a down_proj fit of shape {tuple(t.shape)} does not fit layer {p}")
        weight.copy_(t[:n_in].T.to(weight.dtype))
        if bias is not None:
            bias.copy_(t[n_in].to(bias.dtype))
        return
    weight.copy_((t.T @ weight.to(torch.float64)).to(weight.dtype))
    if bias is not None:
        bias.copy_((t.T @ bias.to(torch.float64)).to(bias.dtype))


def apply_linear_heal(
    model: nn.Module, maps: dict[Run, torch.Tensor], fit: str = "map"
) -> nn.Module:
    """Fold each run's map into ``down_proj`` of the layer before the run, in place (weight and
    bias become ``Tᵀ W`` and ``Tᵀ b``, or for ``fit="down_proj"`` the fitted weight and bias;
    the model's dtype is kept). The model must still have its original layers: call this
    *before* :func:`prunekit.apply_plan` removes the runs."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    check_healable(model, list(maps))
    for (first, _last), t in maps.items():
        _fold(model, first - 1, t, fit)
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
    fit: str = field(
        default="down_proj",
        metadata={
            "help": "'down_proj' (refit the whole down_proj weight of the layer before the "
            "run on its input activations) or 'map' (ReplaceMe: a [hidden, hidden] map "
            "folded into that down_proj)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise ValueError(f"ridge must be a number >= 0, got {self.ridge!r}")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ridge": self.ridge,
            "objective": self.objective,
            "sequential": self.sequential,
            "fit": self.fit,
        }


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
            fit=config.fit,
        )
        apply_linear_heal(model, maps, config.fit)
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
    maps = fit_linear_heal(model, calib_ids, removed, **fit_kwargs)
    apply_linear_heal(model, maps, fit_kwargs.get("fit", "map"))
    return apply_plan(model, PrunePlan(layers=removed))


__all__ = [
    "FITS",
    "METHODS",
    "OBJECTIVES",
    "HealAccumulator",
    "HealConfig",
    "LinearHeal",
    "Run",
    "RunStats",
    "accumulate_run_stats",
    "apply_linear_heal",
    "check_healable",
    "fit_linear_heal",
    "get_healer",
    "heal_and_remove",
    "layer_runs",
    "preceding_kept",
    "temporary_folds",
]
