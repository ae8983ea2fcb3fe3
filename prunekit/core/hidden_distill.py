"""Intermediate-state distillation: the student's decoder-layer outputs pulled towards the
dense teacher's, beside the KL on the logits.

Minitron (Muralidharan et al. 2024, arXiv 2407.14679, sec. 3.3) adds to the logit loss a loss
on intermediate hidden states, ``L = L_logits + α · Σ_k loss(h_t^k, h_s^k)``, and finds it
helps most after depth pruning, where the layers next to the removed ones must learn to
produce what the removed block produced. prunekit never prunes the embedding (hidden) width,
so teacher and student states have the same size and no projection is learnt; the pairs are
found by **original layer index**: a student layer is paired with the teacher layer it was
before pruning (:func:`layer_origins` replays ``model.prunekit_plans``), and a teacher layer
that was removed has no partner.

``RecoveryConfig.hidden_layers`` picks the pairs: ``"last"`` (the last decoder layer of each
model, which feed the same final norm and head, even if the teacher's last layer was
removed), ``"all"`` (every layer both models have), or original indices ``"11,17,23"``. The
loss of one pair is the relative squared error per token, averaged over tokens,

    loss(h_t, h_s) = mean_tokens ‖h_s − h_t‖² / ‖h_t‖²

(scale-free, so layers with large activations do not drown the others, and one token with a
massive activation does not drown the rest of its row); the pairs' losses are averaged and
weighted by ``RecoveryConfig.alpha_hidden`` (0: off). A
:class:`~prunekit.core.teacher_cache.TeacherCache` built with ``alpha_hidden > 0`` stores
the teacher's states of the chosen layers (fp16, ``rows × seq × hidden`` each), so the
teacher still never runs during training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunekit.core.surgery import applied_plans
from prunekit.plugins import get_adapter


def layer_origins(model: nn.Module) -> list[int]:
    """The original (pre-pruning) index of each decoder layer of ``model`` now, replaying the
    layer removals of the plans :func:`~prunekit.core.surgery.apply_plan` recorded."""
    n_now = len(get_adapter(model).layers(model))
    plans = applied_plans(model)
    origin = list(range(n_now + sum(len(p.layers) for p in plans)))
    for plan in plans:
        removed = set(plan.layers)
        origin = [o for i, o in enumerate(origin) if i not in removed]
    if len(origin) != n_now:  # pragma: no cover - apply_plan keeps these in step
        raise ValueError(
            f"the model has {n_now} decoder layers but its recorded plans leave {len(origin)}; "
            "prune with prunekit.apply_plan so layers can be matched to the teacher's"
        )
    return origin


def parse_hidden_layers(spec: str) -> str | list[int]:
    """``"last"``, ``"all"``, or the sorted original layer indices of ``"3, 7,11"``."""
    spec = str(spec).strip()
    if spec in ("last", "all"):
        return spec
    try:
        indices = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        indices = []
    if not indices or indices[0] < 0:
        raise ValueError(
            f"hidden_layers = {spec!r} is invalid: 'last', 'all', or original (pre-pruning) "
            "decoder-layer indices such as '11,17,23'"
        )
    return indices


def teacher_layers(spec: str, origin: list[int]) -> list[int]:
    """The original indices of the teacher layers whose outputs ``spec`` needs, for a teacher
    whose layers have the original indices ``origin``."""
    wanted = parse_hidden_layers(spec)
    if wanted == "last":
        return [origin[-1]]
    if wanted == "all":
        return list(origin)
    missing = [i for i in wanted if i not in origin]
    if missing:
        raise ValueError(
            f"hidden_layers names layer(s) {missing} the teacher does not have (its layers: "
            f"{origin[0]}..{origin[-1]})"
        )
    return wanted


def relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_tokens ‖h_s − h_t‖² / ‖h_t‖²`` over the last dimension (fp32)."""
    h_s = student.float()
    h_t = teacher.to(h_s.device).float()
    return ((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _output(_module: nn.Module, _args: Any, output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(model: nn.Module, positions: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, the outputs of ``model``'s decoder layers at ``positions`` (current
    indices) in the last forward pass, as ``{position: [B, S, hidden]}`` (with their graph)."""
    layers = get_adapter(model).layers(model)
    states: dict[int, torch.Tensor] = {}

    def hook(position: int):
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            states[position] = _output(module, args, output)

        return keep

    handles = [layers[p].register_forward_hook(hook(p)) for p in positions]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


class HiddenDistill:
    """The layer pairs of one recovery run and their loss. ``pairs``: ``(original index,
    teacher position, student position)``; the teacher position is ``None`` for a cached
    teacher (its states are looked up by original index)."""

    def __init__(self, student: nn.Module, pairs: list[tuple[int, int | None, int]]):
        self.student = student
        self.pairs = pairs

    @classmethod
    def build(cls, student: nn.Module, teacher: Any, config: Any) -> HiddenDistill | None:
        """The pairs for ``config.hidden_layers`` (``None`` when ``config.alpha_hidden`` is 0).
        ``teacher``: the dense model, or a teacher cache that stored hidden states."""
        if not getattr(config, "alpha_hidden", 0):
            return None
        s_origin = layer_origins(student)
        if isinstance(teacher, nn.Module):  # positions of the teacher layers, by original index
            position = {o: i for i, o in enumerate(layer_origins(teacher))}
            stored = teacher_layers(config.hidden_layers, list(position))
        else:  # a cache: states looked up by original index
            position, stored = {}, list(getattr(teacher, "hidden_layers", []))
            if not stored:
                raise ValueError(
                    "alpha_hidden > 0 but the teacher cache holds no hidden states; build it "
                    "with the same recovery config (alpha_hidden > 0)"
                )
        if parse_hidden_layers(config.hidden_layers) == "last":
            last = stored[-1]
            return cls(student, [(last, position.get(last), len(s_origin) - 1)])
        pairs = [(o, position.get(o), s_origin.index(o)) for o in stored if o in s_origin]
        if not pairs:
            raise ValueError(
                f"hidden_layers = {config.hidden_layers!r}: none of the teacher layers {stored} "
                f"is kept in the student (its layers are original {s_origin}); name kept layers "
                "or use 'last'"
            )
        return cls(student, pairs)

    @contextlib.contextmanager
    def student_states(self) -> Iterator[dict[int, torch.Tensor]]:
        with capture(self.student, [s for _, _, s in self.pairs]) as states:
            yield states

    @torch.no_grad()
    def teacher_forward(
        self, teacher: nn.Module, batch: torch.Tensor, forward: Any
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``forward(teacher, batch)`` (the logits) and the in-memory teacher's states of the
        paired layers, keyed by original index."""
        with capture(teacher, [t for _, t, _ in self.pairs]) as states:
            logits = forward(teacher, batch)
        return logits, {o: states[t] for o, t, _ in self.pairs}

    def pair_losses(
        self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]
    ) -> list[torch.Tensor]:
        """One :func:`relative_error` per pair (teacher states keyed by original index)."""
        return [relative_error(student[s], teacher[o]) for o, _, s in self.pairs]

    def loss(
        self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        return torch.stack(self.pair_losses(student, teacher)).mean()

    def __repr__(self) -> str:
        return "HiddenDistill(" + ", ".join(f"{o}->{s}" for o, _, s in self.pairs) + ")"


__all__ = [
    "HiddenDistill",
    "capture",
    "layer_origins",
    "parse_hidden_layers",
    "relative_error",
    "teacher_layers",
]
