"""bf16 end to end on the CPU (issue 14): a bf16 checkpoint compressed through the CLI comes out
bf16 (every floating tensor and config.json's dtype), reloads in stock transformers and equals
the dense bf16 model with the plan masked; ``--dtype`` converts; scores accumulate in fp32
whatever the model dtype; ``device`` / ``dtype`` / ``placement`` in the Python API and recipes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, brown_text, logits, tiny_model, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import plans

import prunekit
from prunekit import PrunePlan, Recipe, apply_plan, get_adapter, load_model
from prunekit.cli import main
from prunekit.core.checkpoint import checkpoint_tensors
from prunekit.core.devices import move_real_tensors
from prunekit.core.evaluate import evaluate
from prunekit.core.scores import Scores
from prunekit.errors import DeviceError

FORWARD = ["block_influence", "output_norm", "activation_frequency", "wanda", "magnitude"]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved in bf16 with ``save_pretrained`` (and its tokenizer)."""
    path = tmp_path_factory.mktemp("bf16") / "llama"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(brown_text()[:20_000], encoding="utf-8")
    return path


def _compress(src: Path, out: Path, calib: Path, *extra: str) -> None:
    args = ["compress", str(src), "-o", str(out), "--calib", str(calib)]
    args += ["--calib-samples", "4", "--seq-len", "32", "--no-eval"]
    args += ["--layers", "1", "--heads", "0.5", "--neurons", "0.25", *extra]
    assert main(args) == 0


def _dtypes(directory: Path) -> set[str]:
    """The dtypes of every floating tensor in the checkpoint's safetensors headers."""
    tensors = checkpoint_tensors(directory).values()
    return {t.dtype for t in tensors if t.dtype in ("BF16", "F16", "F32", "F64")}


def _plan(out: Path) -> PrunePlan:
    (plan,) = json.loads((out / "prunekit.json").read_text())["plans"]
    return PrunePlan.from_dict(plan)


def test_cli_compress_keeps_bf16_and_equals_the_masked_dense_model(bf16_dir, calib, tmp_path):
    out = tmp_path / "out"
    _compress(bf16_dir, out, calib)
    assert _dtypes(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["recipe"]["placement"]["dtype"] == "auto"
    assert sidecar["layout"] == "uniform"

    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, the saved dtype
    assert {p.dtype for p in stock.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    got = logits(stock.eval(), ids)
    assert torch.isfinite(got).all()
    dense, _ = load_model(bf16_dir, attn_implementation=stock.config._attn_implementation)
    assert {p.dtype for p in dense.parameters()} == {torch.bfloat16}
    with prunekit.masked(dense, _plan(out)):
        want = logits(dense, ids)
    torch.testing.assert_close(got, want)  # bf16 tolerances (rtol 1.6e-2)
    assert got.dtype is torch.bfloat16


def test_cli_dtype_float32_converts_a_bf16_checkpoint(bf16_dir, calib, tmp_path):
    out = tmp_path / "out"
    _compress(bf16_dir, out, calib, "--dtype", "float32")
    assert _dtypes(out) == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "prunekit.json").read_text())["recipe"]["placement"] == {
        "device": "auto",
        "dtype": "float32",
        "device_map": None,
        "max_memory": None,
    }


def test_recipe_placement_applies_and_the_flag_wins(bf16_dir, calib, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("placement: {dtype: float32, device: cpu}\n")
    _compress(bf16_dir, tmp_path / "a", calib, "--recipe", str(recipe))
    assert _dtypes(tmp_path / "a") == {"F32"}
    _compress(bf16_dir, tmp_path / "b", calib, "--recipe", str(recipe), "--dtype", "bfloat16")
    assert _dtypes(tmp_path / "b") == {"BF16"}
    placement = json.loads((tmp_path / "b" / "prunekit.json").read_text())["recipe"]["placement"]
    assert (placement["device"], placement["dtype"]) == ("cpu", "bfloat16")


@pytest.mark.parametrize(
    "placement, field",
    [
        ({"dtype": "int8"}, "placement.dtype"),
        ({"device": "tpu"}, "placement.device"),
        ({"device_map": "everywhere"}, "placement.device_map"),
        ({"max_memory": {"cpu": "1GiB"}}, "placement.max_memory"),
    ],
)
def test_recipe_placement_is_validated(placement, field):
    with pytest.raises(ValueError, match=field):
        Recipe.from_dict({"placement": placement})


def test_recipe_placement_round_trips():
    data = {"placement": {"device": "cuda:1", "dtype": "float16", "device_map": "auto"}}
    data["placement"]["max_memory"] = {0: "20GiB", "cpu": "60GiB"}
    recipe = Recipe.from_dict(data)
    assert Recipe.from_dict(recipe.to_dict()).placement == recipe.placement
    assert Recipe().to_dict()["placement"] == {
        "device": "auto",
        "dtype": "auto",
        "device_map": None,
        "max_memory": None,
    }


def test_cli_score_bf16_accumulates_in_fp32(tmp_path, calib):
    fp32 = tmp_path / "fp32"
    tiny_model("llama").save_pretrained(fp32)
    tiny_tokenizer().save_pretrained(fp32)
    runs = {}
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"{dtype}.json"
        args = ["score", str(fp32), "--calib", str(calib), "--calib-samples", "4"]
        args += ["--seq-len", "32", "--scorers", ",".join(FORWARD), "--no-progress"]
        assert main([*args, "--dtype", dtype, "-o", str(out)]) == 0
        runs[dtype] = Scores.from_json(out)
    for name in FORWARD:
        rows16, rows32 = _flat(runs["bfloat16"][name]), _flat(runs["float32"][name])
        assert rows16.dtype is torch.float32 and torch.isfinite(rows16).all(), name
        # bf16 forward passes, fp32 statistics: within a few bf16 steps of the fp32 scores
        scale = rows32.abs().max()
        assert (rows16 - rows32).abs().max() <= 0.05 * scale, name
        assert not torch.equal(rows16, rows32), f"{name}: --dtype bfloat16 was not applied"


def _flat(value) -> torch.Tensor:
    return value.flatten() if isinstance(value, torch.Tensor) else torch.cat(list(value))


def test_score_api_loads_a_path_in_its_dtype_and_sequential_agrees(bf16_dir):
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model, _ = load_model(bf16_dir)
    in_memory = prunekit.score(model, ids, FORWARD, progress=False)
    from_path = prunekit.score(bf16_dir, ids, FORWARD, progress=False)  # dtype auto: bf16
    layer_by_layer = prunekit.score(bf16_dir, ids, FORWARD, progress=False, sequential=True)
    as_fp32 = prunekit.score(bf16_dir, ids, FORWARD, progress=False, dtype="float32")
    for name in FORWARD:
        torch.testing.assert_close(_flat(from_path[name]), _flat(in_memory[name]), rtol=0, atol=0)
        torch.testing.assert_close(
            _flat(layer_by_layer[name]), _flat(in_memory[name]), rtol=0, atol=1e-6
        )
        if name != "magnitude":  # bf16 weights are exact in fp32; activations are not
            assert not torch.equal(_flat(as_fp32[name]), _flat(in_memory[name])), name


def test_an_in_memory_model_keeps_its_device_and_dtype(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(DeviceError, match="keeps its dtype.*model.to"):
        prunekit.score(model, ids, ["magnitude"], dtype="float32", progress=False)
    with pytest.raises(DeviceError, match="device_map"):
        prunekit.score(model, ids, ["magnitude"], device_map="auto", progress=False)
    with pytest.raises(DeviceError, match="keeps its dtype"):
        evaluate(model, None, measure_latency=False, dtype="float16")
    out = tmp_path / "out"
    with pytest.raises(DeviceError, match="keeps its dtype"):
        prunekit.compress(
            model, {"targets": {"layers": 1}}, out, tokenizer=tiny_tokenizer(), dtype="float32"
        )
    assert not out.exists()
    # what the model has, or auto, is accepted
    scores = prunekit.score(model, ids, ["magnitude"], dtype="bfloat16", device="cpu")
    assert scores["magnitude"].dtype is torch.float32


def test_evaluate_and_plan_for_load_a_path_with_the_dtype(bf16_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(brown_text()[:3000], encoding="utf-8")
    found = evaluate(bf16_dir, text=text, measure_latency=False, dtype="float32")
    model, tok = load_model(bf16_dir, dtype="float32")
    again = evaluate(model, tok, text=text, measure_latency=False)
    assert found["perplexity"] == again["perplexity"]
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    targets = prunekit.Targets(layers=1, layer_scorer="block_influence")
    plan, scores = prunekit.plan_for(bf16_dir, ids, targets, progress=False, dtype="bfloat16")
    ref_plan, ref_scores = prunekit.plan_for(load_model(bf16_dir)[0], ids, targets, progress=False)
    assert plan.layers == ref_plan.layers
    assert torch.equal(scores["block_influence"], ref_scores["block_influence"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_masked_equals_sliced_in_bf16(arch, data, ids):
    """The fp32 property of tests/test_surgery.py, in bf16 with bf16 tolerances."""
    model = _bf16(arch)
    plan = data.draw(plans(get_adapter(model).shapes(model)))
    with prunekit.masked(model, plan):
        ref = logits(model, ids)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(pruned, ids), ref)


_BF16: dict[str, torch.nn.Module] = {}


def _bf16(arch: str) -> torch.nn.Module:
    if arch not in _BF16:
        _BF16[arch] = tiny_model(arch).to(torch.bfloat16)
    return _BF16[arch]


def test_move_real_tensors_keeps_ties_and_skips_meta():
    model = tiny_model("llama")
    layer = get_adapter(model).layers(model)[0]
    layer.to("meta")
    move_real_tensors(model, torch.device("meta"))  # the only other device this machine has
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
