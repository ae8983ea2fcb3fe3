"""What recovery methods build on, and the pieces of the training loop of
:mod:`prunekit.core.recovery`: the losses, the :class:`TrainingSession` a method's ``prepare``
returns, packing, the held-out split, the learning-rate schedule and the
:class:`RecoveryResult` the loop returns. (The base class
:class:`prunekit.core.recovery.RecoveryMethod` sits next to the config it defaults to.)

A recovery method (registered through ``register_recoveries``; the built-ins are in
:mod:`prunekit.recoveries`) implements the plugin contract of :mod:`prunekit.contracts` —
``name``, ``config_class`` (:class:`prunekit.core.recovery.RecoveryConfig`, or a subclass
with the method's own fields), ``available() -> (ok, why)`` — plus

* ``description`` and ``uses_teacher`` (bool: the loop passes the dense teacher's logits);
* ``prepare(model, config) -> TrainingSession``: make the trainable parameters;
  ``session.finish()`` folds them back so the model is a plain (pruned) model again;
* ``objective(student_logits, input_ids, teacher_logits, config) -> Tensor``: the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ---- losses --------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, averaged over the ``B·(S−1)`` predicted
    tokens: ``−mean_t log p(x_{t+1} | x_≤t)``."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1).to(logits.device)
    )


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Knowledge-distillation loss of Hinton et al. 2015 ("Distilling the Knowledge in a Neural
    Network"), as used for pruned LLMs by Minitron (Muralidharan et al. 2024, arXiv 2407.14679):

        L = T² · mean_tokens KL( softmax(z_t / T) ‖ softmax(z_s / T) )

    with teacher logits ``z_t`` and student logits ``z_s``. The ``T²`` factor keeps gradient
    magnitudes comparable across temperatures. Zero exactly when the two logit tensors are
    equal; averaged over every token position (B·S).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; the teacher must share the student's "
            "tokenizer and vocabulary (use the dense model the student was pruned from)"
        )
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float().to(log_q.device) / t, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return kl.mean() * (t * t)


@dataclass
class TeacherTopK:
    """The teacher's output for a batch, as cached before pruning
    (:mod:`prunekit.core.teacher_cache`): per token the ``k`` largest log-probabilities at
    temperature ``temperature`` (``logp``, ``[B, S, k]``), their vocabulary ``index``
    (``[B, S, k]``), and ``log_rest`` (``[B, S]``), the log of the probability left to the
    other tokens (``-1e30`` when there is none, e.g. ``k`` = vocabulary). ``hidden``: the
    teacher's decoder-layer outputs ``[B, S, hidden]`` by original layer index, when the
    cache stored them (:mod:`prunekit.core.hidden_distill`)."""

    logp: torch.Tensor
    index: torch.Tensor
    log_rest: torch.Tensor
    temperature: float
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


#: stands in for log(0) in the cached "rest" bucket: finite, so gradients stay finite
LOG_ZERO = -1e30


def distill_topk_kl(
    student_logits: torch.Tensor, teacher: TeacherTopK, temperature: float
) -> torch.Tensor:
    """:func:`distill_kl` against a cached top-k teacher: the KL divergence between the
    teacher's and the student's distributions over ``k + 1`` buckets (the teacher's top-k
    tokens, and everything else as one),

        L = T² · mean_tokens [ Σ_{i ∈ K} p_i (log p_i − log q_i) + p_R (log p_R − log q_R) ]

    with ``q = softmax(z_s / T)``, ``p_R = 1 − Σ_K p_i`` and ``q_R = 1 − Σ_K q_i``. It is a
    lower bound of the full KL that tends to it as ``p_R → 0``, and equals it when ``k`` is
    the vocabulary size. Zero when the student matches the teacher."""
    t = float(temperature)
    if abs(teacher.temperature - t) > 1e-9:
        raise ValueError(
            f"the teacher cache holds log-probabilities at temperature {teacher.temperature}, "
            f"not {t}; rebuild it with the recovery config's temperature"
        )
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    index = teacher.index.to(log_q.device).long()
    if index.shape[:-1] != log_q.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match the cached teacher "
            f"{tuple(index.shape)}; the cache was built for other rows"
        )
    log_q_k = log_q.gather(-1, index)
    log_q_rest = log_q.scatter(-1, index, LOG_ZERO).logsumexp(-1)
    log_p = teacher.logp.to(log_q.device).float()
    log_p_rest = teacher.log_rest.to(log_q.device).float()
    kl = (log_p.exp() * (log_p - log_q_k)).sum(-1)
    kl = kl + log_p_rest.exp() * (log_p_rest - log_q_rest.clamp_min(LOG_ZERO))
    return kl.mean() * (t * t)


# ---- what is trained -----------------------------------------------------------------------
@dataclass
class TrainingSession:
    """Trainable state of one recovery run. ``module`` is what the loop calls forward on;
    ``finish()`` folds the trained state back into the plain model (merge LoRA, restore
    ``requires_grad`` flags) and returns it."""

    model: nn.Module
    module: nn.Module
    params: dict[str, nn.Parameter]
    _finish: Callable[[], nn.Module] = field(repr=False)

    def finish(self) -> nn.Module:
        return self._finish()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable tensors (enough to restore the run's best state)."""
        return {n: p.detach().clone() for n, p in self.params.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])


def _requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _set_requires_grad_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))


def requires_grad_flags(model: nn.Module) -> dict[str, bool]:
    """``{parameter name: requires_grad}``, to restore after training."""
    return {n: p.requires_grad for n, p in model.named_parameters()}


def set_requires_grad_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))


@dataclass
class RecoveryResult:
    """What a recovery run did. ``history`` has one row per optimizer step (``step``,
    ``train_loss``, ``lr`` (the learning rate of that update), ``seconds``, ``tokens`` (seen
    so far), and ``eval_loss`` — None between evaluations); step 0 is the evaluation before
    training. ``tokens`` is the number of training tokens seen; ``steps_per_s`` and
    ``tokens_per_s`` are over the whole run (evaluations included)."""

    method: str
    history: list[dict[str, Any]]
    initial_eval_loss: float
    best_eval_loss: float
    best_step: int
    steps: int
    seconds: float
    stop_reason: str
    trainable_params: int
    config: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    steps_per_s: float = 0.0
    tokens_per_s: float = 0.0
    budget: str = "steps"  # the budget the schedule and progress bar count against

    @property
    def improved(self) -> bool:
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: steps, tokens, throughput, why it stopped, the held-out loss kept."""
        return (
            f"{self.method}: {self.steps} steps, {self.tokens:,} tokens in {self.seconds:.0f} s "
            f"({self.steps_per_s:.2f} steps/s, {self.tokens_per_s:.0f} tokens/s; "
            f"{self.budget} budget, stopped by {self.stop_reason}); held-out loss "
            f"{self.initial_eval_loss:.3f} -> {self.best_eval_loss:.3f} "
            f"(kept step {self.best_step})"
        )

    def plot(self, path: str | Path) -> Path:
        """Write the loss curve (train loss per step, held-out loss per evaluation, the kept
        step marked) and below it the learning rate of every update, as a PNG."""
        from prunekit.core.plots import drawing

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        train = [(h["step"], h["train_loss"]) for h in self.history if h["train_loss"] is not None]
        evals = [(h["step"], h["eval_loss"]) for h in self.history if h["eval_loss"] is not None]
        lrs = [(h["step"], h["lr"]) for h in self.history[1:] if h.get("lr") is not None]
        with drawing(path, (7, 5.5), nrows=2, sharex=True, height_ratios=[3, 1.3]) as (_, axes):
            ax, ax_lr = axes
            if train:
                ax.plot(*zip(*train, strict=True), lw=1, alpha=0.7, label="train loss")
            if evals:
                ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
            kept = f"kept (step {self.best_step})"
            ax.axvline(self.best_step, color="grey", ls="--", lw=1, label=kept)
            ax.set_ylabel("loss")
            ax.set_title(
                f"recovery: {self.method} ({self.steps} steps, {self.tokens:,} tokens, "
                f"{self.seconds:.0f} s, {self.stop_reason})"
            )
            ax.legend()
            if lrs:
                ax_lr.plot(*zip(*lrs, strict=True), color="tab:green", lw=1.2)
            ax_lr.set_ylabel("learning rate")
            ax_lr.set_xlabel("optimizer step")
        return path


# ---- data ----------------------------------------------------------------------------------
def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Token ids as ``[n, seq_len]`` rows: a ``[n, seq_len]`` tensor is kept, anything else
    is flattened and cut into consecutive ``seq_len`` chunks (the remainder is dropped)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError("token ids must be an integer torch tensor (e.g. torch.LongTensor)")
    ids = ids.long()
    if ids.dim() == 2 and ids.shape[1] == seq_len:
        return ids
    flat = ids.reshape(-1)
    n = flat.numel() // seq_len
    if n == 0:
        raise ValueError(
            f"{flat.numel()} tokens make no sequence of seq_len={seq_len}; pass more text or a "
            "smaller RecoveryConfig.seq_len"
        )
    return flat[: n * seq_len].reshape(n, seq_len)


def split_data(
    train_ids: torch.Tensor, eval_ids: torch.Tensor | None, config: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out rows (``config``: a ``RecoveryConfig``, read for ``seq_len``,
    ``eval_samples``, ``n_samples``). Without ``eval_ids`` the last ``eval_samples`` rows (at
    most a quarter) of ``train_ids`` are held out and never trained on."""
    rows = pack(train_ids, config.seq_len)
    if eval_ids is None:
        if rows.shape[0] < 2:
            raise ValueError(
                "need at least 2 sequences to hold one out for evaluation; pass more text, a "
                "smaller seq_len, or eval_ids"
            )
        n_eval = min(config.eval_samples, max(1, rows.shape[0] // 4))
        train, held = rows[:-n_eval], rows[-n_eval:]
    else:
        train, held = rows, pack(eval_ids, config.seq_len)[: config.eval_samples]
    return train[: config.n_samples], held


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Learning-rate multiplier before optimizer step ``step`` (0-based): linear warm-up
    ``(step+1)/warmup`` for ``step < warmup``, then cosine decay ``½(1 + cos(π·p))`` where
    ``p ∈ [0, 1]`` is the fraction of the post-warm-up budget already used."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def budget_lr_factor(used: float, warmup: float) -> float:
    """Learning-rate multiplier of an update made when the fraction ``used ∈ [0, 1]`` of the
    binding budget (elapsed/seconds or steps/steps, whichever is larger) is spent: linear
    warm-up ``used/warmup`` over the first ``warmup`` fraction, then cosine decay
    ``½(1 + cos(π·(used − warmup)/(1 − warmup)))`` over the rest. The schedule of a time
    budget: it peaks at ``warmup`` of the budget (plus at most one step) whatever a step
    costs, instead of after a fixed number of steps that may outlast the budget."""
    used = min(max(used, 0.0), 1.0)
    if used < warmup:
        return used / warmup
    p = (used - warmup) / (1.0 - warmup) if warmup < 1 else 1.0
    return 0.5 * (1.0 + math.cos(math.pi * p))


# ---- the loop helpers --------------------------------------------------------------------
def forward_logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(module).__name__} returns no logits; recovery trains causal language "
            "models (load the model with AutoModelForCausalLM)"
        )
    return logits


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = [
    "RecoveryResult",
    "device_of",
    "forward_logits",
    "budget_lr_factor",
    "lr_factor",
    "pack",
    "split_data",
    "TrainingSession",
    "distill_kl",
    "distill_topk_kl",
    "TeacherTopK",
    "lm_loss",
    "requires_grad_flags",
    "set_requires_grad_flags",
]
