"""Head counts the output format can hold (issue 13).

transformers 5's LlamaConfig rejects ``hidden_size % num_attention_heads != 0`` even with an
explicit ``head_dim``. A Llama-3-8B-shaped model (32 query / 8 KV heads, hidden = 32 *
head_dim) loses 1, 2 or 3 KV groups per layer -> 28, 24, 20 heads, none of which divides the
hidden size. The result must still load in stock transformers (a fresh interpreter that never
imports prunekit) with the pruned model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, run_python

from prunekit import PrunePlan, apply_plan, save_pretrained
from prunekit.adapters.llama import as_mistral_config

ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llama3_shaped(head_dim: int = 4, **kw):
    import transformers as tf

    heads = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": head_dim}
    sizes = {"vocab_size": 96, "hidden_size": 32 * head_dim, "intermediate_size": 96}
    config = tf.LlamaConfig(
        num_hidden_layers=2,
        max_position_embeddings=256,
        rope_parameters=dict(ROPE),
        **heads,
        **sizes,
        tie_word_embeddings=False,
        **kw,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def groups_plan(n_groups: int, n_layers: int = 2) -> PrunePlan:
    """Remove KV groups 1..n_groups (4 query heads each) from every layer."""
    heads = [g * 4 + i for g in range(1, n_groups + 1) for i in range(4)]
    return PrunePlan(heads={layer: heads for layer in range(n_layers)})


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "prunekit" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="eager").eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = model(input_ids=ids).logits
torch.save(out, sys.argv[3])
print(type(model).__name__, model.config.num_attention_heads, model.config.num_key_value_heads)
"""


def reload_logits(path, ids, tmp_path):
    out = tmp_path / "reloaded.pt"
    code = f"import sys; sys.argv = ['x', {str(path)!r}, {json.dumps(ids.tolist())!r}, "
    code += f"{str(out)!r}]\n" + RELOAD
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out), res.stdout.split()


@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_llama3_shaped_head_pruning_saves_as_stock_mistral(n_groups, tmp_path):
    model = llama3_shaped()
    pruned = apply_plan(model, groups_plan(n_groups))
    n_heads = 32 - 4 * n_groups
    assert pruned.config.hidden_size % n_heads != 0
    ids = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(1))
    expected = logits(pruned, ids)
    out = save_pretrained(pruned, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["model_type"] == "mistral"
    assert config["sliding_window"] is None
    assert "per_layer_config" not in config
    # the llama3 rope settings carry over (80 tokens > original_max_position_embeddings)
    rope = config["rope_parameters"]
    assert {k: rope[k] for k in ROPE} == ROPE
    got, (cls, heads, kv) = reload_logits(out, ids, tmp_path)
    assert (cls, int(heads), int(kv)) == ("MistralForCausalLM", n_heads, 8 - n_groups)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mistral_equivalent_has_the_same_modeling_as_llama():
    """Same tensors, same logits: the equivalence the save relies on, on the unpruned model."""
    import transformers as tf

    llama = llama3_shaped()
    mistral = tf.MistralForCausalLM(as_mistral_config(llama.config)).eval()
    mistral.config._attn_implementation = "eager"
    mistral.load_state_dict(llama.state_dict())
    ids = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(mistral, ids), logits(llama, ids), rtol=0, atol=0)


def test_llama_with_biases_keeps_the_per_layer_format(tmp_path):
    model = llama3_shaped(attention_bias=True)
    pruned = apply_plan(model, groups_plan(1))
    assert pruned.config.is_heterogeneous  # Mistral has no attention bias: not equivalent
    out = save_pretrained(pruned, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_streaming_apply_writes_the_same_mistral_checkpoint(tmp_path):
    from prunekit.core.streaming import stream_apply

    model = llama3_shaped()
    model.save_pretrained(tmp_path / "src")
    plan = groups_plan(2)
    streamed = stream_apply(tmp_path / "src", plan, tmp_path / "streamed")
    config = json.loads((streamed / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(3))
    expected = logits(apply_plan(model, plan), ids)
    got, (cls, heads, _) = reload_logits(streamed, ids, tmp_path)
    assert (cls, int(heads)) == ("MistralForCausalLM", 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
