"""Recovery methods: what is trained (LoRA adapters, all weights, 4-bit-base LoRA) and with
which objective (language-model loss, or distillation from the dense teacher).

A method is any object with

* ``name`` (registry key), ``description``, ``uses_teacher`` (bool);
* ``available() -> bool`` and ``requirements`` (what to install / which hardware, shown when
  ``available()`` is false);
* ``prepare(model, config) -> TrainingSession``: make the trainable parameters;
  ``session.finish()`` folds them back so the model is a plain (pruned) model again;
* ``objective(student_logits, input_ids, teacher_logits, config) -> Tensor``: the loss.

They are registered through the ``register_recoveries`` hook (see
:mod:`prunekit.core.recovery`), so third-party packages can add their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.plugins import get_adapter


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


def lora_target_names(model: nn.Module) -> list[str]:
    """Full module names of the projections LoRA adapts, found through the architecture
    adapter (query/key/value, head output, MLP input and output projections of every layer;
    no name-sniffing). Only ``nn.Linear`` modules are returned."""
    adapter = get_adapter(model)
    wanted: dict[int, nn.Module] = {}
    for layer in adapter.layers(model):
        mods = [
            *adapter.qkv_projections(layer),
            adapter.head_output_projection(layer),
            *adapter.mlp_input_projections(layer),
            adapter.neuron_output_projection(layer),
        ]
        for m in mods:
            wanted[id(m)] = m
    names = [n for n, m in model.named_modules() if id(m) in wanted and isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"found no nn.Linear projections to adapt in {type(model).__name__} through the "
            f"{adapter.name!r} adapter; use method='full' for this architecture"
        )
    return names


def attach_lora(model: nn.Module, r: int, alpha: int, dropout: float = 0.0) -> nn.Module:
    """Wrap ``model``'s attention and MLP projections with peft LoRA adapters (in place) and
    return the ``PeftModel``; only the adapter weights require gradients. Undo with
    :func:`merge_lora`."""
    import peft

    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_names(model),
        bias="none",
    )
    return peft.get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the LoRA deltas ``W ← W + (α/r)·B·A`` into the base weights and remove every
    adapter module; returns the base model (the same object that was wrapped)."""
    return peft_model.merge_and_unload()


def has_lora_modules(model: nn.Module) -> bool:
    """Whether any peft tuner layer is left in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


class RecoveryMethod:
    """Base class of the built-in methods (third parties may duck-type instead)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = False
    requirements: ClassVar[str] = ""

    def available(self) -> bool:
        return True

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


class LoraRecovery(RecoveryMethod):
    """Low-rank adaptation (Hu et al. 2021, arXiv 2106.09685): ``W x + (α/r)·B A x`` with
    ``A ∈ R^{r×in}``, ``B ∈ R^{out×r}`` (``B = 0`` at start, so training starts exactly at the
    pruned model) on every attention and MLP projection; merged into ``W`` at the end, so the
    result has no adapter and keeps its pruned shapes. Gromov et al. 2024 heal pruned layers
    this way."""

    name = "lora"
    description = "LoRA on attention and MLP projections, merged into the weights at the end"

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        flags = _requires_grad_flags(model)
        wrapped = attach_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout)
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}

        def finish() -> nn.Module:
            merged = merge_lora(wrapped)
            _set_requires_grad_flags(merged, flags)
            return merged

        return TrainingSession(model=model, module=wrapped, params=params, _finish=finish)


class FullRecovery(RecoveryMethod):
    """Full fine-tuning: every parameter (tied embeddings stay tied: they are one tensor)."""

    name = "full"
    description = "fine-tune all weights"

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        flags = _requires_grad_flags(model)
        for p in model.parameters():
            p.requires_grad_(True)
        params = dict(model.named_parameters())

        def finish() -> nn.Module:
            _set_requires_grad_flags(model, flags)
            return model

        return TrainingSession(model=model, module=model, params=params, _finish=finish)


class DistillRecovery(RecoveryMethod):
    """Distillation from the dense teacher (Minitron, Muralidharan et al. 2024): the student
    minimises ``α_kl · T²·KL(p_teacher^T ‖ p_student^T) + α_lm · CE`` on the same batches the
    teacher sees. ``distill_base`` picks what is trained: LoRA adapters (merged at the end) or
    all weights."""

    name = "distill"
    description = "KL to the dense teacher's logits (temperature T, T² scaling) + optional LM loss"
    uses_teacher = True

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        base = LoraRecovery() if config.distill_base == "lora" else FullRecovery()
        return base.prepare(model, config)

    def objective(self, student_logits, input_ids, teacher_logits, config) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("distill needs teacher logits; pass teacher=<dense model>")
        loss = config.alpha_kl * distill_kl(student_logits, teacher_logits, config.temperature)
        if config.alpha_lm:
            loss = loss + config.alpha_lm * lm_loss(student_logits, input_ids)
        return loss


class QloraRecovery(RecoveryMethod):
    """QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LoRA adapters trained on top of an NF4
    4-bit copy of the frozen projections (bitsandbytes, CUDA). At the end the adapter deltas
    ``(α/r)·B·A`` are added to the *original full-precision* weights (not re-quantized) and
    the original modules are put back, so the result is a plain pruned model like ``lora``'s.
    Gromov et al. 2024 heal pruned models this way."""

    name = "qlora"
    description = "LoRA on a 4-bit NF4 base (bitsandbytes + CUDA), merged into full precision"
    requirements = (
        "qlora needs the `bitsandbytes` package (pip install bitsandbytes) and a CUDA GPU "
        "(torch.cuda.is_available() is true); on a CPU use method='lora' instead, which trains "
        "the same adapters on the full-precision base"
    )

    def available(self) -> bool:
        return importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available()

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:  # pragma: no cover
        import bitsandbytes as bnb
        import peft

        flags = _requires_grad_flags(model)
        home = next(model.parameters()).device
        cuda = torch.device("cuda")
        names = lora_target_names(model)
        originals: dict[str, nn.Linear] = {}
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin: nn.Linear = getattr(parent, attr)
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=lin.bias is not None,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.detach().to("cpu").clone(), requires_grad=False, quant_type="nf4"
            )
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            originals[name] = lin
            setattr(parent, attr, q)
        model.to(cuda)  # quantizes the Params4bit on the way
        had_flag = "is_loaded_in_4bit" in model.__dict__
        model.is_loaded_in_4bit = True  # makes peft dispatch its bnb 4-bit LoRA layer
        lora_config = peft.LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=names,
            bias="none",
        )
        wrapped = peft.get_peft_model(model, lora_config)
        params = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}

        def finish() -> nn.Module:
            with torch.no_grad():
                for name, lin in originals.items():
                    parent_name, _, attr = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    lora_layer = getattr(parent, attr)
                    delta = lora_layer.get_delta_weight("default")
                    lin.weight.add_(delta.to(device=lin.weight.device, dtype=lin.weight.dtype))
                    setattr(parent, attr, lin)
            model.to(home)
            if not had_flag:
                del model.is_loaded_in_4bit
            _set_requires_grad_flags(model, flags)
            return model

        return TrainingSession(model=model, module=wrapped, params=params, _finish=finish)


BUILTIN_METHODS: tuple[type[RecoveryMethod], ...] = (
    LoraRecovery,
    FullRecovery,
    DistillRecovery,
    QloraRecovery,
)

__all__ = [
    "BUILTIN_METHODS",
    "DistillRecovery",
    "FullRecovery",
    "LoraRecovery",
    "QloraRecovery",
    "RecoveryMethod",
    "TrainingSession",
    "attach_lora",
    "distill_kl",
    "has_lora_modules",
    "lm_loss",
    "lora_target_names",
    "merge_lora",
]
