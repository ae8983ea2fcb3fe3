"""Save/load: stock loader for uniform results (in a process that never imports prunekit),
prunekit's loader for per-layer results, atomic writes, refusal of unsafe or existing output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, logits, run_python, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import plans

import prunekit
from prunekit import (
    ModelLoadError,
    OutputExistsError,
    PrunePlan,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    apply_plan,
    get_adapter,
    load_model,
    load_pretrained,
    save_pretrained,
)
from prunekit.errors import OutputPathError

UNIFORM = {
    "llama": PrunePlan(
        layers=[1, 3],
        heads={i: [4, 5, 6, 7] for i in (0, 2, 4)},
        neurons={i: list(range(32)) for i in (0, 2, 4)},
    ),
    "mistral": PrunePlan(layers=[0], heads={i: [0, 4] for i in range(1, 5)}),
    "qwen2": PrunePlan(layers=[4], heads={i: [1, 2, 5, 6] for i in range(4)}),
    "qwen3": PrunePlan(layers=[2], neurons={i: [0, 1, 2] for i in (0, 1, 3, 4)}),
    "bert": PrunePlan(layers=[0, 4], neurons={i: list(range(10, 40)) for i in (1, 2, 3)}),
}
STOCK_LOAD = """
import sys, torch, transformers
assert "prunekit" not in sys.modules
path, ids_file, out_file = sys.argv[1:4] if len(sys.argv) > 3 else {args!r}
cls = getattr(transformers, {cls!r})
model = cls.from_pretrained(path).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    out = model(input_ids=ids)
out = out.logits if hasattr(out, "logits") else out.last_hidden_state
torch.save(out, out_file)
assert "prunekit" not in sys.modules, "the stock loader must not need prunekit"
print("layers", model.config.num_hidden_layers)
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_result_loads_in_stock_transformers(arch, ids, tmp_path):
    model = apply_plan(tiny_model(arch), UNIFORM[arch])
    assert not model.config.is_heterogeneous
    expected = logits(model, ids)
    out = save_pretrained(model, tmp_path / "m")
    assert not list(out.glob("*.bin"))
    torch.save(ids, tmp_path / "ids.pt")
    args = [str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    code = STOCK_LOAD.format(args=args, cls=model.config.architectures[0])
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["layout"] == "uniform"
    assert sidecar["plans"] == [UNIFORM[arch].to_dict()]


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_save_reload_same_logits(arch, data, ids, tmp_path_factory):
    model = tiny_model(arch)
    plan = data.draw(plans(get_adapter(model).shapes(model)))
    apply_plan(model, plan)
    expected = logits(model, ids)
    out = save_pretrained(model, tmp_path_factory.mktemp("m") / "out")
    reloaded, _ = load_pretrained(out, attn_implementation="eager")
    assert get_adapter(reloaded).shapes(reloaded) == get_adapter(model).shapes(model)
    assert reloaded.config.is_heterogeneous == model.config.is_heterogeneous
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=0, rtol=0)


def test_per_layer_reload_is_never_random(ids, tmp_path):
    """Every tensor of the reloaded per-layer model equals the saved one, tied weights tied."""
    model = apply_plan(tiny_model("llama"), PrunePlan(heads={0: [0, 1, 2, 3]}, neurons={1: [0]}))
    assert model.config.is_heterogeneous
    save_pretrained(model, tmp_path / "m")
    reloaded, _ = load_pretrained(tmp_path / "m", attn_implementation="eager")
    ref = model.state_dict()
    got = reloaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    # a second plan on the reloaded per-layer model, then save again
    apply_plan(reloaded, PrunePlan(layers=[0]))
    save_pretrained(reloaded, tmp_path / "m2")
    again, _ = load_pretrained(tmp_path / "m2", attn_implementation="eager")
    torch.testing.assert_close(logits(again, ids), logits(reloaded, ids), atol=0, rtol=0)


def test_stock_loader_refuses_per_layer_result(tmp_path):
    """A per-layer result must not silently load as a homogeneous model."""
    model = apply_plan(tiny_model("llama"), PrunePlan(heads={0: [0, 1, 2, 3]}))
    save_pretrained(model, tmp_path / "m")
    proc = run_python(
        "import transformers, sys; "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})"
    )
    assert proc.returncode != 0
    assert "per-layer" in proc.stderr


def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    model = apply_plan(tiny_model("llama"), PrunePlan(layers=[0]))
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_pretrained(model, out)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind
    # --overwrite replaces only a model/prunekit output, never unrelated files (issue 13)
    with pytest.raises(OutputPathError, match="precious.txt"):
        save_pretrained(model, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    (out / "config.json").write_text("{}")
    save_pretrained(model, out, overwrite=True)
    assert (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_writes_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    model = apply_plan(tiny_model("llama"), PrunePlan(layers=[0]))
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "out", BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_pickled_weights_refused(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_pretrained(tmp_path / "m")


def test_unsupported_architecture_message():
    import transformers as tf

    config = tf.GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = tf.GPTNeoXForCausalLM(config)
    with pytest.raises(UnsupportedArchitectureError) as e:
        apply_plan(model, PrunePlan(layers=[0]))
    msg = str(e.value)
    assert "gpt_neox" in msg and "llama" in msg and "register_adapters" in msg
    assert isinstance(e.value, KeyError)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="GGUF file"):
        load_model(tmp_path, gguf_file="missing.gguf")


def test_atomic_dir_used_by_model_dir_copy(tmp_path, ids):
    """save -> load_model (directory) -> same logits; load_model returns the tokenizer slot."""
    model = apply_plan(tiny_model("mistral"), PrunePlan(layers=[1]))
    save_pretrained(model, tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m", attn_implementation="eager")
    assert tok is None
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=0, rtol=0)


def test_plan_json_round_trip(tmp_path):
    plan = PrunePlan(layers=[3, 1], heads={"2": [5, 4]}, neurons={0: [9, 1, 1]}, meta={"by": "t"})
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan
    assert again.layers == [1, 3] and again.heads == {2: [4, 5]} and again.neurons == {0: [1, 9]}
    plan.to_json(tmp_path / "p.json")
    assert PrunePlan.from_json(tmp_path / "p.json") == plan
    assert PrunePlan.from_json(str(tmp_path / "p.json")) == plan
    with pytest.raises(prunekit.PruningPlanError, match="unknown keys"):
        PrunePlan.from_json('{"layer": [1]}')
    with pytest.raises(FileNotFoundError):
        PrunePlan.from_json(tmp_path / "nope.json")
    assert copy.deepcopy(plan) == plan


def test_output_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputExistsError):
        save_pretrained(tiny_model("llama"), f)
    assert Path(f).read_text() == "x"


def test_sidecar_is_built_in_one_place_and_plans_can_be_explicit(tmp_path):
    from prunekit.core.io import build_sidecar

    plan = PrunePlan(layers=[0], heads={1: [0, 1, 2, 3]})
    model = apply_plan(tiny_model("llama"), plan)
    sidecar = build_sidecar(model, extra={"recipe": {"name": "r"}})
    assert sidecar["plans"] == [plan.to_dict()]
    assert sidecar["layout"] == "per_layer" and sidecar["adapter"] == "llama"
    assert sidecar["layer_shapes"] == [s.to_dict() for s in get_adapter(model).shapes(model)]
    assert sidecar["recipe"] == {"name": "r"} and "transformers" in sidecar["versions"]
    other = PrunePlan(neurons={0: [1]})
    out = save_pretrained(model, tmp_path / "m", plans=[other], extra={"note": 1})
    saved = json.loads((out / "prunekit.json").read_text())
    assert saved["plans"] == [other.to_dict()] and saved["note"] == 1
    assert {k: v for k, v in saved.items() if k not in ("plans", "note")} == {
        k: v for k, v in json.loads(json.dumps(sidecar)).items() if k not in ("plans", "recipe")
    }


def test_weights_size_mb(tmp_path):
    from prunekit.core.io import weights_size_mb

    assert weights_size_mb(tmp_path / "missing") is None
    assert weights_size_mb(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2**20)
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 2**20)  # not a weight file
    assert weights_size_mb(tmp_path) == 1.0
    assert weights_size_mb(tmp_path / "tokenizer.json") == 1.0


def test_llama_head_count_not_dividing_hidden_saves_as_mistral(ids, tmp_path):
    """LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit
    head_dim: 3 heads in every layer (hidden 64) are saved as the equivalent stock Mistral
    (issue 13; the per-layer format stays for Llamas with biases, see test_head_counts)."""
    plan = PrunePlan(heads={i: [0, 1, 2, 3, 4] for i in range(5)})
    model = apply_plan(tiny_model("llama"), plan)
    assert {s.n_heads for s in get_adapter(model).shapes(model)} == {3}
    assert not model.config.is_heterogeneous
    out = save_pretrained(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"
    reloaded, _ = load_pretrained(out, attn_implementation="eager")
    assert type(reloaded).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


def test_sidecar_extra_may_read_the_written_directory(tmp_path):
    from prunekit.core.io import weights_size_mb

    model = apply_plan(tiny_model("llama"), PrunePlan(layers=[0]))
    out = save_pretrained(model, tmp_path / "m", extra=lambda d: {"mb": weights_size_mb(d)})
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["mb"] == weights_size_mb(out) > 0
    assert sidecar["plans"] == [PrunePlan(layers=[0]).to_dict()]


def test_output_guards_compare_with_the_input(tmp_path):
    from prunekit.core.io import check_output_dir

    src = tmp_path / "nest" / "input"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    for out in (src, src.parent, src / "pruned"):
        with pytest.raises(OutputPathError, match="input"):
            check_output_dir(out, overwrite=True, inputs=(str(src),))
    assert check_output_dir(tmp_path / "o", inputs=(src, "hub/id")) == tmp_path / "o"


def test_stale_temporaries_are_removed(tmp_path, capsys):
    from prunekit.core.io import AtomicDir

    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0")
    with AtomicDir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists()
    assert ".out.tmp-dead" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigterm_removes_the_temporary_directory(tmp_path):
    import os
    import signal

    from prunekit.core.io import AtomicDir

    with pytest.raises(KeyboardInterrupt), AtomicDir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
