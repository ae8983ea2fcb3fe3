"""Export a (per-layer) Llama-family result as DeciLM / Nemotron-NAS ``block_configs``, the
heterogeneous format vLLM serves natively (``nemotron_nas.py``) and llama.cpp converts.

Per layer, DeciLM has ``attention: {no_op, n_heads_in_group}`` and ``ffn: {no_op, ffn_mult |
intermediate_size}``; the query-head count is global (``num_attention_heads``), the KV-head
count of a layer is ``num_attention_heads // n_heads_in_group``, and an ``ffn_mult`` ``m`` means
the width ``roundup(int(2 * m * hidden_size / 3), 256)``. Weight names are Llama's; a no-op
sub-block has no weights (nor its norm). :func:`decilm_problems` says what does not fit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prunekit.errors import ExportError

FORMAT = "decilm"
_MODEL_TYPES = ("llama", "mistral")
_ATTENTION_DEFAULTS = {
    "num_sink_tokens": None,
    "replace_with_linear": False,
    "sparsify": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
    "window_length": None,
}
_FFN_DEFAULTS = {"replace_with_linear": False, "sparsify": None}
_OWN_FILES = ("config.json", "configuration_prunekit.py", "modeling_prunekit.py")
#: the trust_remote_code module of an export (DeciLM config and model classes for transformers)
_REMOTE_CODE = (
    "configuration_decilm.py",
    "modeling_decilm.py",
    "configuration_prunekit.py",
    "modeling_prunekit.py",
)


def ffn_mult_width(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width DeciLM readers derive from ``ffn_mult``."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """An ``ffn_mult`` that readers turn back into exactly ``width``, or ``None`` (widths that
    are not a multiple of 256 need ``intermediate_size``)."""
    if width <= 0 or width % 256:
        return None
    mult = round(3 * width / (2 * hidden_size), 6)
    return mult if ffn_mult_width(mult, hidden_size) == width else None


def _layers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layer: heads, kv_heads, intermediate, skip (global values with overrides)."""
    overrides = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}
    n_heads = config["num_attention_heads"]
    base = {
        "num_attention_heads": n_heads,
        "num_key_value_heads": config.get("num_key_value_heads") or n_heads,
        "intermediate_size": config["intermediate_size"],
        "skip": [],
    }
    return [{**base, **overrides.get(i, {})} for i in range(config["num_hidden_layers"])]


def decilm_problems(config: dict[str, Any]) -> list[str]:
    """What in a prunekit ``config.json`` dict DeciLM cannot express (empty when it fits)."""
    problems = []
    if config.get("model_type") not in _MODEL_TYPES:
        problems.append(
            f"model_type {config.get('model_type')!r} is not Llama-family "
            f"(DeciLM export supports {', '.join(_MODEL_TYPES)})"
        )
        return problems
    if config.get("sliding_window") is not None:
        problems.append("a sliding window (DeciLM attention is global)")
    layers = _layers(config)
    heads = {
        i: L["num_attention_heads"] for i, L in enumerate(layers) if "attention" not in L["skip"]
    }
    if len(set(heads.values())) > 1:
        detail = ", ".join(f"layer {i}: {n}" for i, n in heads.items())
        problems.append(
            "non-uniform query heads (DeciLM has one global num_attention_heads; per layer only "
            f"the KV grouping changes or attention is a no-op): {detail}"
        )
    return problems


def _block(layer: dict[str, Any], n_heads: int, hidden: int, ffn_mult: bool) -> dict[str, Any]:
    if "attention" in layer["skip"]:
        attention = {"n_heads_in_group": None, "no_op": True}
    else:
        attention = {"n_heads_in_group": n_heads // layer["num_key_value_heads"], "no_op": False}
    if "mlp" in layer["skip"]:
        ffn: dict[str, Any] = {"ffn_mult": None, "no_op": True}
    else:
        mult = ffn_mult_for(layer["intermediate_size"], hidden) if ffn_mult else None
        size = (
            {"ffn_mult": mult}
            if mult is not None
            else {"intermediate_size": layer["intermediate_size"]}
        )
        ffn = {**size, "no_op": False}
    return {
        "attention": {**attention, **_ATTENTION_DEFAULTS},
        "ffn": {**ffn, **_FFN_DEFAULTS},
    }


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) as the ``rope_theta`` / ``rope_scaling`` pair the
    Nemotron-NAS checkpoints carry."""
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else None
    return {"rope_theta": theta, "rope_scaling": scaling}


def decilm_config(config: dict[str, Any], *, ffn_mult: bool = True) -> dict[str, Any]:
    """The DeciLM ``config.json`` for a prunekit ``config.json`` dict; ``ffn_mult=True`` writes
    ``ffn_mult`` wherever the width is representable. Raises :class:`ExportError`."""
    problems = decilm_problems(config)
    if problems:
        raise ExportError(FORMAT, problems)
    layers = _layers(config)
    kept = [L["num_attention_heads"] for L in layers if "attention" not in L["skip"]]
    n_heads = kept[0] if kept else config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    dropped = ("per_layer_config", "auto_map", "rope_parameters", "layer_types", "sliding_window")
    out = {k: v for k, v in config.items() if k not in dropped}
    if "dtype" in out:  # transformers 4.x readers (the Nemotron-NAS checkpoints' era)
        out["torch_dtype"] = out["dtype"]
    out.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModel": "modeling_decilm.DeciLMModel",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        num_attention_heads=n_heads,
        num_key_value_heads=None,
        intermediate_size=None,
        head_dim=head_dim,
        block_configs=[_block(L, n_heads, hidden, ffn_mult) for L in layers],
        **_rope(config),
    )
    return out


def _source_dir(source: Any, scratch: Path) -> Path:
    if isinstance(source, (str, Path)):
        return Path(source)
    from prunekit.core.io import save_pretrained  # a model object: save it first

    return save_pretrained(source, scratch / "model")


def export_decilm(
    model_dir_or_model: Any,
    out: str | Path,
    *,
    overwrite: bool = False,
    ffn_mult: bool = True,
    require_ffn_mult: bool = False,
) -> Path:
    """Write ``model_dir_or_model`` (a prunekit output directory, or a model) to ``out`` as a
    DeciLM / Nemotron-NAS checkpoint: ``block_configs`` config, the same safetensors, tokenizer
    files, and ``configuration_decilm.py`` (for ``trust_remote_code`` config readers such as
    vLLM). ``require_ffn_mult=True`` fails unless every width is expressible as ``ffn_mult``
    (older readers take nothing else). The output is written atomically."""
    from prunekit.core.io import AtomicDir, write_sidecar
    from prunekit.core.serving import REMOTE_CODE_DIR, loadable_by

    with tempfile.TemporaryDirectory() as scratch:
        src = _source_dir(model_dir_or_model, Path(scratch))
        config = decilm_config(json.loads((src / "config.json").read_text()), ffn_mult=ffn_mult)
        if require_ffn_mult:
            _check_ffn_mult(config)
        with AtomicDir(out, overwrite, inputs=(model_dir_or_model,)) as tmp:
            for f in src.iterdir():
                if f.is_file() and f.name not in _OWN_FILES:
                    shutil.copy2(f, tmp / f.name)
            for name in _REMOTE_CODE:
                shutil.copyfile(REMOTE_CODE_DIR / name, tmp / name)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            sidecar = tmp / "prunekit.json"
            if sidecar.exists():
                data = json.loads(sidecar.read_text())
                export = {"format": FORMAT, "source": str(src)}
                write_sidecar(tmp, {**data, "export": export, "loadable_by": loadable_by(config)})
    return Path(out)


def _check_ffn_mult(config: dict[str, Any]) -> None:
    bad = [
        f"layer {i}: {b['ffn']['intermediate_size']}"
        for i, b in enumerate(config["block_configs"])
        if "intermediate_size" in b["ffn"]
    ]
    if bad:
        raise ExportError(
            FORMAT,
            [
                "MLP widths not expressible as ffn_mult (a multiple of 256 is needed): "
                + ", ".join(bad)
            ],
        )


__all__ = ["decilm_config", "decilm_problems", "export_decilm", "ffn_mult_for", "ffn_mult_width"]
