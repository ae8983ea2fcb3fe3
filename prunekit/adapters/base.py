"""Architecture adapters: where an architecture keeps its layers, heads and MLP neurons.

An adapter never name-sniffs modules: it knows the attribute paths of its architecture. All
slicing goes through :meth:`Adapter.slice_projection` (by default
:func:`prunekit.adapters.slicing.slice_linear`); an architecture whose projections are not in
``nn.Linear`` layout overrides :meth:`Adapter.linear_weight`, :meth:`Adapter.in_features`,
:meth:`Adapter.out_features` and :meth:`Adapter.slice_projection`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from prunekit.adapters.slicing import Dim, head_rows, slice_linear
from prunekit.adapters.subblocks import RemovedAttention, RemovedMLP
from prunekit.contracts import NoOptions
from prunekit.core.shapes import LayerShape, config_global
from prunekit.hookspecs import hookimpl


def config_key_names(
    n_layers: str, n_heads: str, intermediate: str, n_kv_heads: str = ""
) -> dict[str, str]:
    """:attr:`Adapter.config_keys` from an architecture's config attribute names; an empty
    ``n_kv_heads`` means multi-head attention (no separate KV head count)."""
    return {
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "intermediate": intermediate,
    }


class Adapter:
    """Base class of architecture adapters. Subclasses set ``name`` and ``model_types`` and the
    attribute-path methods; the slicing logic is shared."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: the plugin contract (prunekit.contracts): adapters take no options
    config_class: ClassVar[type] = NoOptions
    #: whether the model is a causal decoder (has a KV cache, generates)
    causal: ClassVar[bool] = True
    #: whether the MLP has a gate projection (SwiGLU) or a single input projection
    gated: ClassVar[bool] = True
    #: whether the config has an explicit ``head_dim`` so head counts can change in a stock config
    explicit_head_dim: ClassVar[bool] = True
    #: whether the config class insists on ``hidden_size % num_attention_heads == 0`` even with
    #: an explicit ``head_dim`` (then other head counts need the per-layer format)
    heads_divide_hidden: ClassVar[bool] = False
    #: config keys for the layer count and the per-layer sizes
    config_keys: ClassVar[dict[str, str]] = config_key_names(
        "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_key_value_heads"
    )
    #: attribute of :meth:`layer_container` that holds the ``nn.ModuleList`` of layers
    layers_attr: ClassVar[str] = "layers"
    #: pre-norm layer attributes ``(attention, its norm, MLP, its norm)`` for sub-block removal
    #: (a plan's ``attention`` / ``mlp``); empty: the architecture does not support it
    subblock_attrs: ClassVar[tuple[str, str, str, str] | tuple[()]] = ()

    def available(self) -> tuple[bool, str]:
        return True, ""

    # ---- where things live (override per architecture) ---------------------------------
    def layer_container(self, model: nn.Module) -> nn.Module:
        """The module whose ``layers_attr`` attribute is the list of transformer layers."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.layer_container(model), self.layers_attr)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        setattr(self.layer_container(model), self.layers_attr, layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a layer (holds head-count attributes and ``layer_idx``)."""
        raise NotImplementedError

    def qkv_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def head_output_projection(self, layer: nn.Module) -> nn.Module:
        """Projection whose *input* features are the concatenated head outputs (o_proj)."""
        raise NotImplementedError

    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Module]:
        """Projections whose *output* features are the MLP neurons (gate, up)."""
        raise NotImplementedError

    def neuron_output_projection(self, layer: nn.Module) -> nn.Module:
        """Projection whose *input* features are the MLP neurons (down)."""
        raise NotImplementedError

    def head_dim(self, layer: nn.Module) -> int:
        return int(self.attention(layer).head_dim)

    # ---- projections (override for weights not in nn.Linear layout) -------------------
    def linear_weight(self, module: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """A projection's weight (or ``tensor``, a tensor of the weight's shape such as its
        gradient) in ``nn.Linear`` layout ``[out, in]``."""
        return module.weight if tensor is None else tensor

    def out_features(self, module: nn.Module) -> int:
        """Output feature count of a projection. Read from ``out_features`` when the module
        has it (quantized linears keep ``qweight`` and no ``weight``)."""
        n = getattr(module, "out_features", None)
        return int(n) if n is not None else int(self.linear_weight(module).shape[0])

    def in_features(self, module: nn.Module) -> int:
        """Input feature count of a projection (``in_features`` when the module has it)."""
        n = getattr(module, "in_features", None)
        return int(n) if n is not None else int(self.linear_weight(module).shape[1])

    def slice_projection(self, module: nn.Module, keep: torch.Tensor | list[int], dim: Dim):
        """Keep features ``keep`` of a projection on its output (``"out"``) or input (``"in"``)
        side, in place."""
        slice_linear(module, keep, dim)

    def head_features(self, layer: nn.Module, heads: torch.Tensor | list[int]) -> torch.Tensor:
        """Input features of :meth:`head_output_projection` that carry the outputs of
        query heads ``heads``."""
        return head_rows(heads, self.head_dim(layer))

    # ---- geometry ----------------------------------------------------------------------
    def layer_shape(self, layer: nn.Module) -> LayerShape:
        """Read a layer's shape from its modules (not from the config); a removed sub-block
        counts 0 heads / 0 neurons."""
        d = self.head_dim(layer)
        n_heads = n_kv = 0
        if self.has_attention(layer):
            q, k, _ = self.qkv_projections(layer)
            n_heads, n_kv = self.out_features(q) // d, self.out_features(k) // d
        return LayerShape(
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=d,
            intermediate=(
                self.in_features(self.neuron_output_projection(layer)) if self.has_mlp(layer) else 0
            ),
        )

    # ---- sub-blocks --------------------------------------------------------------------
    def has_attention(self, layer: nn.Module) -> bool:
        return not isinstance(self.attention(layer), RemovedAttention)

    def has_mlp(self, layer: nn.Module) -> bool:
        return not (
            self.subblock_attrs and isinstance(getattr(layer, self.subblock_attrs[2]), RemovedMLP)
        )

    def _subblock_attrs(self) -> tuple[str, str, str, str]:
        if not self.subblock_attrs:
            raise NotImplementedError(
                f"the {self.name} adapter does not support removing attention/MLP sub-blocks "
                "(pre-norm decoders do); remove whole layers instead"
            )
        return self.subblock_attrs  # type: ignore[return-value]

    def remove_attention(self, layer: nn.Module) -> None:
        """Replace the attention sub-block and its norm by no-ops (the residual path stays)."""
        attn, norm, _, _ = self._subblock_attrs()
        index = getattr(self.attention(layer), "layer_idx", getattr(layer, "layer_idx", -1))
        setattr(layer, attn, RemovedAttention(index, self.head_dim(layer)))
        setattr(layer, norm, nn.Identity())

    def remove_mlp(self, layer: nn.Module) -> None:
        """Replace the MLP sub-block and its norm by no-ops (the residual path stays)."""
        _, _, mlp, norm = self._subblock_attrs()
        setattr(layer, mlp, RemovedMLP())
        setattr(layer, norm, nn.Identity())

    def shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.layer_shape(layer) for layer in self.layers(model)]

    # ---- surgery -----------------------------------------------------------------------
    def slice_heads(self, layer: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
        """Keep query heads ``keep_q`` and KV heads ``keep_kv`` (already validated for GQA)."""
        d = self.head_dim(layer)
        q, k, v = self.qkv_projections(layer)
        self.slice_projection(q, head_rows(keep_q, d), "out")
        for proj in (k, v) if k is not q else ():
            self.slice_projection(proj, head_rows(keep_kv, d), "out")
        self.slice_projection(self.head_output_projection(layer), head_rows(keep_q, d), "in")
        self.set_head_counts(self.attention(layer), len(keep_q), len(keep_kv), d)

    def set_head_counts(self, attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        """Update the attention module's attributes after slicing heads."""
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = n_heads // n_kv_heads
        for attr in ("num_heads", "num_attention_heads"):
            if hasattr(attn, attr):
                setattr(attn, attr, n_heads)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = n_kv_heads

    def slice_neurons(self, layer: nn.Module, keep: list[int]) -> None:
        for proj in self.mlp_input_projections(layer):
            self.slice_projection(proj, keep, "out")
        self.slice_projection(self.neuron_output_projection(layer), keep, "in")

    # ---- streaming surgery (checkpoint tensors, no model) --------------------------------
    def projection_roles(self, layer: nn.Module) -> list[tuple[nn.Module, str]]:
        """The projections :meth:`slice_heads` and :meth:`slice_neurons` cut, with their role:
        ``"q"`` / ``"kv"`` (output side, by query / KV heads), ``"o"`` (input side, by query
        heads), ``"mlp_in"`` (output side, by neurons), ``"mlp_out"`` (input side)."""
        roles = []
        if self.has_attention(layer):
            q, k, v = self.qkv_projections(layer)
            roles += [(q, "q"), *([(k, "kv"), (v, "kv")] if k is not q else [])]
            roles.append((self.head_output_projection(layer), "o"))
        if self.has_mlp(layer):
            roles += [(proj, "mlp_in") for proj in self.mlp_input_projections(layer)]
            roles.append((self.neuron_output_projection(layer), "mlp_out"))
        return roles

    def state_key_roles(self, model: nn.Module) -> dict[str, tuple[int, str]]:
        """Map every per-layer state-dict key of ``model`` to ``(layer index, role)``: the
        :meth:`projection_roles` role of its module, or ``"layer"`` for a tensor surgery only
        renumbers or drops (norms). Keys outside the layers are absent."""
        names = {id(m): name for name, m in model.named_modules()}
        out: dict[str, tuple[int, str]] = {}
        for i, layer in enumerate(self.layers(model)):
            prefix = names[id(layer)]
            for key in layer.state_dict():
                out[f"{prefix}.{key}"] = (i, "layer")
            for module, role in self.projection_roles(layer):
                for pname, _ in module.named_parameters(recurse=False):
                    out[f"{names[id(module)]}.{pname}"] = (i, role)
        return out

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        attn = self.attention(layer)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        """Cut a freshly built layer down to ``shape`` (used by the per-layer loader)."""
        if not shape.has_attention and self.has_attention(layer):
            self.remove_attention(layer)
        if not shape.has_mlp and self.has_mlp(layer):
            self.remove_mlp(layer)
        current = self.layer_shape(layer)
        if shape.head_dim != current.head_dim:
            raise ValueError(f"head_dim {shape.head_dim} != built head_dim {current.head_dim}")
        if shape.has_attention and (shape.n_heads, shape.n_kv_heads) != (
            current.n_heads,
            current.n_kv_heads,
        ):
            per_group = shape.n_heads // shape.n_kv_heads
            keep_q = [
                g * current.group_size + i
                for g in range(shape.n_kv_heads)
                for i in range(per_group)
            ]
            self.slice_heads(layer, keep_q, list(range(shape.n_kv_heads)))
        if shape.has_mlp and shape.intermediate != current.intermediate:
            self.slice_neurons(layer, list(range(shape.intermediate)))

    # ---- config ------------------------------------------------------------------------
    def stock_expressible(self, shapes: list[LayerShape], config: Any) -> bool:
        """Whether a stock config (no per-layer overrides) can describe these shapes."""
        if len(set(shapes)) > 1 or not all(s.has_attention and s.has_mlp for s in shapes):
            return False
        if not shapes:
            return True
        s = shapes[0]
        hidden = config_global(config, "hidden_size")
        if self.explicit_head_dim:
            return not self.heads_divide_hidden or hidden % s.n_heads == 0
        # Without an explicit head_dim the architecture derives it as hidden // n_heads.
        return s.n_heads * s.head_dim == hidden

    def saved_config(self, config: Any) -> Any:
        """The config written to disk for a model with ``config`` (default: ``config``
        itself); an adapter whose stock config class rejects a uniform result returns an
        equivalent config of a class that holds it, with its ``architectures`` set."""
        return config

    def per_layer_overrides(self, shape: LayerShape) -> dict[str, Any]:
        """A layer's ``per_layer_config`` entry; a removed sub-block is a transformers
        ``skip`` entry (``"attention"`` / ``"mlp"``) instead of its sizes."""
        keys = self.config_keys
        out: dict[str, Any] = {}
        if shape.has_attention:
            out[keys["n_heads"]] = shape.n_heads
            if keys.get("n_kv_heads"):
                out[keys["n_kv_heads"]] = shape.n_kv_heads
        if shape.has_mlp:
            out[keys["intermediate"]] = shape.intermediate
        skip = [
            name
            for name, kept in (("attention", shape.has_attention), ("mlp", shape.has_mlp))
            if not kept
        ]
        return {**out, "skip": skip} if skip else out

    def rewrite_config(self, model: nn.Module, kept_layers: list[int] | None = None) -> None:
        """Make ``model.config`` describe the modules: layer count, ``layer_types`` and the
        head / neuron counts (globally when uniform, else as ``per_layer_config``)."""
        config = model.config
        shapes = self.shapes(model)
        config.per_layer_config = None  # clear old overrides before the layer count changes
        if kept_layers is not None:
            layer_types = config_global(config, "layer_types")
            if layer_types is not None:
                config.layer_types = [layer_types[i] for i in kept_layers]
        setattr(config, self.config_keys["n_layers"], len(shapes))
        if self.explicit_head_dim and shapes:
            config.head_dim = shapes[0].head_dim
        if self.stock_expressible(shapes, config):
            if shapes:
                for key, value in self.per_layer_overrides(shapes[0]).items():
                    setattr(config, key, value)
        else:
            config.per_layer_config = {
                i: self.per_layer_overrides(shape) for i, shape in enumerate(shapes)
            }

    def layer_shapes_from_config(self, config: Any) -> list[LayerShape] | None:
        """Per-layer shapes a heterogeneous config asks for (None when homogeneous)."""
        if not getattr(config, "is_heterogeneous", False):
            return None
        keys = self.config_keys
        shapes = []
        for layer_config in config.per_layer_config:
            n_heads = getattr(layer_config, keys["n_heads"])
            n_kv = (
                getattr(layer_config, keys["n_kv_heads"], None) if keys.get("n_kv_heads") else None
            )
            skip = set(getattr(layer_config, "skip", None) or ())
            shape = LayerShape(
                n_heads=n_heads,
                n_kv_heads=n_kv or n_heads,
                head_dim=self.config_head_dim(config),
                intermediate=getattr(layer_config, keys["intermediate"]),
            )
            shapes.append(shape.without(attention="attention" in skip, mlp="mlp" in skip))
        return shapes

    def config_shapes(self, config: Any) -> list[LayerShape]:
        """Per-layer shapes a config describes (uniform or per-layer), without building the
        model: lets a plan be validated before any weight is loaded."""
        shapes = self.layer_shapes_from_config(config)
        if shapes is not None:
            return shapes
        keys = self.config_keys
        n_heads = config_global(config, keys["n_heads"])
        n_kv = config_global(config, keys["n_kv_heads"]) if keys.get("n_kv_heads") else None
        shape = LayerShape(
            n_heads=n_heads,
            n_kv_heads=n_kv or n_heads,
            head_dim=self.config_head_dim(config),
            intermediate=config_global(config, keys["intermediate"]),
        )
        return [shape] * config_global(config, keys["n_layers"])

    def config_head_dim(self, config: Any) -> int:
        head_dim = config_global(config, "head_dim")
        if head_dim:
            return int(head_dim)
        return config_global(config, "hidden_size") // config_global(
            config, self.config_keys["n_heads"]
        )


class DecoderAdapter(Adapter):
    """Llama-style decoder: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and
    ``.mlp.{gate,up,down}_proj``. Works for ``*ForCausalLM`` and the bare ``*Model``."""

    def layer_container(self, model: nn.Module) -> nn.Module:
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def qkv_projections(self, layer):
        a = layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def head_output_projection(self, layer):
        return layer.self_attn.o_proj

    def mlp_input_projections(self, layer):
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def neuron_output_projection(self, layer):
        return layer.mlp.down_proj

    subblock_attrs = ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")


def adapter_hook(*adapters: type[Adapter]) -> Callable[[Callable[[Any], None]], None]:
    """A ``register_adapters`` hook implementation that registers one instance of each class
    in ``adapters``; a built-in adapter module ends with
    ``register_adapters = adapter_hook(MyAdapter)``."""

    @hookimpl(specname="register_adapters")
    def register_adapters(register: Callable[[Any], None]) -> None:
        for cls in adapters:
            register(cls())

    return register_adapters


__all__ = ["Adapter", "DecoderAdapter", "adapter_hook", "config_key_names"]
