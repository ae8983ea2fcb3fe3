"""Real offline models (slow): SmolLM2-135M from its Q4_1 GGUF and all-MiniLM-L6-v2.

The units removed here are picked by a few lines of calibration statistics on a Brown slice
(block influence for layers, per-KV-group output norm for heads, activation x weight norm for
neurons), not by prunekit's scorers, so this file checks surgery and save/load on a real
model independently of the scoring code.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python

from prunekit import (
    PrunePlan,
    apply_plan,
    get_adapter,
    load_model,
    load_pretrained,
    save_pretrained,
)
from prunekit.core.data import brown_path
from prunekit.core.models import default_model_dir, minilm_dir, smollm2_gguf

pytestmark = pytest.mark.slow


def calibration_plan(model, ids: torch.Tensor, n_layers: int, neuron_frac: float) -> PrunePlan:
    """Drop the n_layers lowest-BI layers (first/last protected), the weakest KV group of
    every other layer, and the weakest neuron_frac of each MLP."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    shape = adapter.layer_shape(layers[0])
    group_width = shape.group_size * shape.head_dim
    act, group_norm, hooks = {}, {}, []
    for i, layer in enumerate(layers):

        def on_down(m, args, i=i):
            act[i] = act.get(i, 0) + args[0].abs().sum((0, 1))

        def on_o(m, args, i=i):
            x = args[0].unflatten(-1, (shape.n_kv_heads, group_width))
            w = m.weight.unflatten(1, (shape.n_kv_heads, group_width))
            out = torch.einsum("btgd,hgd->btgh", x, w).norm(dim=-1).sum((0, 1))
            group_norm[i] = group_norm.get(i, 0) + out

        hooks.append(adapter.neuron_output_projection(layer).register_forward_pre_hook(on_down))
        hooks.append(adapter.head_output_projection(layer).register_forward_pre_hook(on_o))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    bi = [
        1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean() for i in range(len(layers))
    ]
    drop = sorted(sorted(range(1, len(layers) - 1), key=lambda i: bi[i])[:n_layers])
    heads, neurons = {}, {}
    n_neurons = int(shape.intermediate * neuron_frac)
    for i, layer in enumerate(layers):
        if i in drop:
            continue
        g = int(group_norm[i].argmin())
        heads[i] = list(range(g * shape.group_size, (g + 1) * shape.group_size))
        weight = adapter.neuron_output_projection(layer).weight.norm(dim=0)
        neurons[i] = (act[i] * weight).argsort()[:n_neurons].tolist()
    return PrunePlan(layers=drop, heads=heads, neurons=neurons)


@pytest.fixture(scope="module")
def brown_ids():
    return brown_path().read_text(encoding="utf-8")[:20_000]


def test_smollm2_gguf_pruned_uniformly_reloads_in_stock_transformers(tmp_path, brown_ids):
    assert smollm2_gguf().suffix == ".gguf"
    model, tok = load_model(default_model_dir())  # fp32 copy of the GGUF, cached
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    calib = tok(brown_ids, return_tensors="pt").input_ids[:, :1024].view(4, 256)
    plan = calibration_plan(model, calib, n_layers=4, neuron_frac=0.25)
    apply_plan(model, plan)

    config = model.config
    assert config.num_hidden_layers == 26 and not config.is_heterogeneous
    assert (config.num_attention_heads, config.num_key_value_heads) == (6, 2)
    assert (config.head_dim, config.intermediate_size) == (64, 1152)
    out = save_pretrained(model, tmp_path / "pruned", tok)

    ids = tok("The history of the city begins in", return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    run_python(
        f"""
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "l.pt")!r})
assert "prunekit" not in sys.modules
"""
    )
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), expected, atol=1e-4, rtol=0)

    # Still writes English: nearly every generated word is a word Brown uses.
    prompt = tok(
        "The history of the city begins in the early nineteenth century, when", return_tensors="pt"
    ).input_ids
    text = tok.decode(
        model.generate(prompt, max_new_tokens=40, do_sample=False)[0, prompt.shape[1] :]
    )
    words = re.findall(r"[A-Za-z]+", text)
    vocabulary = set(re.findall(r"[a-z]+", brown_path().read_text(encoding="utf-8").lower()))
    known = sum(w.lower() in vocabulary for w in words)
    assert len(words) >= 20 and known / len(words) >= 0.9, text
    assert len({w.lower() for w in words}) >= 5, text  # not one word repeated


def test_minilm_head_pruning_reloads_and_keeps_embeddings(tmp_path):
    from transformers import AutoModel

    dense = AutoModel.from_pretrained(minilm_dir()).eval()
    model, tok = load_model(minilm_dir())
    adapter = get_adapter(model)
    # The two heads of each layer with the smallest output-projection columns.
    heads = {}
    for i, layer in enumerate(adapter.layers(model)):
        w = adapter.head_output_projection(layer).weight  # [hidden, heads * head_dim]
        norms = w.unflatten(1, (12, -1)).norm(dim=(0, 2))
        heads[i] = norms.argsort()[:2].tolist()
    apply_plan(model, PrunePlan(heads=heads, neurons={i: list(range(64)) for i in range(6)}))
    out = save_pretrained(model, tmp_path / "minilm", tok)
    reloaded, tok2 = load_pretrained(out)
    sentences = [
        "A man is eating food.",
        "The cat sleeps on the warm windowsill.",
        "Stock markets fell sharply on Monday.",
    ]
    batch = tok2(sentences, padding=True, return_tensors="pt")

    def pooled(m):
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return (h * mask).sum(1) / mask.sum(1)

    torch.testing.assert_close(pooled(reloaded), pooled(model), atol=1e-5, rtol=0)
    cos = F.cosine_similarity(pooled(reloaded), pooled(dense), dim=-1)
    assert cos.min() > 0.8, cos
