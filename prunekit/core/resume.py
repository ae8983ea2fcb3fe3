"""``compress --resume``: the expensive result of each pruning step (its scores) is kept so
that a rerun after a failure does not compute it again.

Where: ``.NAME.cache/`` beside the output ``NAME`` (a hidden sibling like the temporary
``.NAME.tmp-*`` directories, but not one of them: the stale-temporary cleanup leaves it).
What: ``scores-step{N}.json`` per pruning step, each with the key of the run that made it.
The key hashes the model directory (resolved path, and each file's name, size and mtime) and
the recipe minus the sections that run after the scores of the last step (evaluation,
quantization); a file whose key differs is ignored. When: written after each scoring (with or
without ``--resume``), read only with ``--resume``, removed once the compressed model is
saved. An in-memory model has no key: nothing is kept. SLEB ``layer_steps > 1`` re-scores
inside one selection and is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.core.scores import Scores


def cache_dir(output_dir: str | Path) -> Path:
    """The score cache of the output ``output_dir``: ``.NAME.cache`` beside it."""
    out = Path(output_dir)
    return out.parent / f".{out.name}.cache"


def _model_identity(model_or_path: Any) -> dict[str, Any] | None:
    if isinstance(model_or_path, nn.Module):
        return None
    path = Path(model_or_path)
    if not path.exists():
        return {"model": str(model_or_path)}  # a hub id
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.is_file())
    return {
        "model": str(path.resolve()),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


class ScoreCache:
    """The scores of each pruning step of one run, kept in :func:`cache_dir`."""

    def __init__(self, output_dir: str | Path, model_or_path: Any, recipe: Any) -> None:
        self.dir = cache_dir(output_dir)
        identity = _model_identity(model_or_path)
        self.key: str | None = None
        if identity is not None:
            spec = {
                k: v for k, v in recipe.to_dict().items() if k not in ("evaluation", "quantize")
            }
            text = json.dumps({**identity, "recipe": spec}, sort_keys=True, default=str)
            self.key = hashlib.sha256(text.encode()).hexdigest()

    def _path(self, step: int) -> Path:
        return self.dir / f"scores-step{step}.json"

    def load(self, step: int) -> Scores | None:
        """The scores of ``step`` kept by an earlier run of the same model and recipe."""
        path = self._path(step)
        if self.key is None or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") != self.key:
                return None
            return Scores.from_dict(saved["scores"])
        except (ValueError, KeyError, TypeError):
            return None  # a damaged file is recomputed, never trusted

    def save(self, step: int, scores: Scores) -> None:
        """Keep ``scores`` (atomically: a temporary file renamed into place)."""
        if self.key is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(step)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "scores": scores.to_dict()}), encoding="utf-8")
        os.replace(tmp, path)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["ScoreCache", "cache_dir"]
