"""Full fine-tuning and distillation from the dense teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.core.recovery import RecoveryMethod
from prunekit.core.training import (
    TeacherTopK,
    TrainingSession,
    distill_kl,
    distill_topk_kl,
    lm_loss,
    requires_grad_flags,
    set_requires_grad_flags,
)
from prunekit.recoveries.lora import LoraRecovery


class FullRecovery(RecoveryMethod):
    """Full fine-tuning: every parameter (tied embeddings stay tied: they are one tensor)."""

    name = "full"
    description = "fine-tune all weights"

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        flags = requires_grad_flags(model)
        for p in model.parameters():
            p.requires_grad_(True)
        params = dict(model.named_parameters())

        def finish() -> nn.Module:
            set_requires_grad_flags(model, flags)
            return model

        return TrainingSession(model=model, module=model, params=params, _finish=finish)


class DistillRecovery(RecoveryMethod):
    """Distillation from the dense teacher (Minitron, Muralidharan et al. 2024): the student
    minimises ``α_kl · T²·KL(p_teacher^T ‖ p_student^T) + α_lm · CE`` on the same batches the
    teacher sees. The teacher is the dense model, or its top-k log-probabilities cached
    before pruning (:mod:`prunekit.core.teacher_cache`; the KL over the top-k tokens and one
    bucket for the rest). ``distill_base`` picks what is trained: LoRA adapters (merged at the
    end) or all weights."""

    name = "distill"
    description = "KL to the dense teacher's logits (temperature T, T² scaling) + optional LM loss"
    uses_teacher = True

    def prepare(self, model: nn.Module, config: Any) -> TrainingSession:
        base = LoraRecovery() if config.distill_base == "lora" else FullRecovery()
        return base.prepare(model, config)

    def objective(self, student_logits, input_ids, teacher_logits, config) -> torch.Tensor:
        if teacher_logits is None:
            raise ValueError("distill needs teacher logits; pass teacher=<dense model>")
        if isinstance(teacher_logits, TeacherTopK):  # from a TeacherCache
            kl = distill_topk_kl(student_logits, teacher_logits, config.temperature)
        else:
            kl = distill_kl(student_logits, teacher_logits, config.temperature)
        loss = config.alpha_kl * kl
        if config.alpha_lm:
            loss = loss + config.alpha_lm * lm_loss(student_logits, input_ids)
        return loss
