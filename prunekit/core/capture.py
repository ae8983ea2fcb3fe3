"""Capture engine: feeds scorers the tensors they need from as few passes as possible.

Forward-only scorers get :class:`Accumulator` objects whose callbacks see, one batch at a time,

- ``on_weights(i, layer)``: once per layer, with the layer's weights in memory;
- ``on_layer_io(i, x_in, x_out, rows)``: hidden state entering and leaving layer ``i``
  (``[B, S, H]``) for calibration rows ``rows`` (a slice of the sample index);
- ``on_head_inputs(i, z, layer)``: the concatenated head outputs entering the output
  projection (``[B, S, n_heads * head_dim]``);
- ``on_neuron_inputs(i, a, layer)``: the MLP activations entering the down projection
  (``[B, S, intermediate]``);
- ``end_batch()`` after each batch in normal mode.

Accumulators keep running sums, never the per-token tensors of more than the current batch.

Two modes give the same numbers (up to fp32 summation order):

- **normal** (:func:`capture`): one forward pass of the whole model per batch, hooks on every
  layer;
- **sequential** (:func:`capture_sequential`): the embeddings' output for *all* samples first,
  then layer by layer -- each layer runs on every sample before the next one starts. Given a
  model *directory*, only the non-layer weights are loaded up front; each layer's weights are
  read from the safetensors files when its turn comes and dropped afterwards, so peak memory
  is about one layer plus the activations of the calibration set.

Gradient scorers (``on_gradients(i, layer)``, called after each batch's backward pass with the
layer's ``.grad`` filled in) run through :func:`capture_gradients`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.shapes import LayerShape

TAPS = ("weights", "layer_io", "head_inputs", "neuron_inputs", "gradients")


class Accumulator:
    """Base class of streaming scorer state. Subclasses set ``taps`` and override callbacks."""

    taps: frozenset[str] = frozenset()

    def on_weights(self, i: int, layer: nn.Module) -> None:
        pass

    def on_layer_io(self, i: int, x_in: torch.Tensor, x_out: torch.Tensor, rows: slice) -> None:
        pass

    def on_head_inputs(self, i: int, z: torch.Tensor, layer: nn.Module) -> None:
        pass

    def on_neuron_inputs(self, i: int, a: torch.Tensor, layer: nn.Module) -> None:
        pass

    def on_gradients(self, i: int, layer: nn.Module) -> None:
        pass

    def end_batch(self) -> None:
        pass

    def result(self) -> Any:
        raise NotImplementedError


@dataclass
class Context:
    """What a scorer may know about the model being scored."""

    adapter: Any
    shapes: list[LayerShape]
    n_samples: int
    seq_len: int
    sequential: bool
    causal: bool

    @property
    def n_layers(self) -> int:
        return len(self.shapes)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _input_hook(accs: Sequence[Accumulator], tap: str, i: int, layer: nn.Module):
    """A forward pre-hook passing a projection's input to ``on_<tap>(i, x, layer)``."""
    callbacks = [getattr(a, f"on_{tap}") for a in accs]

    def hook(module, args):
        for callback in callbacks:
            callback(i, args[0], layer)

    return hook


@contextlib.contextmanager
def _layer_hooks(
    adapter: Any, layers: Sequence[tuple[int, nn.Module]], accs: Sequence[Accumulator], state: dict
) -> Iterator[None]:
    """Install the hooks the accumulators need on ``layers`` (index, module) pairs.
    ``state["rows"]`` tells the layer-io hook which calibration rows the batch holds."""
    handles = []
    wants = {t: [a for a in accs if t in a.taps] for t in TAPS}
    try:
        for i, layer in layers:
            if wants["layer_io"]:

                def io_hook(module, args, kwargs, output, _i=i):
                    x_in, x_out = _hidden(args, kwargs), _first(output)
                    for a in wants["layer_io"]:
                        a.on_layer_io(_i, x_in, x_out, state["rows"])

                handles.append(layer.register_forward_hook(io_hook, with_kwargs=True))
            for tap, projection, present in (
                ("head_inputs", adapter.head_output_projection, adapter.has_attention),
                ("neuron_inputs", adapter.neuron_output_projection, adapter.has_mlp),
            ):
                if wants[tap] and present(layer):
                    hook = _input_hook(wants[tap], tap, i, layer)
                    handles.append(projection(layer).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _tqdm(it, *, progress: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(it, disable=not progress, desc=desc, total=total, leave=False)


@torch.no_grad()
def capture(
    model: nn.Module,
    samples: torch.Tensor,
    accs: Sequence[Accumulator],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """Normal mode: one forward pass of the base model (no LM head) per batch."""
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    layers = list(enumerate(adapter.layers(model)))
    for i, layer in layers:
        with _aligned(layer):
            for a in accs:
                if "weights" in a.taps:
                    a.on_weights(i, layer)
    if not any(a.taps & {"layer_io", "head_inputs", "neuron_inputs"} for a in accs):
        return
    device = _device(model)
    base = model.base_model
    state: dict[str, Any] = {}
    with _layer_hooks(adapter, layers, accs, state):
        for rows in _tqdm(_batches(len(samples), batch_size), progress=progress, desc="capture"):
            state["rows"] = rows
            base(input_ids=samples[rows].to(device), **_call_kwargs(base))
            for a in accs:
                a.end_batch()


@contextlib.contextmanager
def _aligned(module: nn.Module) -> Iterator[None]:
    """Weights a ``device_map`` offloaded to CPU or disk (accelerate) are on the meta device
    outside a forward call; bring them in for weight-reading scorers."""
    with contextlib.ExitStack() as stack:
        if any(p.is_meta for p in module.parameters()):
            from accelerate.utils import align_module_device, has_offloaded_params

            for m in module.modules():
                if has_offloaded_params(m):
                    stack.enter_context(align_module_device(m))
        yield


def _call_kwargs(base: nn.Module) -> dict[str, Any]:
    return {"use_cache": False} if getattr(base.config, "use_cache", None) is not None else {}


# ---- sequential mode -------------------------------------------------------------------------
class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a layer during the recording pass: keeps the arguments the model passes
    to that layer (masks, position embeddings) and returns the hidden state unchanged."""

    def __init__(self, layer: nn.Module, store: list, last: bool):
        super().__init__()
        for attr in ("attention_type", "layer_idx"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self._store = store
        self._last = last

    def forward(self, *args, **kwargs):
        hidden = _hidden(args, kwargs)
        rest = args[1:] if args else ()
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self._store.append((hidden, rest, kwargs))
        if self._last:
            raise _Stop
        return hidden


class _LayerLoader:
    """Reads one layer's tensors from a model directory's safetensors files on demand.

    Each read opens the file, copies the tensors out and closes it again: an open
    ``safe_open`` handle keeps the file memory-mapped, and every page read through it would
    stay in the process's resident set until the end, i.e. the whole model by the last layer.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            from prunekit.errors import ModelLoadError

            raise ModelLoadError(
                f"{path} has no *.safetensors files; sequential scoring reads weights from "
                "safetensors (re-save the model with prunekit.save_pretrained)"
            )
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def get_many(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self._where[k], []).append(k)
        out = {}
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in names:
                    out[k] = h.get_tensor(k).clone()
        return out

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype | None) -> None:
        state = {}
        names = list(module.state_dict().keys())
        for name in names:
            key = f"{prefix}{name}"
            if key not in self._where:
                from prunekit.errors import ModelLoadError

                raise ModelLoadError(f"checkpoint lacks tensor {key}")
        tensors = self.get_many([f"{prefix}{name}" for name in names])
        for name in names:
            t = tensors[f"{prefix}{name}"]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[name] = t
        module.load_state_dict(state, strict=True, assign=True)


def _skeleton(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, _LayerLoader, dict]:
    """A model with empty (meta) layers and real non-layer weights of the base model."""
    from accelerate import init_empty_weights

    from prunekit.core.io import _model_class, read_config
    from prunekit.plugins import get_adapter

    config = read_config(path)
    adapter = get_adapter(config)
    shapes = adapter.layer_shapes_from_config(config)
    overrides = json.loads((path / "config.json").read_text()).get("per_layer_config")
    if shapes is not None:
        config.per_layer_config = None
    with init_empty_weights(include_buffers=False):
        model = _model_class(config, adapter)._from_config(config)
    if shapes is not None:
        for layer, shape in zip(adapter.layers(model), shapes, strict=True):
            adapter.reshape_layer(layer, shape)
        config.per_layer_config = {int(k): v for k, v in overrides.items()}
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    base_prefix = names[id(model.base_model)]
    base_prefix = f"{base_prefix}." if base_prefix else ""
    layer_prefix = {i: f"{names[id(layer)]}." for i, layer in enumerate(adapter.layers(model))}
    loader = _LayerLoader(path)
    layer_prefixes = tuple(layer_prefix.values())
    state = {}
    wanted = [
        k for k in loader.keys() if k.startswith(base_prefix) and not k.startswith(layer_prefixes)
    ]
    tensors = loader.get_many(wanted)
    for key in wanted:
        t = tensors[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[key[len(base_prefix) :]] = t
    model.base_model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    layer_ids = {id(p) for layer in adapter.layers(model) for p in layer.parameters()}
    missing = [
        n for n, p in model.base_model.named_parameters() if p.is_meta and id(p) not in layer_ids
    ]
    if missing:
        from prunekit.errors import ModelLoadError

        raise ModelLoadError(f"{path}: checkpoint lacks tensors for {missing[:5]}")
    return model, loader, layer_prefix


@torch.no_grad()
def capture_sequential(
    model: nn.Module | str | Path,
    samples: torch.Tensor,
    accs: Sequence[Accumulator],
    *,
    batch_size: int = 8,
    progress: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> None:
    """Sequential mode: all samples through layer 0, then all through layer 1, ...

    ``model`` is a loaded model, or a model directory whose layers are then loaded one at a
    time from its safetensors files (and dropped after use).
    """
    from prunekit.plugins import get_adapter

    loader = None
    if isinstance(model, (str, Path)):
        _return_freed_memory_to_os()
        model, loader, layer_prefix = _skeleton(Path(model), dtype)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    base = model.base_model
    device = _device(model)
    batches = _batches(len(samples), batch_size)

    # 1. recording pass: the embeddings' output and every layer's extra arguments per batch
    stores: list[list] = [[] for _ in layers]
    recorders = nn.ModuleList(
        _Recorder(layer, stores[i], last=(i == len(layers) - 1)) for i, layer in enumerate(layers)
    )
    adapter.set_layers(model, recorders)
    try:
        for rows in batches:
            try:
                base(input_ids=samples[rows].to(device), **_call_kwargs(base))
            except _Stop:
                pass
    finally:
        adapter.set_layers(model, layers)
    hidden = [stores[0][b][0] for b in range(len(batches))]

    # 2. layer by layer
    state: dict[str, Any] = {}
    for i in _tqdm(range(len(layers)), progress=progress, desc="layers", total=len(layers)):
        layer = layers[i]
        if loader is not None:
            loader.load_into(layer, layer_prefix[i], dtype)
        for a in accs:
            if "weights" in a.taps:
                a.on_weights(i, layer)
        with _layer_hooks(adapter, [(i, layer)], accs, state):
            for b, rows in enumerate(batches):
                state["rows"] = rows
                _, rest, kwargs = stores[i][b]
                hidden[b] = _first(layer(hidden[b], *rest, **kwargs))
        stores[i] = []  # this layer's masks / position embeddings are no longer needed
        if loader is not None:
            layer.to("meta")


def _return_freed_memory_to_os() -> None:
    """Make glibc give each dropped layer's memory back to the OS.

    glibc serves blocks below its mmap threshold (which grows with every large free, up to
    32 MiB) from the heap and keeps freed heap memory, so loading and dropping layers one
    after another ratchets the resident set up: on a 1.1B model the peak RSS was 0.69x the
    fp32 weights with the default and 0.27x with a fixed 1 MiB mmap/trim threshold
    (``benchmarks/scoring.py``). Process-wide, as malloc settings are; a no-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, no longer adaptive
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---- gradients -------------------------------------------------------------------------------
def capture_gradients(
    model: nn.Module,
    samples: torch.Tensor,
    accs: Sequence[Accumulator],
    *,
    params: Sequence[nn.Parameter],
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """One forward + backward pass per batch of the language-modelling loss (next-token
    cross-entropy on the calibration tokens); ``on_gradients`` sees each batch's gradients.
    Only ``params`` get gradients (the others are frozen for the duration)."""
    from prunekit.plugins import get_adapter

    adapter = get_adapter(model)
    if not adapter.causal:
        raise ValueError(
            f"gradient scorers need a language-modelling loss; {model.config.model_type} is an "
            "encoder without one -- use a forward-only scorer (magnitude, output_norm, wanda, "
            "activation_frequency)"
        )
    layers = list(enumerate(adapter.layers(model)))
    device = _device(model)
    wanted = {id(p) for p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with torch.enable_grad():
            for rows in _tqdm(
                _batches(len(samples), batch_size), progress=progress, desc="gradients"
            ):
                ids = samples[rows].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                for i, layer in layers:
                    for a in accs:
                        a.on_gradients(i, layer)
                for p in params:
                    p.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None


def read_shapes(path: str | Path) -> list[LayerShape]:
    """Per-layer shapes from a model directory's config (no weights loaded)."""
    from prunekit.core.io import read_config
    from prunekit.plugins import get_adapter

    config = read_config(path)
    return get_adapter(config).config_shapes(config)


def is_model_dir(x: Any) -> bool:
    return isinstance(x, (str, Path)) and (Path(x) / "config.json").is_file()


__all__ = [
    "Accumulator",
    "Context",
    "capture",
    "capture_gradients",
    "capture_sequential",
    "is_model_dir",
    "read_shapes",
]
