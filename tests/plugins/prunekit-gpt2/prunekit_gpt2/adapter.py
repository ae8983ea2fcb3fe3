"""GPT-2 adapter: ``transformer.h[i].attn.{c_attn,c_proj}`` and ``.mlp.{c_fc,c_proj}``.

What makes GPT-2 differ from the built-in adapters:

- Every projection is a transformers ``Conv1D`` (weight stored ``[in, out]``, attributes ``nf``
  = out and ``nx`` = in): the adapter overrides ``linear_weight``, ``out_features``,
  ``in_features`` and ``slice_projection``, so prunekit's core never meets that layout.
- Query, key and value come from ONE fused projection ``c_attn`` whose output columns are
  ``[q | k | v]``, each ``n_heads * head_dim`` wide and head-major; ``GPT2Attention.forward``
  splits it with ``split_size``. Removing heads therefore keeps the same head columns in each
  of the three segments, then sets ``split_size`` and ``num_heads``.
- Multi-head attention: every query head is its own KV group.
- The config (``n_layer``, ``n_head``, ``n_inner``) has no ``head_dim``: the head size is
  ``n_embd // n_head``. As for BERT, a model with heads removed is saved in the per-layer format
  (global ``n_head`` kept, per-layer counts in ``per_layer_config``) and loads with
  ``prunekit.load_pretrained``; a model with only layers and/or a uniform number of neurons
  removed gets a stock config that plain ``AutoModelForCausalLM.from_pretrained`` loads.
- ``n_inner`` may be ``None`` (meaning ``4 * n_embd``); the rewritten config always states it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunekit.adapters.base import Adapter, config_key_names
from prunekit.adapters.slicing import Dim, check_dim, head_rows, slice_weight
from prunekit.core.shapes import LayerShape, config_global
from prunekit.errors import PruningPlanError


class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)
    gated = False
    explicit_head_dim = False
    config_keys = config_key_names("n_layer", "n_head", "n_inner")  # MHA: no KV head count
    layers_attr = "h"

    # ---- where things live ---------------------------------------------------------------
    def layer_container(self, model: nn.Module) -> nn.Module:
        """``GPT2LMHeadModel`` (and the other heads) keep the body in ``.transformer``; the bare
        ``GPT2Model`` is the body."""
        body = getattr(model, "transformer", None)
        return body if body is not None and hasattr(body, "h") else model

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def qkv_projections(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The fused ``c_attn`` three times: q, k and v are column segments of one Conv1D."""
        c_attn = layer.attn.c_attn
        return c_attn, c_attn, c_attn

    def head_output_projection(self, layer: nn.Module) -> nn.Module:
        return layer.attn.c_proj

    def mlp_input_projections(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.mlp.c_fc]

    def neuron_output_projection(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def head_dim(self, layer: nn.Module) -> int:
        return int(layer.attn.head_dim)

    # ---- Conv1D projections (lm_head stays an nn.Linear) -----------------------------------
    def linear_weight(self, module: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Conv1D stores ``[in, out]``: transpose to ``nn.Linear``'s ``[out, in]``."""
        if not isinstance(module, Conv1D):
            return super().linear_weight(module, tensor)
        return (module.weight if tensor is None else tensor).t()

    def out_features(self, module: nn.Module) -> int:
        return int(module.nf) if isinstance(module, Conv1D) else super().out_features(module)

    def in_features(self, module: nn.Module) -> int:
        return int(module.nx) if isinstance(module, Conv1D) else super().in_features(module)

    def slice_projection(self, module: nn.Module, keep: torch.Tensor | list[int], dim: Dim):
        """Slice a Conv1D: output features are weight columns (and the bias), input features
        weight rows; ``nf`` / ``nx`` follow."""
        if not isinstance(module, Conv1D):
            return super().slice_projection(module, keep, dim)
        check_dim(dim)
        n = slice_weight(module, keep, 1 if dim == "out" else 0, slice_bias=dim == "out")
        setattr(module, "nf" if dim == "out" else "nx", n)

    # ---- geometry ------------------------------------------------------------------------
    def layer_shape(self, layer: nn.Module) -> LayerShape:
        d = self.head_dim(layer)
        qkv_width = self.out_features(layer.attn.c_attn)
        if qkv_width % (3 * d):
            raise ValueError(f"c_attn width {qkv_width} is not 3 * n_heads * head_dim ({d})")
        n_heads = qkv_width // (3 * d)
        return LayerShape(
            n_heads=n_heads,
            n_kv_heads=n_heads,
            head_dim=d,
            intermediate=self.in_features(layer.mlp.c_proj),
        )

    # ---- surgery -------------------------------------------------------------------------
    def slice_heads(self, layer: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
        """Keep heads ``keep_q`` (MHA, so ``keep_kv == keep_q``) in the fused ``c_attn``: the
        same head columns of its q, k and v segments; then the matching input rows of
        ``c_proj``."""
        if list(keep_kv) != list(keep_q):
            raise ValueError("GPT-2 is multi-head attention: keep_kv must equal keep_q")
        attn = layer.attn
        shape = self.layer_shape(layer)
        d, width = shape.head_dim, shape.n_heads * shape.head_dim
        rows = head_rows(keep_q, d)
        fused = torch.cat([rows, rows + width, rows + 2 * width])
        self.slice_projection(attn.c_attn, fused, "out")
        self.slice_projection(attn.c_proj, rows, "in")
        self.set_head_counts(attn, len(keep_q), len(keep_kv), d)

    def set_head_counts(self, attn: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int):
        """``forward`` splits ``c_attn``'s output at ``split_size`` and views heads of
        ``head_dim``; ``embed_dim`` is the model width (input of ``c_attn``, output of
        ``c_proj``) and does not change; ``scaling`` depends on ``head_dim`` only."""
        attn.num_heads = n_heads
        attn.split_size = n_heads * head_dim

    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        attn = layer.attn
        if attn.layer_idx != index and getattr(attn, "scale_attn_by_inverse_layer_idx", False):
            # The attention scale is 1 / (layer_idx + 1) and is recomputed from the new index
            # when the saved model is rebuilt, so the result would silently change.
            raise PruningPlanError(
                "this GPT-2 uses scale_attn_by_inverse_layer_idx, whose scaling depends on the "
                f"layer index; removing a layer before layer {attn.layer_idx} would change it. "
                "Remove only trailing layers, or prune heads and neurons instead",
                entry="layers",
            )
        attn.layer_idx = index
        cross = getattr(layer, "crossattention", None)
        if cross is not None:  # indexes the cross-attention cache of an EncoderDecoderCache
            cross.layer_idx = index

    # ---- config --------------------------------------------------------------------------
    def rewrite_config(self, model: nn.Module, kept_layers: list[int] | None = None) -> None:
        config = model.config
        if config_global(config, "n_inner") is None:
            # State the implicit default so per-layer overrides are compared with a number.
            config.n_inner = 4 * config_global(config, "n_embd")
        super().rewrite_config(model, kept_layers)

    def layer_shapes_from_config(self, config: Any) -> list[LayerShape] | None:
        shapes = super().layer_shapes_from_config(config)
        if shapes is None:
            return None
        default = 4 * config_global(config, "n_embd")
        return [
            LayerShape(s.n_heads, s.n_kv_heads, s.head_dim, s.intermediate or default)
            for s in shapes
        ]
