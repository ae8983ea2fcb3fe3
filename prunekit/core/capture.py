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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.core.devices import move_real_tensors
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
    """Reads tensors from a model directory's safetensors files on demand, with plain file
    reads (:mod:`prunekit.core.tensorfile`): nothing is memory-mapped, so no page of the
    checkpoint stays in the resident set, and each tensor is read once, straight into its own
    memory (no copy out of a mapping)."""

    def __init__(self, path: Path):
        from prunekit.core.checkpoint import checkpoint_tensors
        from prunekit.errors import ModelLoadError

        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"{path} has no *.safetensors files; sequential scoring reads weights from "
                "safetensors (re-save the model with prunekit.save_pretrained)"
            )
        self._tensors = checkpoint_tensors(path)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Tensor ``key`` (floating tensors cast to ``dtype``) on ``device``."""
        from prunekit.core.tensorfile import read_tensor

        t = read_tensor(self._tensors[key])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t if device is None else t.to(device)

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype | None, device=None):
        names = list(module.state_dict().keys())
        missing = [f"{prefix}{n}" for n in names if f"{prefix}{n}" not in self._tensors]
        if missing:
            from prunekit.errors import ModelLoadError

            raise ModelLoadError(f"checkpoint lacks tensor {missing[0]}")
        state = {name: self.get(f"{prefix}{name}", dtype, device) for name in names}
        module.load_state_dict(state, strict=True, assign=True)


def _skeleton(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, _LayerLoader, dict]:
    """The model of ``path`` on the meta device (:func:`prunekit.core.io.meta_skeleton`, per-layer
    shapes included) with the real non-layer weights of its base model in ``dtype``; each
    layer's weights are read when its turn comes."""
    from prunekit.core.io import meta_skeleton
    from prunekit.plugins import get_adapter

    model = meta_skeleton(path, dtype)
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    base_prefix = names[id(model.base_model)]
    base_prefix = f"{base_prefix}." if base_prefix else ""
    layer_prefix = {i: f"{names[id(layer)]}." for i, layer in enumerate(adapter.layers(model))}
    loader = _LayerLoader(path)
    layer_prefixes = tuple(layer_prefix.values())
    state = {
        k[len(base_prefix) :]: loader.get(k, dtype)
        for k in loader.keys()
        if k.startswith(base_prefix) and not k.startswith(layer_prefixes)
    }
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
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> None:
    """Sequential mode: all samples through layer 0, then all through layer 1, ...

    ``model`` is a loaded model, or a model directory whose layers are then loaded one at a
    time from its safetensors files (and dropped after use) in ``dtype`` (default: the
    checkpoint's own, e.g. bf16 stays bf16, as ``load_model`` loads it) onto ``device``.
    The scorers' statistics accumulate in float32 whatever the dtype.
    """
    from prunekit.plugins import get_adapter

    loader = None
    if isinstance(model, (str, Path)):
        from prunekit.core.checkpoint import checkpoint_tensors, main_dtype
        from prunekit.core.tensorfile import return_freed_memory_to_os

        return_freed_memory_to_os()
        if dtype is None and any(Path(model).glob("*.safetensors")):
            dtype = main_dtype(checkpoint_tensors(model))
        model, loader, layer_prefix = _skeleton(Path(model), dtype)
        if device is not None:  # layers stay meta until each is loaded onto ``device``
            move_real_tensors(model, device)
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
            loader.load_into(layer, layer_prefix[i], dtype, device)
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
