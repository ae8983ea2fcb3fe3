"""Distillation without a second model in memory: the dense teacher's outputs, computed once
before pruning and cached on disk.

Minitron-style distillation (Muralidharan et al. 2024, arXiv 2407.14679) needs the dense
model's output distribution on every training batch. Keeping the dense model beside the
student doubles the weights in memory and costs one teacher forward per step; here the dense
model runs **once** over the recovery rows (training and held-out) before it is pruned, and
for every token the ``k`` largest log-probabilities at the distillation temperature are
written to disk with their vocabulary indices and the log of the probability left to the
other tokens. ``distill`` then trains against the cache
(:func:`~prunekit.core.training.distill_topk_kl`): no teacher forward per step, no copy.

Disk (memory-mapped, in a temporary directory removed with the cache): per token ``k``
log-probabilities (fp16, 2 bytes) + ``k`` indices (int32, 4 bytes) + the rest (fp32, 4 bytes):
``rows × seq_len × (6·k + 4)`` bytes — 256 rows × 256 tokens × k=64: 25.4 MB, against
``rows × seq_len × vocab × 4`` bytes (12.9 GB for SmolLM2's 49,152-token vocabulary) for full
logits. Top-64 keeps nearly all of a language model's probability mass per token; what is
left is distilled as one bucket, so the loss is the KL over ``k + 1`` buckets (exact when
``k`` = vocabulary). With ``alpha_hidden > 0`` the outputs of the ``hidden_layers`` are stored
too (fp16, ``rows × seq_len × hidden × 2`` bytes each; :mod:`prunekit.core.hidden_distill`)::

    cache = TeacherCache.build(dense, train_ids, config)      # before pruning
    apply_plan(dense, plan)                                   # the same model, now the student
    recover(dense, cache.ids, config, teacher=cache)
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.hidden_distill import capture, layer_origins, teacher_layers
from prunekit.core.training import (
    LOG_ZERO,
    TeacherTopK,
    device_of,
    forward_logits,
    split_data,
)

_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}
_FP16_MAX = 65504.0


class TeacherCache:
    """The dense model's top-k log-probabilities on the rows :func:`split_data` makes of
    ``ids`` (held-out rows included), memory-mapped from files in ``directory``. Pass it as
    ``recover(..., teacher=cache)`` with the same ``ids`` and config."""

    def __init__(
        self,
        directory: Path,
        ids: torch.Tensor,
        train_rows: torch.Tensor,
        eval_rows: torch.Tensor,
        k: int,
        temperature: float,
        dtype: torch.dtype,
        *,
        owned: bool,
        hidden_layers: list[int] | tuple[int, ...] = (),
        hidden_size: int = 0,
        hidden_spec: str | None = None,
    ):
        self.directory, self.ids, self.k = Path(directory), ids, k
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.temperature = float(temperature)
        self.dtype = dtype
        n, seq = train_rows.shape[0] + eval_rows.shape[0], train_rows.shape[1]
        mode = "w+"
        self.logp = np.memmap(self.directory / "logp.bin", _NUMPY[dtype], mode, shape=(n, seq, k))
        self.index = np.memmap(self.directory / "index.bin", np.int32, mode, shape=(n, seq, k))
        self.rest = np.memmap(self.directory / "rest.bin", np.float32, mode, shape=(n, seq))
        #: original indices of the teacher layers whose outputs are stored (alpha_hidden > 0)
        self.hidden_layers = list(hidden_layers)
        self.hidden_spec = hidden_spec
        self.hidden = {
            o: np.memmap(
                self.directory / f"hidden_{o}.bin", np.float16, mode, shape=(n, seq, hidden_size)
            )
            for o in self.hidden_layers
        }
        self._cleanup = (
            weakref.finalize(self, shutil.rmtree, str(self.directory), True) if owned else None
        )

    @property
    def nbytes(self) -> int:
        """Bytes on disk: ``rows × seq_len × (k·(value bytes + 4) + 4)``, plus
        ``rows × seq_len × hidden × 2`` per stored hidden layer (``alpha_hidden > 0``)."""
        hidden = sum(a.nbytes for a in self.hidden.values())
        return self.logp.nbytes + self.index.nbytes + self.rest.nbytes + hidden

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        ids: torch.Tensor,
        config: Any,
        *,
        eval_ids: torch.Tensor | None = None,
        k: int | None = None,
        directory: str | Path | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> TeacherCache:
        """Run ``teacher`` once over the rows ``recover(student, ids, config,
        eval_ids=eval_ids)`` will use and cache its top-``k`` log-probabilities at
        ``config.temperature`` (``k`` default: ``config.distill_topk``, capped at the
        vocabulary). ``directory``: where the files go (default: a new temporary directory,
        removed when the cache is garbage-collected or :meth:`close` is called)."""
        if dtype not in _NUMPY:
            raise ValueError(f"dtype must be torch.float16 or torch.float32, not {dtype}")
        train_rows, eval_rows = split_data(ids, eval_ids, config)
        owned = directory is None
        if owned:
            directory = tempfile.mkdtemp(prefix="prunekit-teacher-")
        Path(directory).mkdir(parents=True, exist_ok=True)
        vocab = teacher.get_output_embeddings().weight.shape[0]
        k = min(int(k or config.distill_topk), vocab)
        origin = layer_origins(teacher)
        stored = (
            teacher_layers(config.hidden_layers, origin)
            if getattr(config, "alpha_hidden", 0)
            else []
        )
        cache = cls(
            directory,
            ids,
            train_rows,
            eval_rows,
            k,
            config.temperature,
            dtype,
            owned=owned,
            hidden_layers=stored,
            hidden_size=teacher.get_input_embeddings().weight.shape[1],
            hidden_spec=config.hidden_layers if stored else None,
        )
        was_training = teacher.training
        teacher.eval()
        rows = torch.cat([train_rows, eval_rows])
        position = {o: i for i, o in enumerate(origin)}
        for start in range(0, rows.shape[0], config.batch_size):
            batch = rows[start : start + config.batch_size].to(device_of(teacher))
            with capture(teacher, [position[o] for o in stored]) as states:
                logits = forward_logits(teacher, batch)
            logp = F.log_softmax(logits.float() / cache.temperature, -1)
            top, index = logp.topk(k, dim=-1)
            rest = logp.scatter(-1, index, LOG_ZERO).logsumexp(-1)
            stop = start + batch.shape[0]
            cache.logp[start:stop] = top.clamp_min(-1e4).cpu().numpy()
            cache.index[start:stop] = index.to(torch.int32).cpu().numpy()
            cache.rest[start:stop] = rest.clamp_min(LOG_ZERO).cpu().numpy()
            for o in stored:  # fp16: clamped to its range (hidden states rarely come near it)
                state = states[position[o]].float().clamp(-_FP16_MAX, _FP16_MAX)
                cache.hidden[o][start:stop] = state.cpu().numpy().astype(np.float16)
        teacher.train(was_training)
        for array in (cache.logp, cache.index, cache.rest, *cache.hidden.values()):
            array.flush()
        return cache

    def check(self, train_rows: torch.Tensor, eval_rows: torch.Tensor, config: Any) -> None:
        """Raise ``ValueError`` unless the cache was built for these rows and temperature."""
        if not (
            torch.equal(train_rows, self.train_rows) and torch.equal(eval_rows, self.eval_rows)
        ):
            raise ValueError(
                "the teacher cache was built for other token rows; pass recover() the ids and "
                "config the cache was built with (cache.ids)"
            )
        if abs(config.temperature - self.temperature) > 1e-9:
            raise ValueError(
                f"the teacher cache holds temperature {self.temperature}, the config asks "
                f"{config.temperature}; rebuild the cache"
            )
        if getattr(config, "alpha_hidden", 0) and config.hidden_layers != self.hidden_spec:
            held = f"those of hidden_layers={self.hidden_spec!r}" if self.hidden_spec else "none"
            raise ValueError(
                f"the config asks for hidden-state distillation (alpha_hidden="
                f"{config.alpha_hidden}, hidden_layers={config.hidden_layers!r}) but the teacher "
                f"cache holds {held}; build the cache with the same recovery config"
            )

    def lookup(self, split: str, index: torch.Tensor, device: torch.device) -> TeacherTopK:
        """The cached teacher output for rows ``index`` of ``split`` (``train`` / ``eval``)."""
        rows = index.numpy() + (self.train_rows.shape[0] if split == "eval" else 0)
        order = np.argsort(rows)  # memmap fancy indexing reads in order; undo it afterwards
        back = np.argsort(order)

        def read(array: np.memmap) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array[rows[order]][back])).to(device)

        return TeacherTopK(
            logp=read(self.logp),
            index=read(self.index),
            log_rest=read(self.rest),
            temperature=self.temperature,
            hidden={o: read(array) for o, array in self.hidden.items()},
        )

    def close(self) -> None:
        """Remove the files now (when the cache made its own temporary directory)."""
        arrays = [getattr(self, n, None) for n in ("logp", "index", "rest")]
        for array in [*arrays, *getattr(self, "hidden", {}).values()]:
            if isinstance(array, np.memmap) and array._mmap is not None:
                array._mmap.close()
        if self._cleanup is not None:
            self._cleanup()

    def __repr__(self) -> str:
        n = self.train_rows.shape[0] + self.eval_rows.shape[0]
        return (
            f"TeacherCache({n} rows x {self.train_rows.shape[1]} tokens, top-{self.k}, "
            f"T={self.temperature}, {self.nbytes / 2**20:.1f} MiB in {self.directory})"
        )


def teacher_caches(
    model: nn.Module, tokenizer: Any, recipe: Any, method: Any, config: Any
) -> dict[int, TeacherCache]:
    """For ``compress``, before pruning: when the recovery ``method`` uses a teacher and
    ``config.distill_topk`` > 0, the dense ``model``'s top-k cache for each recovery round,
    keyed by the round's calibration seed (``recipe.calibration.seed + step``; the rows are
    :func:`recovery_ids`). Empty otherwise (then the pipeline keeps a dense copy)."""
    if not uses_teacher_cache(method, config):
        return {}
    caches = {}
    for step in range(1, recipe.iterative + 1):
        seed = recipe.calibration.seed + step
        ids = recovery_ids(recipe, config, tokenizer, model, seed)
        caches[seed] = TeacherCache.build(model, ids, config)
    return caches


def uses_teacher_cache(method: Any, config: Any) -> bool:
    """Whether ``compress`` distils from a cache (instead of a dense copy in memory)."""
    return bool(getattr(method, "uses_teacher", False) and getattr(config, "distill_topk", 0))


def recovery_ids(recipe: Any, config: Any, tokenizer: Any, model: Any, seed: int) -> torch.Tensor:
    """The calibration windows one recovery round trains on (fresh windows per round)."""
    calibration = dataclasses.replace(
        recipe.calibration,
        n_samples=getattr(config, "n_samples", 256),
        seq_len=getattr(config, "seq_len", 256),
        seed=seed,
    )
    return calibration.load(tokenizer, model=model)


__all__ = ["TeacherCache", "recovery_ids", "teacher_caches", "uses_teacher_cache"]
