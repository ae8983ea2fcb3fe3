"""Recovery after pruning: LoRA, full fine-tuning, distillation from the dense model, QLoRA.

Every source behind prunekit agrees that pruning beyond small fractions needs healing, in the
order prune → recover → quantize. Gromov et al. 2024 (arXiv 2403.17887) heal with (Q)LoRA on
little data; Minitron (Muralidharan et al. 2024, arXiv 2407.14679) shows that distilling from
the unpruned model recovers more per token than the plain language-model loss.

The training loop is shared by every method: AdamW, linear warm-up then cosine decay,
gradient accumulation, a step budget and/or a wall-clock budget (whichever ends first),
periodic held-out loss, early stopping, and keep-best (the model never ends worse than it
started on held-out loss). Methods register through the ``register_recoveries`` hook::

    from prunekit import get_plugins
    get_plugins().recoveries.names()   # ['distill', 'full', 'lora', 'qlora']

    from prunekit.core.recovery import RecoveryConfig, recover
    result = recover(pruned, train_ids, RecoveryConfig(method="distill"), teacher=dense)
    result.plot("loss.png")
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.recovery_methods import (
    BUILTIN_METHODS,
    TrainingSession,
    distill_kl,
    has_lora_modules,
    lm_loss,
)
from prunekit.errors import PrunekitError
from prunekit.hookspecs import hookimpl


class RecoveryUnavailableError(PrunekitError, RuntimeError):
    """A recovery method cannot run here (missing package or hardware)."""

    def __init__(self, method: str, requirements: str):
        self.method = method
        self.requirements = requirements
        super().__init__(
            f"recovery method {method!r} is not available on this machine: {requirements}"
        )


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


@dataclass
class RecoveryResult:
    """What a recovery run did. ``history`` has one row per optimizer step (``step``,
    ``train_loss``, ``lr``, ``seconds``, and ``eval_loss`` — None between evaluations); step 0
    is the evaluation before training."""

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

    @property
    def improved(self) -> bool:
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, path: str | Path) -> Path:
        """Write the loss curve (train loss per step, held-out loss per evaluation, the kept
        step marked) as a PNG."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        train = [(h["step"], h["train_loss"]) for h in self.history if h["train_loss"] is not None]
        evals = [(h["step"], h["eval_loss"]) for h in self.history if h["eval_loss"] is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), lw=1, alpha=0.7, label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss")
        kept = f"kept (step {self.best_step})"
        ax.axvline(self.best_step, color="grey", ls="--", lw=1, label=kept)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(
            f"recovery: {self.method} ({self.steps} steps, {self.seconds:.0f} s, "
            f"{self.stop_reason})"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
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
    train_ids: torch.Tensor, eval_ids: torch.Tensor | None, config: RecoveryConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out rows. Without ``eval_ids`` the last ``eval_samples`` rows (at
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


# ---- the loop ------------------------------------------------------------------------------
def _forward_logits(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=ids, use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(module).__name__} returns no logits; recovery trains causal language "
            "models (load the model with AutoModelForCausalLM)"
        )
    return logits


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def get_method(name: str) -> Any:
    """The registered recovery method called ``name`` (error lists the valid names)."""
    from prunekit.plugins import get_plugins

    return get_plugins().recoveries.get(name)


def recover(
    model: nn.Module,
    train_ids: torch.Tensor,
    config: RecoveryConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    eval_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Recover a pruned causal LM in place and return what happened.

    ``train_ids``: token ids (``[n, seq_len]`` rows or any tensor, packed into ``seq_len``
    chunks); calibration text such as Brown, never the evaluation text. ``teacher``: the dense
    model, required by ``distill`` (ignored otherwise). ``eval_ids``: held-out ids (default:
    a held-out tail of ``train_ids``).

    The model ends in its best held-out state: if no evaluation beats the initial held-out
    loss, the initial weights are restored. LoRA adapters are merged, so the model has no
    adapter modules and keeps its pruned shapes.
    """
    config = config or RecoveryConfig()
    method = get_method(config.method)
    if not method.available():
        raise RecoveryUnavailableError(config.method, getattr(method, "requirements", ""))
    if getattr(method, "uses_teacher", False):
        if teacher is None:
            raise ValueError(
                f"recovery method {config.method!r} needs teacher=<the dense model the student "
                "was pruned from>"
            )
        if teacher is model:
            raise ValueError(
                "teacher is the student itself; pass a separate copy of the dense model"
            )
    else:
        teacher = None
    from prunekit.plugins import get_adapter

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
    rng_devices = [_device(model)] if _device(model).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        session = method.prepare(model, config)
        try:
            result = _train(session, method, teacher, train_rows, eval_rows, config, progress)
        finally:
            session.finish()
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_training)
    return result


@torch.no_grad()
def _evaluate(session, method, teacher, rows, config) -> float:
    module = session.module
    module.eval()
    device = _device(module)
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], config.batch_size):
        batch = rows[start : start + config.batch_size].to(device)
        t_logits = _teacher_logits(teacher, batch)
        loss = method.objective(_forward_logits(module, batch), batch, t_logits, config)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    return total / count


def _teacher_logits(teacher: nn.Module | None, batch: torch.Tensor) -> torch.Tensor | None:
    if teacher is None:
        return None
    with torch.no_grad():
        return _forward_logits(teacher, batch.to(_device(teacher)))


def _train(
    session: TrainingSession,
    method: Any,
    teacher: nn.Module | None,
    train_rows: torch.Tensor,
    eval_rows: torch.Tensor,
    config: RecoveryConfig,
    progress: bool,
) -> RecoveryResult:
    from tqdm.auto import tqdm

    params = [p for p in session.params.values() if p.requires_grad]
    if not params:
        raise ValueError(f"recovery method {config.method!r} left nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    device = _device(session.module)
    budget_s = config.minutes * 60 if config.minutes is not None else None
    warmup = config.warmup

    def batches():
        while True:
            order = torch.randperm(train_rows.shape[0], generator=generator)
            for start in range(0, len(order), config.batch_size):
                yield train_rows[order[start : start + config.batch_size]]

    stream = batches()
    t0 = time.perf_counter()
    initial = _evaluate(session, method, teacher, eval_rows, config)
    history: list[dict[str, Any]] = [
        dict(step=0, train_loss=None, eval_loss=initial, lr=0.0, seconds=0.0)
    ]
    best, best_step, best_state = initial, 0, session.snapshot()
    bad_evals, step, stop_reason = 0, 0, "steps"
    bar = tqdm(
        total=config.steps, disable=not progress, desc=f"recover[{config.method}]", leave=False
    )
    while True:
        elapsed = time.perf_counter() - t0
        if config.steps is not None and step >= config.steps:
            stop_reason = "steps"
            break
        if budget_s is not None and elapsed >= budget_s:
            stop_reason = "time"
            break
        fractions = []
        if config.steps is not None:
            fractions.append((step - warmup) / max(1, config.steps - warmup))
        if budget_s is not None:
            fractions.append(elapsed / budget_s)
        lr = config.lr * lr_factor(step, warmup, max(fractions))
        for group in optimizer.param_groups:
            group["lr"] = lr

        session.module.train()
        optimizer.zero_grad(set_to_none=True)
        train_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(stream).to(device)
            t_logits = _teacher_logits(teacher, batch)
            loss = method.objective(_forward_logits(session.module, batch), batch, t_logits, config)
            (loss / config.grad_accum).backward()
            train_loss += float(loss.detach()) / config.grad_accum
        if not math.isfinite(train_loss):
            stop_reason = "non-finite loss"
            break
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        step += 1

        row = dict(
            step=step,
            train_loss=train_loss,
            eval_loss=None,
            lr=lr,
            seconds=time.perf_counter() - t0,
        )
        history.append(row)
        out_of_budget = (config.steps is not None and step >= config.steps) or (
            budget_s is not None and time.perf_counter() - t0 >= budget_s
        )
        if step % config.eval_every == 0 or out_of_budget:
            row["eval_loss"] = _evaluate(session, method, teacher, eval_rows, config)
            row["seconds"] = time.perf_counter() - t0
            if row["eval_loss"] < best:
                best, best_step, best_state = row["eval_loss"], step, session.snapshot()
                bad_evals = 0
            else:
                bad_evals += 1
            bar.set_postfix(loss=f"{train_loss:.3f}", eval=f"{row['eval_loss']:.3f}")
            if config.patience is not None and bad_evals >= config.patience:
                stop_reason = "early stopping"
                break
        else:
            bar.set_postfix(loss=f"{train_loss:.3f}")
        bar.update(1)
    bar.close()

    session.restore(best_state)  # keep-best: also undoes a last step that made things worse
    return RecoveryResult(
        method=config.method,
        history=history,
        initial_eval_loss=initial,
        best_eval_loss=best,
        best_step=best_step,
        steps=step,
        seconds=time.perf_counter() - t0,
        stop_reason=stop_reason,
        trainable_params=sum(p.numel() for p in params),
        config=config.to_dict(),
    )


@hookimpl
def register_recoveries(register) -> None:
    """The built-in recovery methods: lora, full, distill, qlora."""
    for cls in BUILTIN_METHODS:
        register(cls())


__all__ = [
    "RecoveryConfig",
    "RecoveryResult",
    "RecoveryUnavailableError",
    "distill_kl",
    "get_method",
    "has_lora_modules",
    "lm_loss",
    "lr_factor",
    "pack",
    "recover",
    "split_data",
]
