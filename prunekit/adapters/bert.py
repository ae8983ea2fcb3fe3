"""BERT encoders (and BERT-layout models such as all-MiniLM): post-norm, multi-head attention
(every query head is its own KV group), GELU MLP. BERT's config has no ``head_dim``: the head
size is ``hidden_size // num_attention_heads``, so once heads are removed the result is saved
in the per-layer format (global head count kept, per-layer counts in ``per_layer_config``)."""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import Adapter
from prunekit.hookspecs import hookimpl


class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert",)
    causal = False
    gated = False
    explicit_head_dim = False
    config_keys = {
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "",
        "intermediate": "intermediate_size",
    }

    def _encoder(self, model: nn.Module) -> nn.Module:
        base = getattr(model, "bert", model)
        return base.encoder

    def layers(self, model):
        return self._encoder(model).layer

    def set_layers(self, model, layers):
        self._encoder(model).layer = layers

    def attention(self, layer):
        return layer.attention.self

    def qkv_projections(self, layer):
        a = layer.attention.self
        return a.query, a.key, a.value

    def head_output_projection(self, layer):
        return layer.attention.output.dense

    def mlp_input_projections(self, layer):
        return [layer.intermediate.dense]

    def neuron_output_projection(self, layer):
        return layer.output.dense

    def head_dim(self, layer):
        return int(layer.attention.self.attention_head_size)

    def set_head_counts(self, attn, n_heads, n_kv_heads, head_dim):
        attn.num_attention_heads = n_heads
        attn.all_head_size = n_heads * head_dim


@hookimpl
def register_adapters(register):
    register(BertAdapter())
