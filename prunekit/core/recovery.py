"""Recovery after pruning: LoRA, full fine-tuning, distillation from the dense model, QLoRA.

Every source behind prunekit agrees that pruning beyond small fractions needs healing, in the
order prune → recover → quantize. Gromov et al. 2024 (arXiv 2403.17887) heal with (Q)LoRA on
little data; Minitron (Muralidharan et al. 2024, arXiv 2407.14679) shows that distilling from
the unpruned model recovers more per token than the plain language-model loss.

The training loop (:mod:`prunekit.core.recovery_loop`) is shared by every method: AdamW,
linear warm-up then cosine decay (under a wall-clock budget as fractions of the elapsed
time), gradient accumulation, a step budget and/or a wall-clock budget (whichever ends first),
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

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.contracts import build_config
from prunekit.core.hidden_distill import HiddenDistill, parse_hidden_layers
from prunekit.core.recovery_loop import Run, train
from prunekit.core.training import (
    RecoveryResult,
    TrainingSession,
    device_of,
    distill_kl,
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
    warmup_steps: int | float | None = field(
        default=None,
        metadata=_help(
            "linear warm-up steps (a float in (0, 1) is a fraction of `steps`); None: "
            "`warmup_fraction` of the budget that binds (time when `minutes` is set)"
        ),
    )
    warmup_fraction: float = field(
        default=0.05,
        metadata=_help(
            "with warmup_steps None: warm-up as a fraction of the budget (of the elapsed "
            "time under `minutes`, else of `steps`); the cosine decay spans the rest"
        ),
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
    lora_layers: str = field(
        default="all",
        metadata=_help(
            "'all', or 'near_removed': LoRA only on the layers next to the removed ones "
            "(lora_radius kept layers on each side) and the layers that lost heads/neurons"
        ),
    )
    lora_radius: int = field(
        default=2, metadata=_help("kept layers on each side of a removed one (near_removed)")
    )
    temperature: float = field(default=2.0, metadata=_help("distillation temperature T"))
    alpha_kl: float = field(default=1.0, metadata=_help("weight of the KL term (distill)"))
    alpha_lm: float = field(default=0.0, metadata=_help("weight of the LM loss (distill)"))
    alpha_hidden: float = field(
        default=0.0,
        metadata=_help(
            "weight of the intermediate-state loss (distill, Minitron): relative squared "
            "error between student and teacher decoder-layer outputs; 0: off"
        ),
    )
    hidden_layers: str = field(
        default="last",
        metadata=_help(
            "layers of that loss: 'last', 'all' (every layer both have), or original "
            "layer indices '11,17,23'"
        ),
    )
    distill_topk: int = field(
        default=64,
        metadata=_help(
            "compress caches the dense model's top-k log-probabilities per token on disk "
            "before pruning and distils from them (no teacher copy, no teacher forward per "
            "step); 0: keep a dense copy in memory as the teacher"
        ),
    )
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
        if not 0 <= self.warmup_fraction <= 0.5:
            raise bad("warmup_fraction", "a fraction in [0, 0.5]")
        if w is None:
            pass
        elif isinstance(w, float) and not w.is_integer():
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
        if self.lora_layers not in ("all", "near_removed"):
            raise bad("lora_layers", "'all' or 'near_removed'")
        if not isinstance(self.lora_radius, int) or self.lora_radius < 0:
            raise bad("lora_radius", "an integer >= 0")
        if not self.temperature > 0:
            raise bad("temperature", "a number > 0")
        if self.alpha_kl < 0 or self.alpha_lm < 0 or self.alpha_kl + self.alpha_lm == 0:
            raise bad("alpha_kl", "alpha_kl and alpha_lm must be >= 0 and not both 0")
        if not isinstance(self.alpha_hidden, (int, float)) or self.alpha_hidden < 0:
            raise bad("alpha_hidden", "a number >= 0 (0: no intermediate-state loss)")
        parse_hidden_layers(self.hidden_layers)
        if not isinstance(self.distill_topk, int) or self.distill_topk < 0:
            raise bad("distill_topk", "an integer >= 0 (0: a dense teacher copy in memory)")
        if self.distill_base not in ("lora", "full"):
            raise bad("distill_base", "'lora' or 'full'")
        if self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad("max_grad_norm", "a number > 0, or None")

    @property
    def warmup(self) -> int:
        """Warm-up length in optimizer steps of a step schedule (a fraction is resolved
        against ``steps``; ``None`` is ``warmup_fraction`` of ``steps``; never more than half
        of ``steps``). A time budget with ``warmup_steps=None`` warms up over
        ``warmup_fraction`` of the elapsed time instead (0 here when there is no ``steps``)."""
        w = self.warmup_steps
        if w is None:
            n = round(self.warmup_fraction * self.steps) if self.steps is not None else 0
        else:
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
    chunks); calibration text such as Brown, never the evaluation text. ``teacher``: for
    ``distill`` (ignored otherwise), the dense model, or a
    :class:`~prunekit.core.teacher_cache.TeacherCache` built from it before pruning on the
    same ``train_ids``/``eval_ids``/config (no teacher forward per step). ``eval_ids``:
    held-out ids (default: a held-out tail of ``train_ids``). ``method``: the recovery method
    object, when the caller has resolved it already (default: ``get_method(config.method)``).

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
    cached = teacher is not None and not isinstance(teacher, nn.Module)
    if cached:
        teacher.check(train_rows, eval_rows, config)

    hidden = HiddenDistill.build(model, teacher, config) if teacher is not None else None
    was_training = model.training
    teacher_training = teacher.training if teacher is not None and not cached else False
    if teacher is not None and not cached:
        teacher.eval()
    rng_devices = [device_of(model)] if device_of(model).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)
        session = method.prepare(model, config)
        try:
            run = Run(session, method, teacher, config, hidden)
            result = train(run, train_rows, eval_rows, progress)
        finally:
            session.finish()
            model.train(was_training)
            if teacher is not None and not cached:
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
    if not isinstance(teacher, nn.Module) and not hasattr(teacher, "lookup"):
        raise TypeError(
            f"teacher must be the dense model or a TeacherCache, not {type(teacher).__name__}"
        )
    return teacher


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
