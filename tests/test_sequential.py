"""``compress --sequential``: scores from the layer-by-layer capture that reads the safetensors,
the plan streamed to the output; same plan and same tensors as the in-memory pipeline with the
same forward-only scorers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_streaming import _assert_same

import prunekit
from prunekit.core.recipe import Recipe

TARGETS = {
    "layers": 1,
    "heads": 0.5,
    "neurons": 0.25,
    "layer_scorer": "block_influence",
    "head_scorer": "output_norm",
    "neuron_scorer": "activation_frequency",
}


def _recipe(**extra) -> Recipe:
    return Recipe.from_dict(
        {
            "targets": TARGETS,
            "calibration": {"n_samples": 4, "seq_len": 16},
            "evaluation": {"text": "none", "latency": False},
            **extra,
        }
    )


def _model_dir(tmp_path, dtype):
    path = tmp_path / str(dtype).removeprefix("torch.")
    tiny_model("llama").to(dtype).save_pretrained(path, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path, torch.bfloat16)


def test_sequential_compress_equals_in_memory(tmp_path):
    """fp32, so that the sequential capture (which computes in fp32) sees the same numbers."""
    model_dir = _model_dir(tmp_path, torch.float32)
    seq = prunekit.compress(model_dir, _recipe(sequential=True), tmp_path / "seq", progress=False)
    mem = prunekit.compress(model_dir, _recipe(), tmp_path / "mem", progress=False)
    assert [p.to_dict() for p in seq.plans] == [p.to_dict() for p in mem.plans]
    # the sidecars differ in recipe/metrics/timings; the weights and config do not
    for name in ("prunekit.json",):
        (seq.output_dir / name).rename(tmp_path / "seq.json")
        (mem.output_dir / name).rename(tmp_path / "mem.json")
    sidecar = json.loads((tmp_path / "seq.json").read_text())
    assert sidecar["recipe"]["sequential"] is True
    assert sidecar["plans"] == [seq.plans[0].to_dict()]
    (seq.output_dir / "prunekit.json").write_text("{}")
    (mem.output_dir / "prunekit.json").write_text("{}")
    _assert_same(seq.output_dir, mem.output_dir)
    assert (seq.output_dir / "tokenizer.json").is_file()


def test_sequential_keeps_bf16(model_dir, tmp_path):
    from prunekit.core.checkpoint import checkpoint_tensors

    seq = prunekit.compress(model_dir, _recipe(sequential=True), tmp_path / "seq", progress=False)
    assert {t.dtype for t in checkpoint_tensors(seq.output_dir).values()} == {"BF16"}
    assert json.loads((seq.output_dir / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = prunekit.load_model(seq.output_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sequential_refuses_what_needs_the_whole_model(model_dir, tmp_path):
    recipe = _recipe(sequential=True)
    recipe.targets.head_scorer = "taylor"
    recipe.iterative = 2
    with pytest.raises(ValueError, match="taylor.*iterative") as e:
        prunekit.compress(model_dir, recipe, tmp_path / "out", progress=False)
    assert "without --sequential" in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="local directory"):
        prunekit.compress(tiny_model("llama"), _recipe(sequential=True), tmp_path / "o2")


def test_recipe_round_trips_sequential():
    assert Recipe.from_dict(_recipe(sequential=True).to_dict()).sequential is True
    assert "sequential" not in _recipe().to_dict()
    with pytest.raises(ValueError, match="sequential"):
        Recipe.from_dict({"sequential": "yes"})


def test_cli_compress_sequential(model_dir, tmp_path, capsys):
    from prunekit.cli import main

    args = ["compress", str(model_dir), "-o", str(tmp_path / "out"), "--sequential", "--no-eval"]
    args += ["--layers", "1", "--head-scorer", "output_norm", "--neuron-scorer", "wanda"]
    args += ["--heads", "0.5", "--neurons", "0.25", "--calib-samples", "4", "--seq-len", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "removed 1 layers" in out
    assert json.loads((tmp_path / "out" / "prunekit.json").read_text())["recipe"]["sequential"]
