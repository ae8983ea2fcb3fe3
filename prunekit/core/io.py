"""Loading and saving models: stock configs for uniform results, ``per_layer_config`` for
per-layer results, safetensors only, atomic writes, and a ``prunekit.json`` sidecar (built by
:func:`build_sidecar`, the one place that knows its fields)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.checkpoint import read_header
from prunekit.core.devices import check_device_map, resolve_device, resolve_dtype
from prunekit.core.jsonfile import read_json_object
from prunekit.core.outdir import AtomicDir as AtomicDir  # re-exported: the output guards
from prunekit.core.outdir import check_output_dir as check_output_dir
from prunekit.core.outdir import input_paths as input_paths
from prunekit.core.plan import PrunePlan
from prunekit.core.serving import loadable_by, write_remote_code
from prunekit.core.shapes import LayerShape
from prunekit.core.surgery import applied_plans
from prunekit.errors import ModelLoadError, UnsafeCheckpointError
from prunekit.plugins import get_adapter
from prunekit.versions import versions

SIDECAR = "prunekit.json"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_WEIGHT_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES)


@contextlib.contextmanager
def global_access(config: Any) -> Iterator[None]:
    """Let transformers' own validators read global values of a per-layer config (they were
    written for homogeneous configs; the global values are the pre-pruning ones)."""
    if not getattr(config, "is_heterogeneous", False):
        yield
        return
    before = config.allow_global_per_layer_attribute_access
    config.allow_global_per_layer_attribute_access = True
    log = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = log.level
    log.setLevel(logging.ERROR)  # the "reading a global value" warning is expected here
    try:
        yield
    finally:
        config.allow_global_per_layer_attribute_access = before
        log.setLevel(level)


# ---- sidecar and sizes --------------------------------------------------------------------
def build_sidecar(
    model: nn.Module,
    *,
    plans: list[PrunePlan] | list[dict[str, Any]] | None = None,
    shapes: list[LayerShape] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``prunekit.json`` dict for ``model``: format, layout (``uniform`` / ``per_layer``),
    adapter, model type, per-layer shapes, the applied plans and package versions, then
    ``extra`` (which may add keys such as ``recipe``, ``metrics``, ``quantization`` or replace
    ``versions``).

    ``plans`` defaults to ``model.prunekit_plans`` (recorded by :func:`prunekit.apply_plan`);
    ``shapes`` defaults to the shapes read from the modules (pass
    ``adapter.config_shapes(model.config)`` for a model whose modules are packed)."""
    adapter = get_adapter(model)
    config = model.config
    if plans is None:
        plans = applied_plans(model)
    if shapes is None:
        shapes = adapter.shapes(model)
    return {
        "format": FORMAT_VERSION,
        "layout": "per_layer" if getattr(config, "is_heterogeneous", False) else "uniform",
        "adapter": adapter.name,
        "model_type": config.model_type,
        "layer_shapes": [s.to_dict() for s in shapes],
        "loadable_by": loadable_by(config),
        "plans": [p.to_dict() if isinstance(p, PrunePlan) else dict(p) for p in plans],
        "versions": versions(),
        **(extra or {}),
    }


def write_sidecar(directory: str | Path, sidecar: dict[str, Any]) -> Path:
    """Write ``sidecar`` as ``<directory>/prunekit.json``; return its path."""
    path = Path(directory) / SIDECAR
    path.write_text(json.dumps(sidecar, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def weights_size_mb(path: str | Path) -> float | None:
    """Size in MiB of a model's weights: one weight file, or the weight files
    (``*.safetensors``, ``*.bin``, ``*.pt``, ...) at the top level of a model directory;
    ``None`` when there are none (e.g. ``path`` is a hub id)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    if not path.is_dir():
        return None
    files = [f for f in path.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    return sum(f.stat().st_size for f in files) / 2**20 if files else None


# ---- save --------------------------------------------------------------------------------
def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    plans: list[PrunePlan] | None = None,
    extra: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Save a (pruned) model as safetensors + config + ``prunekit.json``.

    Uniform results get a stock config that plain ``AutoModel*.from_pretrained`` loads;
    per-layer results carry ``per_layer_config`` and load with :func:`load_pretrained`, or with
    ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` through the module
    :func:`prunekit.core.serving.write_remote_code` writes beside them.
    Refuses a non-empty ``out_dir`` unless ``overwrite=True``; writes atomically. The sidecar
    (:func:`build_sidecar`) records ``plans``, by default ``model.prunekit_plans``, and
    ``extra`` (a callable is called with the directory once the weights are in it).
    """
    adapter = get_adapter(model)  # an unsupported architecture fails before anything is written
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("model has parameters on the meta device; load its weights first")
    sidecar = build_sidecar(model, plans=plans, extra=None if callable(extra) else extra)
    saved = adapter.saved_config(model.config)  # e.g. a Llama head count as Mistral
    with AtomicDir(out_dir, overwrite, inputs=(model,)) as tmp, global_access(model.config):
        with _config_swapped(model, saved, tmp / "config.json"):
            model.save_pretrained(tmp)
        _strip_config_key(tmp / "config.json", "allow_global_per_layer_attribute_access")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        pickled = [p.name for p in tmp.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickled:  # pragma: no cover - transformers 5 writes safetensors only
            raise RuntimeError(f"refusing to write pickled files {pickled}")
        write_sidecar(tmp, {**sidecar, **extra(tmp)} if callable(extra) else sidecar)
        write_remote_code(tmp)  # per-layer: loadable with trust_remote_code=True
    return Path(out_dir)


@contextlib.contextmanager
def _config_swapped(model: nn.Module, config: Any, written: Path) -> Iterator[None]:
    """Save ``model`` under ``config`` (same tensors, another stock class): transformers
    writes ``architectures`` from the Python class, so the config's own is put back into the
    ``written`` config.json."""
    if config is model.config:
        yield
        return
    own, architectures = model.config, list(config.architectures)
    model.config = config
    try:
        yield
    finally:
        model.config = own
    data = json.loads(written.read_text())
    data["architectures"] = architectures
    written.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _strip_config_key(path: Path, key: str) -> None:
    data = json.loads(path.read_text())
    if data.pop(key, None) is not None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- load --------------------------------------------------------------------------------
def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    safetensors = sorted(path.glob("*.safetensors"))
    for f in safetensors:
        read_header(f)  # a garbage or truncated file fails here, named, before any load
    if safetensors:
        return safetensors
    pickled = sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise UnsafeCheckpointError(str(path))
    if not pickled:
        raise ModelLoadError(f"{path} has no weight files (*.safetensors)")
    return pickled


def _model_class(config: Any, adapter: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if adapter.causal else transformers.AutoModel


def _load_tokenizer(path: Path, config: Any = None):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    # Pass the config: AutoTokenizer would otherwise re-read config.json, which transformers'
    # validators reject for a per-layer config.
    return AutoTokenizer.from_pretrained(path, config=config)


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model directory {path} does not exist; pass a local model directory or a hub id"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (for a GGUF file pass gguf_file=)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; is it a Hugging Face model directory?")


def raw_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of the model directory ``path`` as a dict; a file that is not valid
    JSON raises :class:`ModelLoadError` naming it."""
    path = Path(path)
    _check_model_dir(path)
    return read_json_object(path / "config.json", "config", ModelLoadError)


def read_config(path: str | Path) -> Any:
    """The config of a model directory, per-layer overrides included, without loading weights
    (transformers' validators reject a per-layer config read through ``AutoConfig``)."""
    from transformers import AutoConfig

    path = Path(path)
    raw = raw_config(path)
    overrides = raw.pop("per_layer_config", None)
    if not overrides:
        return AutoConfig.from_pretrained(path)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.per_layer_config = {int(k): v for k, v in overrides.items()}
    return config


def meta_skeleton(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> nn.Module:
    """The model of the directory ``path`` built on the meta device from its config (no
    weights, no memory); a per-layer config is built from its global values and each layer cut
    to its saved shape (no random init, no ``ignore_mismatched_sizes``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    raw = raw_config(path)
    overrides = {int(k): v for k, v in (raw.pop("per_layer_config", None) or {}).items()}
    if overrides:
        # transformers' config validators read global head counts, which a per-layer config
        # forbids: build from the global values, then attach the per-layer overrides.
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        config = AutoConfig.from_pretrained(path)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    adapter = get_adapter(config)
    shapes = None
    if overrides:
        config.per_layer_config = overrides
        shapes = adapter.layer_shapes_from_config(config)
        config.per_layer_config = None  # build the homogeneous skeleton from the global values
    with init_empty_weights(include_buffers=False):
        model = _model_class(config, adapter)._from_config(config, dtype=dtype)
    if shapes is not None:
        for layer, shape in zip(adapter.layers(model), shapes, strict=True):
            adapter.reshape_layer(layer, shape)
        model.config.per_layer_config = overrides
    return model.eval()


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a model saved by :func:`save_pretrained` (or any HF directory) → ``(model,
    tokenizer)`` in ``dtype`` (``"auto"``: the checkpoint's own) on ``device``, or spread by
    ``device_map`` (``"auto"``, with ``max_memory``; CPU and disk offload through accelerate).
    Per-layer results are built on the meta device to their saved shapes, then their tensors
    are streamed in one at a time (never the whole checkpoint in one dict)."""
    path = Path(path)
    _check_model_dir(path)
    files = _weight_files(path, allow_pickle)
    dtype = resolve_dtype(dtype, path)
    device = resolve_device(device) if device is not None else None
    check_device_map(device_map, max_memory)
    if not raw_config(path).get("per_layer_config"):
        config = read_config(path)
        adapter = get_adapter(config)
        placement = {"": device} if device is not None and device_map is None else device_map
        model = _model_class(config, adapter).from_pretrained(
            path,
            dtype=dtype,
            use_safetensors=files[0].suffix == ".safetensors",
            attn_implementation=attn_implementation,
            device_map=placement,
            max_memory=max_memory,
            offload_folder=_offload_folder() if device_map is not None else None,
        )
    else:
        model = meta_skeleton(path, dtype, attn_implementation)
        _stream_weights(model, files, dtype, device if device_map is None else None)
        if device_map is not None:
            model = _dispatch(model, device_map, max_memory)
    model.eval()
    return model, _load_tokenizer(path, model.config)


def _offload_folder() -> str:
    return tempfile.mkdtemp(prefix="prunekit-offload-")


def _dispatch(model: nn.Module, device_map: Any, max_memory: dict[Any, Any] | None) -> nn.Module:
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=no_split
        )
    return dispatch_model(model, device_map=device_map, offload_dir=_offload_folder())


def _file_tensors(path: Path, device: torch.device | None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix != ".safetensors":
        yield from torch.load(path, map_location=device or "cpu", weights_only=True).items()
        return
    from safetensors import safe_open

    with safe_open(path, "pt", device=str(device or "cpu")) as handle:
        for key in handle.keys():
            yield key, handle.get_tensor(key)


def _stream_weights(model: nn.Module, files: list[Path], dtype, device) -> None:
    """Put the checkpoint's tensors into the meta ``model`` one at a time (cast to ``dtype``)."""
    expected = set(model.state_dict())
    for f in files:
        for key, tensor in _file_tensors(f, device):
            if key not in expected:
                raise ModelLoadError(f"checkpoint has a tensor the model lacks: {key}")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner)
            if attr in module._parameters:
                grad = tensor.is_floating_point()
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=grad)
            else:
                module._buffers[attr] = tensor
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelLoadError(f"checkpoint lacks tensors for {still_meta[:5]}")


def clear_quantization_marks(model: nn.Module) -> nn.Module:
    """After a GGUF load transformers has dequantised the weights but still marks the model as
    quantized, which blocks saving and pruning; clear those marks."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_model(
    path_or_id: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a model from a local directory, a GGUF file, or a hub id → ``(model, tokenizer)``.

    ``dtype``: ``"auto"`` (default) keeps the checkpoint's own dtype (bf16 stays bf16); a
    dequantised GGUF model is float32 unless asked. ``device``: ``"auto"`` (CUDA when available),
    ``"cpu"``, ``"cuda"``, ``"cuda:N"``; ``None`` leaves it on the CPU. ``device_map="auto"`` with
    ``max_memory`` spreads a model larger than one device (CPU/disk offload, accelerate).
    ``gguf_file`` is a file name inside ``path_or_id`` (or a path to the ``.gguf`` file itself);
    transformers' quantization marks are cleared. Pickled ``.bin`` checkpoints are refused
    unless ``allow_pickle=True``. Bad ``device`` / ``dtype`` values fail before any loading.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path_or_id)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    placed = resolve_device(device) if device is not None else None
    check_device_map(device_map, max_memory)
    if gguf_file is not None:
        gguf = Path(gguf_file) if Path(gguf_file).is_absolute() else path / gguf_file
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {gguf} does not exist")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=resolve_dtype(dtype, gguf=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        get_adapter(model)  # fail early on an unsupported architecture
        model = clear_quantization_marks(model)
        if device_map is not None:
            model = _dispatch(model, device_map, max_memory)
        elif placed is not None:
            model = model.to(placed)
        return model.eval(), tokenizer
    kwargs = dict(device_map=device_map, max_memory=max_memory, allow_pickle=allow_pickle)
    if path.exists():
        return load_pretrained(
            path, dtype=dtype, device=placed, attn_implementation=attn_implementation, **kwargs
        )
    return _load_hub(str(path_or_id), dtype, placed, **kwargs)


def _load_hub(model_id: str, dtype, device, *, device_map, max_memory, allow_pickle):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_id)
    except OSError as e:
        raise ModelLoadError(
            f"{model_id!r} is neither a local directory nor a reachable hub model ({e}). "
            "Pass a local model directory, or a GGUF file with gguf_file="
        ) from None
    adapter = get_adapter(config)
    model = _model_class(config, adapter).from_pretrained(
        model_id,
        dtype="auto" if dtype in (None, "auto") else resolve_dtype(dtype),
        use_safetensors=not allow_pickle,
        device_map=device_map or ({"": device} if device is not None else None),
        max_memory=max_memory,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    return model.eval(), tokenizer
