"""Where the offline texts live: Brown (calibration, recovery training) and WikiText-2 test
(evaluation only). ``$PRUNEKIT_DATA`` overrides the default ``<project>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """``$PRUNEKIT_DATA``, else ``../shared/data`` beside the project (or the working dir)."""
    env = os.environ.get("PRUNEKIT_DATA")
    if env:
        return Path(env)
    for base in (_PROJECT_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return _PROJECT_ROOT.parent / "shared" / "data"


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} not found at {path}; set PRUNEKIT_DATA to the folder holding "
            "brown/brown.txt and wikitext-2-raw/wiki.test.raw, or pass a text file explicitly"
        )
    return path


def brown_path() -> Path:
    """The default calibration and recovery-training text (never used for evaluation)."""
    return _existing(shared_data_dir() / "brown" / "brown.txt", "Brown corpus")


def wikitext2_test_path() -> Path:
    """The default evaluation text (never used for calibration or training)."""
    return _existing(shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw", "WikiText-2 test")
