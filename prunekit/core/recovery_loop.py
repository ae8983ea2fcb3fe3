"""The training loop behind :func:`prunekit.core.recovery.recover`: budget, learning-rate
schedule, progress bar, keep-best and early stopping.

With a time budget (``minutes``) and no fixed ``warmup_steps``, the schedule runs on the
fraction of the budget used (:func:`~prunekit.core.training.budget_lr_factor`): each update's
learning rate is computed after its backward pass from the elapsed time, so warm-up ends at
``warmup_fraction`` of the budget and the cosine decay reaches zero as the budget ends,
whatever a step costs on this machine. The progress bar counts seconds against that budget
(its total re-estimated from the measured step time when a step budget would end first).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.core.training import (
    RecoveryResult,
    TrainingSession,
    budget_lr_factor,
    device_of,
    forward_logits,
    lr_factor,
)

#: the loop's clock (a module attribute so tests can run it on a fake clock)
clock = time.perf_counter


@dataclass
class Run:
    """What one training run computes losses with. ``teacher``: ``None``, the dense model
    (one no-grad forward per batch), or a teacher cache (anything with
    ``lookup(split, index, device)``, e.g. :class:`prunekit.core.teacher_cache.TeacherCache`).
    ``hidden``: the intermediate-state pairs
    (:class:`~prunekit.core.hidden_distill.HiddenDistill`) when ``config.alpha_hidden`` > 0:
    their loss, weighted by it, is added to the method's objective."""

    session: TrainingSession
    method: Any
    teacher: Any
    config: Any
    hidden: Any = None

    def teacher_out(
        self, batch: torch.Tensor, split: str, index: torch.Tensor
    ) -> tuple[Any, dict[int, torch.Tensor]]:
        """The teacher's output for the method's objective, and its hidden states of the
        paired layers keyed by original layer index (empty without ``hidden``)."""
        if self.teacher is None:
            return None, {}
        if isinstance(self.teacher, nn.Module):
            batch = batch.to(device_of(self.teacher))
            with torch.no_grad():
                if self.hidden is None:
                    return forward_logits(self.teacher, batch), {}
                return self.hidden.teacher_forward(self.teacher, batch, forward_logits)
        target = self.teacher.lookup(split, index, batch.device)
        return target, getattr(target, "hidden", None) or {}

    def loss(self, batch: torch.Tensor, split: str, index: torch.Tensor) -> torch.Tensor:
        target, teacher_states = self.teacher_out(batch, split, index)
        if self.hidden is None:
            logits = forward_logits(self.session.module, batch)
            return self.method.objective(logits, batch, target, self.config)
        with self.hidden.student_states() as student_states:
            logits = forward_logits(self.session.module, batch)
        loss = self.method.objective(logits, batch, target, self.config)
        return loss + self.config.alpha_hidden * self.hidden.loss(student_states, teacher_states)

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor) -> float:
        module = self.session.module
        module.eval()
        device = device_of(module)
        total, count = 0.0, 0
        for start in range(0, rows.shape[0], self.config.batch_size):
            index = torch.arange(start, min(start + self.config.batch_size, rows.shape[0]))
            batch = rows[index].to(device)
            total += float(self.loss(batch, "eval", index)) * batch.shape[0]
            count += batch.shape[0]
        return total / count

    def accumulate(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """Forward and backward ``grad_accum`` micro-batches; their mean loss and tokens."""
        module = self.session.module
        module.train()
        device = device_of(module)
        train_loss, tokens = 0.0, 0
        for _ in range(self.config.grad_accum):
            index, batch = next(stream)
            loss = self.loss(batch.to(device), "train", index)
            (loss / self.config.grad_accum).backward()
            train_loss += float(loss.detach()) / self.config.grad_accum
            tokens += batch.numel()
        return train_loss, tokens


@dataclass
class Budget:
    """Steps and/or seconds, whichever ends first."""

    steps: int | None
    seconds: float | None
    t0: float = field(default_factory=lambda: clock())

    def elapsed(self) -> float:
        return clock() - self.t0

    def spent(self, step: int) -> str | None:
        """Why training must stop before step ``step`` (``None``: it may go on)."""
        if self.steps is not None and step >= self.steps:
            return "steps"
        if self.seconds is not None and self.elapsed() >= self.seconds:
            return "time"
        return None

    def progress(self, step: int, warmup: int) -> float:
        """Fraction of the post-warm-up budget used (the larger of steps and time)."""
        fractions = []
        if self.steps is not None:
            fractions.append((step - warmup) / max(1, self.steps - warmup))
        if self.seconds is not None:
            fractions.append(self.elapsed() / self.seconds)
        return max(fractions)

    def used(self, step: int) -> float:
        """Fraction of the binding budget used now, ``step`` updates having been made."""
        fractions = [self.elapsed() / self.seconds] if self.seconds is not None else []
        if self.steps is not None:
            fractions.append(step / self.steps)
        return max(fractions)

    def kind(self) -> str:
        return "+".join(k for k, v in (("time", self.seconds), ("steps", self.steps)) if v)


class Schedule:
    """The learning-rate multiplier of each update. A time budget without a fixed
    ``warmup_steps``: warm-up and cosine decay as fractions of the budget used at the update;
    otherwise ``warmup`` steps then cosine decay over the rest of the budget."""

    def __init__(self, config: Any, budget: Budget):
        self.budget = budget
        self.by_budget = budget.seconds is not None and config.warmup_steps is None
        self.warmup_fraction = config.warmup_fraction
        self.warmup_steps = config.warmup

    def factor(self, step: int) -> float:
        """Multiplier of update ``step`` (0-based), called after its backward pass."""
        if self.by_budget:
            return budget_lr_factor(self.budget.used(step), self.warmup_fraction)
        w = self.warmup_steps
        return lr_factor(step, w, self.budget.progress(step, w))


class Bar:
    """tqdm over the budget that binds: seconds under a time budget (total re-estimated
    from the step time when the step budget ends sooner), steps otherwise."""

    def __init__(self, budget: Budget, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.budget = budget
        self.timed = budget.seconds is not None
        total = round(budget.seconds, 1) if self.timed else budget.steps
        unit = "s" if self.timed else "step"
        self.bar = tqdm(total=total, unit=unit, desc=desc, disable=not enabled, leave=False)
        self.first: float | None = None  # elapsed seconds when the first step started

    def start(self) -> None:
        if self.first is None:
            self.first = self.budget.elapsed()

    def update(self, step: int, **postfix: str) -> None:
        if not self.timed:
            self.bar.set_postfix(**postfix, refresh=False)
            self.bar.update(1)
            return
        elapsed = self.budget.elapsed()
        per_step = (elapsed - (self.first or 0.0)) / max(step, 1)
        expected = step + max(self.budget.seconds - elapsed, 0.0) / max(per_step, 1e-9)
        if self.budget.steps is not None and self.budget.steps < expected:
            expected = self.budget.steps
            self.bar.total = round(elapsed + (expected - step) * per_step, 1)
        self.bar.n = round(min(elapsed, self.bar.total), 1)
        self.bar.set_postfix(step=f"{step}/~{math.ceil(expected)}", **postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@dataclass
class Best:
    """Keep-best and early stopping on held-out loss."""

    loss: float
    state: dict[str, torch.Tensor]
    step: int = 0
    bad_evals: int = 0

    def update(self, session: TrainingSession, loss: float, step: int) -> None:
        if loss < self.loss:
            self.loss, self.step, self.state = loss, step, session.snapshot()
            self.bad_evals = 0
        else:
            self.bad_evals += 1


class MasterOptimizer:
    """AdamW whose weights and state are fp32 whatever the model's dtype: a 16-bit trainable
    parameter gets an fp32 master copy, its gradient is cast to fp32 before clipping and
    the update, and the updated master is cast back into the model's parameter (so tiny
    updates accumulate in the master instead of rounding away in bf16). fp32 parameters (LoRA
    adapters, which peft keeps in fp32 on a 16-bit base) are optimised directly."""

    LOW = (torch.float16, torch.bfloat16)

    def __init__(self, params: list[nn.Parameter], config: Any):
        self.params = params
        self.masters = [
            p.detach().float().clone().requires_grad_(True) if p.dtype in self.LOW else p
            for p in params
        ]
        self.config = config
        self.optimizer = torch.optim.AdamW(
            self.masters, lr=config.lr, weight_decay=config.weight_decay
        )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.grad = None

    def step(self, lr: float) -> None:
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.masters, self.config.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if m is not p:
                    p.copy_(m)


def batches(
    rows: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(row indices, rows)`` micro-batches of ``rows`` in shuffled order, epoch after
    epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield index, rows[index]


def train(
    run: Run, train_rows: torch.Tensor, eval_rows: torch.Tensor, progress: bool
) -> RecoveryResult:
    """Train ``run`` on ``train_rows`` within its budget; keep the best held-out state."""
    config = run.config
    params = [p for p in run.session.params.values() if p.requires_grad]
    if not params:
        raise ValueError(f"recovery method {config.method!r} left nothing to train")
    optimizer = MasterOptimizer(params, config)
    stream = batches(train_rows, config.batch_size, config.seed)
    budget = Budget(config.steps, config.minutes * 60 if config.minutes is not None else None)
    schedule = Schedule(config, budget)
    initial = run.evaluate(eval_rows)
    history: list[dict[str, Any]] = [
        dict(step=0, train_loss=None, eval_loss=initial, lr=0.0, seconds=0.0, tokens=0)
    ]
    best = Best(initial, run.session.snapshot())
    step, tokens = 0, 0
    bar = Bar(budget, f"recover[{config.method}]", progress)
    while (stop_reason := budget.spent(step)) is None:
        bar.start()
        optimizer.zero_grad()
        train_loss, n = run.accumulate(stream)
        if not math.isfinite(train_loss):
            stop_reason = "non-finite loss"
            break
        lr = config.lr * schedule.factor(step)
        optimizer.step(lr)
        step, tokens = step + 1, tokens + n
        row = dict(step=step, train_loss=train_loss, eval_loss=None, lr=lr, tokens=tokens)
        history.append({**row, "seconds": budget.elapsed()})
        postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2g}"}
        if step % config.eval_every == 0 or budget.spent(step) is not None:
            history[-1]["eval_loss"] = run.evaluate(eval_rows)
            history[-1]["seconds"] = budget.elapsed()
            best.update(run.session, history[-1]["eval_loss"], step)
            postfix["eval"] = f"{history[-1]['eval_loss']:.3f}"
            if config.patience is not None and best.bad_evals >= config.patience:
                stop_reason = "early stopping"
                bar.update(step, **postfix)
                break
        bar.update(step, **postfix)
    bar.close()

    run.session.restore(best.state)  # keep-best: also undoes a last step that made things worse
    seconds = budget.elapsed()
    return RecoveryResult(
        method=config.method,
        history=history,
        initial_eval_loss=initial,
        best_eval_loss=best.loss,
        best_step=best.step,
        steps=step,
        seconds=seconds,
        stop_reason=stop_reason,
        trainable_params=sum(p.numel() for p in params),
        config=config.to_dict(),
        tokens=tokens,
        steps_per_s=step / seconds if seconds > 0 else 0.0,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        budget=budget.kind(),
    )
