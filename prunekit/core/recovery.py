"""Recovery after pruning: LoRA, full fine-tuning, distillation from the dense model, QLoRA.

Every source behind prunekit agrees that pruning beyond small fractions needs healing, in the
order prune → recover → quantize. Gromov et al. 2024 (arXiv 2403.17887) heal with (Q)LoRA on
little data; Minitron (Muralidharan et al. 2024, arXiv 2407.14679) shows that distilling from
the unpruned model recovers more per token than the plain language-model loss.

The training loop is shared by every method: AdamW, linear warm-up then cosine decay,
gradient accumulation, a step budget and/or a wall-clock budget (whichever ends first),
periodic held-out loss, early stopping, and keep-best (the model never ends worse than it
started on held-out loss). The methods are plugins (:mod:`prunekit.recoveries`, registered
through the ``register_recoveries`` hook); this module imports none of them::

    from prunekit import get_plugins
    get_plugins().recoveries.names()   # ['distill', 'full', 'lora', 'qlora']

    from prunekit.core.recovery import RecoveryConfig, recover
    result = recover(pruned, train_ids, RecoveryConfig(method="distill"), teacher=dense)
    result.plot("loss.png")
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.contracts import build_config
from prunekit.core.training import (
    RecoveryResult,
    TrainingSession,
    device_of,
    distill_kl,
    forward_logits,
    lm_loss,
    lr_factor,
    pack,
    split_data,
)
from prunekit.errors import PluginUnavailableError
from prunekit.plugins import get_adapter, get_plugins


class RecoveryUnavailableError(PluginUnavailableError):
    """A recovery method cannot run here (missing package or hardware)."""

    def __init__(self, method: str, requirements: str):
        self.method = method
        self.requirements = requirements
        super().__init__("recovery method", method, requirements)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RecoveryConfig:
    """How to recover a pruned model. Round-trips through :meth:`to_dict` /
    :meth:`from_dict` (the recipe's ``recovery`` section)."""

    method: str = field(default="lora", metadata=_help("lora | full | distill | qlora"))
    steps: int | None = field(
        default=200, metadata=_help("optimizer steps (None: only the time budget)")
    )
    minutes: float | None = field(
        default=None, metadata=_help("wall-clock budget; training stops at whichever ends first")
    )
    lr: float = field(default=1e-4, metadata=_help("peak AdamW learning rate"))
    warmup_steps: int | float = field(
        default=20,
        metadata=_help("linear warm-up steps (a float in (0, 1) is a fraction of `steps`)"),
    )
    batch_size: int = field(default=4, metadata=_help("sequences per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    seq_len: int = field(default=256, metadata=_help("tokens per packed training sequence"))
    n_samples: int = field(default=256, metadata=_help("training sequences used (at most)"))
    eval_every: int = field(default=25, metadata=_help("optimizer steps between held-out evals"))
    eval_samples: int = field(default=16, metadata=_help("held-out sequences per evaluation"))
    patience: int | None = field(
        default=4, metadata=_help("evals without improvement before stopping (None: never)")
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank r"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scale α (update is α/r · B·A)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input"))
    temperature: float = field(default=2.0, metadata=_help("distillation temperature T"))
    alpha_kl: float = field(default=1.0, metadata=_help("weight of the KL term (distill)"))
    alpha_lm: float = field(default=0.0, metadata=_help("weight of the LM loss (distill)"))
    distill_base: str = field(
        default="lora", metadata=_help("what distill trains: 'lora' adapters or 'full' weights")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    max_grad_norm: float | None = field(
        default=1.0, metadata=_help("gradient-norm clipping (None: no clipping)")
    )
    seed: int = field(default=0, metadata=_help("seed of LoRA init and batch order"))

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(
                f"RecoveryConfig.{name} = {getattr(self, name)!r} is invalid: {allowed}"
            )

        if not isinstance(self.method, str) or not self.method:
            raise bad("method", "a registered recovery method name, e.g. 'lora'")
        if self.steps is None and self.minutes is None:
            raise bad("steps", "set steps and/or minutes (at least one budget is needed)")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise bad("steps", "an integer >= 1, or None with minutes set")
        if self.minutes is not None and not self.minutes > 0:
            raise bad("minutes", "a number > 0, or None")
        if not self.lr > 0:
            raise bad("lr", "a number > 0")
        w = self.warmup_steps
        if isinstance(w, float) and not w.is_integer():
            if not 0 < w < 1:
                raise bad("warmup_steps", "an integer >= 0 or a fraction in (0, 1)")
            if self.steps is None:
                raise bad("warmup_steps", "a fraction needs `steps`; give an integer count")
        elif w < 0:
            raise bad("warmup_steps", "an integer >= 0 or a fraction in (0, 1)")
        for name in ("batch_size", "grad_accum", "seq_len", "n_samples", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.seq_len < 2:
            raise bad("seq_len", "an integer >= 2 (a next-token loss needs two tokens)")
        if not isinstance(self.eval_samples, int) or self.eval_samples < 1:
            raise bad("eval_samples", "an integer >= 1")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise bad("patience", "an integer >= 1, or None to never stop early")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise bad("lora_r", "an integer >= 1")
        if not self.lora_alpha > 0:
            raise bad("lora_alpha", "a number > 0")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        if not self.temperature > 0:
            raise bad("temperature", "a number > 0")
        if self.alpha_kl < 0 or self.alpha_lm < 0 or self.alpha_kl + self.alpha_lm == 0:
            raise bad("alpha_kl", "alpha_kl and alpha_lm must be >= 0 and not both 0")
        if self.distill_base not in ("lora", "full"):
            raise bad("distill_base", "'lora' or 'full'")
        if self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "a number > 0, or None")

    @property
    def warmup(self) -> int:
        """Warm-up length in optimizer steps (a fraction is resolved against ``steps``; never
        more than half of ``steps``)."""
        w = self.warmup_steps
        n = round(w * self.steps) if isinstance(w, float) and w < 1 else int(w)
        return min(n, self.steps // 2) if self.steps is not None else n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown recovery option(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(known))}"
            )
        return cls(**data)


class RecoveryMethod:
    """Base class of recovery methods (third parties may duck-type instead; see
    :mod:`prunekit.core.training` for the contract). Its config is the shared
    :class:`RecoveryConfig`; set ``config_class`` to a subclass to add fields."""

    name: ClassVar[str]
    config_class: ClassVar[type] = RecoveryConfig
    description: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = False

    def available(self) -> tuple[bool, str]:
        return True, ""

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        raise NotImplementedError

    def objective(
        self,
        student_logits: torch.Tensor,
        input_ids: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        config: Any,
    ) -> torch.Tensor:
        return lm_loss(student_logits, input_ids)

    def __repr__(self) -> str:
        return f"<recovery {self.name}>"


def recovery_config(
    method: Any, options: dict[str, Any] | None = None, *, section: str = "recovery.options"
) -> RecoveryConfig:
    """``method``'s validated config from generic options (the recipe's
    ``recovery.options`` / ``--recover-opt key=value``; CLI strings are coerced to the field
    types); ``method`` is set to the plugin's name."""
    options = dict(options or {})
    if options.setdefault("method", method.name) != method.name:
        raise ValueError(
            f"{section}: method {options['method']!r} differs from the recovery method "
            f"{method.name!r}"
        )
    return build_config(method, options, section=section)


# ---- the loop ------------------------------------------------------------------------------
def get_method(name: str) -> Any:
    """The registered recovery method called ``name`` (the edge where a name becomes an
    object; an unknown name raises an error listing the valid ones)."""
    return get_plugins().recoveries.get(name)


def recover(
    model: nn.Module,
    train_ids: torch.Tensor,
    config: RecoveryConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    eval_ids: torch.Tensor | None = None,
    progress: bool = True,
    method: Any = None,
) -> RecoveryResult:
    """Recover a pruned causal LM in place and return what happened.

    ``train_ids``: token ids (``[n, seq_len]`` rows or any tensor, packed into ``seq_len``
    chunks); calibration text such as Brown, never the evaluation text. ``teacher``: the dense
    model, required by ``distill`` (ignored otherwise). ``eval_ids``: held-out ids (default:
    a held-out tail of ``train_ids``). ``method``: the recovery method object, when the caller
    has resolved it already (default: ``get_method(config.method)``).

    The model ends in its best held-out state: if no evaluation beats the initial held-out
    loss, the initial weights are restored. LoRA adapters are merged, so the model has no
    adapter modules and keeps its pruned shapes.
    """
    config = config or RecoveryConfig()
    method = _check_method(method or get_method(config.method), config)
    teacher = _check_teacher(method, model, teacher)
    adapter = get_adapter(model)  # fails early on unsupported architectures
    if not adapter.causal:
        raise ValueError(
            f"recovery trains causal language models; {adapter.name!r} is an encoder "
            "(judge pruned encoders by embedding similarity instead)"
        )
    train_rows, eval_rows = split_data(train_ids, eval_ids, config)

    was_training = model.training
    teacher_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    rng_devices = [device_of(model)] if device_of(model).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        session = method.prepare(model, config)
        try:
            run = _Run(session, method, teacher, config)
            result = _train(run, train_rows, eval_rows, progress)
        finally:
            session.finish()
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_training)
    return result


def _check_method(method: Any, config: RecoveryConfig) -> Any:
    if method.name != config.method:
        raise ValueError(
            f"RecoveryConfig.method is {config.method!r} but the method passed is {method.name!r}"
        )
    ok, why = method.available()
    if not ok:
        raise RecoveryUnavailableError(method.name, why)
    return method


def _check_teacher(method: Any, model: nn.Module, teacher: nn.Module | None) -> nn.Module | None:
    if not getattr(method, "uses_teacher", False):
        return None
    if teacher is None:
        raise ValueError(
            f"recovery method {method.name!r} needs teacher=<the dense model the student "
            "was pruned from>"
        )
    if teacher is model:
        raise ValueError("teacher is the student itself; pass a separate copy of the dense model")
    return teacher


# ---- the loop ------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one training run computes losses with."""

    session: TrainingSession
    method: Any
    teacher: nn.Module | None
    config: RecoveryConfig

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = forward_logits(self.teacher, batch.to(device_of(self.teacher)))
        logits = forward_logits(self.session.module, batch)
        return self.method.objective(logits, batch, t_logits, self.config)

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor) -> float:
        module = self.session.module
        module.eval()
        device = device_of(module)
        total, count = 0.0, 0
        for start in range(0, rows.shape[0], self.config.batch_size):
            batch = rows[start : start + self.config.batch_size].to(device)
            total += float(self.loss(batch)) * batch.shape[0]
            count += batch.shape[0]
        return total / count

    def accumulate(self, stream: Iterator[torch.Tensor]) -> float:
        """Forward and backward ``grad_accum`` micro-batches; their mean loss."""
        module = self.session.module
        module.train()
        device = device_of(module)
        train_loss = 0.0
        for _ in range(self.config.grad_accum):
            loss = self.loss(next(stream).to(device))
            (loss / self.config.grad_accum).backward()
            train_loss += float(loss.detach()) / self.config.grad_accum
        return train_loss


@dataclass
class _Budget:
    """Steps and/or seconds, whichever ends first."""

    steps: int | None
    seconds: float | None
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

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


@dataclass
class _Best:
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


def _batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled micro-batches of ``rows``, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            yield rows[order[start : start + batch_size]]


def _train(
    run: _Run, train_rows: torch.Tensor, eval_rows: torch.Tensor, progress: bool
) -> RecoveryResult:
    from tqdm.auto import tqdm

    config = run.config
    params = [p for p in run.session.params.values() if p.requires_grad]
    if not params:
        raise ValueError(f"recovery method {config.method!r} left nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stream = _batches(train_rows, config.batch_size, config.seed)
    budget = _Budget(config.steps, config.minutes * 60 if config.minutes is not None else None)
    warmup = config.warmup
    initial = run.evaluate(eval_rows)
    history: list[dict[str, Any]] = [
        dict(step=0, train_loss=None, eval_loss=initial, lr=0.0, seconds=0.0)
    ]
    best = _Best(initial, run.session.snapshot())
    step = 0
    bar = tqdm(
        total=config.steps, disable=not progress, desc=f"recover[{config.method}]", leave=False
    )
    while (stop_reason := budget.spent(step)) is None:
        lr = config.lr * lr_factor(step, warmup, budget.progress(step, warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        train_loss = run.accumulate(stream)
        if not math.isfinite(train_loss):
            stop_reason = "non-finite loss"
            break
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        step += 1
        row = dict(
            step=step, train_loss=train_loss, eval_loss=None, lr=lr, seconds=budget.elapsed()
        )
        history.append(row)
        postfix = {"loss": f"{train_loss:.3f}"}
        if step % config.eval_every == 0 or budget.spent(step) is not None:
            row["eval_loss"] = run.evaluate(eval_rows)
            row["seconds"] = budget.elapsed()
            best.update(run.session, row["eval_loss"], step)
            bar.set_postfix(**postfix, eval=f"{row['eval_loss']:.3f}")
            if config.patience is not None and best.bad_evals >= config.patience:
                stop_reason = "early stopping"
                break
        else:
            bar.set_postfix(**postfix)
        bar.update(1)
    bar.close()

    run.session.restore(best.state)  # keep-best: also undoes a last step that made things worse
    return RecoveryResult(
        method=config.method,
        history=history,
        initial_eval_loss=initial,
        best_eval_loss=best.loss,
        best_step=best.step,
        steps=step,
        seconds=budget.elapsed(),
        stop_reason=stop_reason,
        trainable_params=sum(p.numel() for p in params),
        config=config.to_dict(),
    )


__all__ = [
    "RecoveryConfig",
    "RecoveryMethod",
    "RecoveryResult",
    "RecoveryUnavailableError",
    "distill_kl",
    "get_method",
    "lm_loss",
    "lr_factor",
    "pack",
    "recover",
    "recovery_config",
    "split_data",
]
