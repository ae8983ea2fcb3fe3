"""BERT encoders (and BERT-layout models such as all-MiniLM): post-norm, multi-head attention
(every query head is its own KV group), GELU MLP. BERT's config has no ``head_dim``: the head
size is ``hidden_size // num_attention_heads``, so once heads are removed the result is saved
in the per-layer format (global head count kept, per-layer counts in ``per_layer_config``)."""

from __future__ import annotations

from torch import nn

from prunekit.adapters.base import Adapter, adapter_hook, config_key_names


class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert",)
    causal = False
    gated = False
    explicit_head_dim = False
    config_keys = config_key_names("num_hidden_layers", "num_attention_heads", "intermediate_size")
    layers_attr = "layer"

    def layer_container(self, model: nn.Module) -> nn.Module:
        return getattr(model, "bert", model).encoder

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


register_adapters = adapter_hook(BertAdapter)
