"""Serving a pruned model: the ``trust_remote_code`` module written next to a per-layer result,
and which runtimes load a result (:func:`loadable_by`).

A per-layer or sub-block result keeps transformers' own ``per_layer_config`` in ``config.json``
(a transformers release with heterogeneous modeling loads it natively). Until then the output
directory also carries ``configuration_prunekit.py`` / ``modeling_prunekit.py`` and an
``auto_map`` so that ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
loads it in a process that has transformers but not prunekit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REMOTE_CODE_DIR = Path(__file__).with_name("remote_code")
REMOTE_CODE_FILES = ("configuration_prunekit.py", "modeling_prunekit.py")
#: model_type -> class-name stem in the remote-code module
REMOTE_CODE_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}

#: runtime names that :func:`loadable_by` returns
STOCK = "transformers"
REMOTE_CODE = "transformers (trust_remote_code=True)"
VLLM = "vllm"
VLLM_DECILM = "vllm (after `prunekit export --format decilm`)"
VLLM_NATIVE_DECILM = "vllm (DeciLMForCausalLM)"
PRUNEKIT = "prunekit.load_pretrained"
#: architectures vLLM serves from a stock config
_VLLM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def auto_map(model_type: str) -> dict[str, str]:
    """The ``auto_map`` entry of ``config.json`` for a per-layer ``model_type`` result."""
    stem = REMOTE_CODE_CLASSES[model_type]
    return {
        "AutoConfig": f"configuration_prunekit.Prunekit{stem}Config",
        "AutoModel": f"modeling_prunekit.Prunekit{stem}Model",
        "AutoModelForCausalLM": f"modeling_prunekit.Prunekit{stem}ForCausalLM",
    }


def _is_prunekit_auto_map(value: Any) -> bool:
    return isinstance(value, dict) and any("_prunekit." in str(v) for v in value.values())


def write_remote_code(directory: str | Path) -> bool:
    """Make a saved model directory loadable with ``trust_remote_code=True``: for a per-layer
    result of a supported decoder, copy the remote-code files and add ``auto_map`` to
    ``config.json``; for a uniform result remove a stale prunekit ``auto_map`` and files (a
    stock config needs none). Returns whether the directory now carries remote code."""
    directory = Path(directory)
    path = directory / "config.json"
    config = json.loads(path.read_text())
    per_layer = bool(config.get("per_layer_config"))
    wanted = per_layer and config.get("model_type") in REMOTE_CODE_CLASSES
    if _is_prunekit_auto_map(config.get("auto_map")) and not wanted:
        del config["auto_map"]
    for name in REMOTE_CODE_FILES:
        target = directory / name
        if wanted:
            shutil.copyfile(REMOTE_CODE_DIR / name, target)
        elif target.exists():
            target.unlink()
    if wanted:
        config["auto_map"] = auto_map(config["model_type"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return wanted


def config_dict(source: Any) -> dict[str, Any]:
    """A config as a dict, from a dict, a directory / ``config.json`` path or a config object."""
    if isinstance(source, dict):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    from prunekit.core.io import global_access  # a config object (possibly per-layer)

    with global_access(source):
        return source.to_dict()


def loadable_by(output_dir_or_config: Any) -> list[str]:
    """Which runtimes load a result, from its directory, ``config.json`` path, config dict or
    config object: stock transformers (and vLLM) for a uniform result; for a per-layer one,
    transformers with ``trust_remote_code=True`` (when the directory carries the module, or a
    config object whose architecture prunekit writes it for), vLLM after a DeciLM export when
    the shapes fit it, and prunekit's own loader."""
    from prunekit.core.export import decilm_problems

    config = config_dict(output_dir_or_config)
    model_type = config.get("model_type")
    if config.get("block_configs") is not None:  # a DeciLM / Nemotron-NAS export
        return [VLLM_NATIVE_DECILM, REMOTE_CODE]
    if not config.get("per_layer_config"):
        runtimes = [STOCK]
        if model_type in _VLLM_MODEL_TYPES:
            runtimes.append(VLLM)
        return [*runtimes, PRUNEKIT]
    runtimes = []
    written = isinstance(output_dir_or_config, (str, Path)) and _is_prunekit_auto_map(
        config.get("auto_map")
    )
    if written or (
        not isinstance(output_dir_or_config, (str, Path)) and (model_type in REMOTE_CODE_CLASSES)
    ):
        runtimes.append(REMOTE_CODE)
    if not decilm_problems(config):
        runtimes.append(VLLM_DECILM)
    return [*runtimes, PRUNEKIT]


__all__ = ["auto_map", "config_dict", "loadable_by", "write_remote_code"]
