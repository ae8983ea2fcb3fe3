"""device / dtype options: resolved before any work, ``dtype="auto"`` keeps the checkpoint's own
dtype (bf16 in -> bf16 out), the per-layer loader streams tensors into the skeleton."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from prunekit import PrunePlan, apply_plan, load_model, save_pretrained
from prunekit.core.checkpoint import checkpoint_dtype, checkpoint_tensors, config_dtype
from prunekit.core.devices import (
    check_device_map,
    parse_max_memory,
    resolve_device,
    resolve_dtype,
    stat_dtype,
)
from prunekit.errors import DeviceError

PER_LAYER = PrunePlan(layers=[3], heads={0: [1, 5]}, neurons={1: [0, 5, 95]})
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "gpu0", "cuda:x", "mps"):
        with pytest.raises(DeviceError, match="device"):
            resolve_device(bad)


@NO_CUDA
def test_cuda_on_a_cpu_machine_is_a_clear_error():
    for asked in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match="has none"):
            resolve_device(asked)
    with pytest.raises(DeviceError, match="has none"):
        check_device_map("auto", {0: "1GiB", "cpu": "2GiB"})


def test_resolve_dtype_and_device_map_checks(tmp_path):
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto", gguf=True) is torch.float32
    assert resolve_dtype("auto", tmp_path / "nothing") is torch.float32
    with pytest.raises(DeviceError, match="dtype"):
        resolve_dtype("int4")
    with pytest.raises(DeviceError, match="device-map"):
        check_device_map(None, {"cpu": "1GiB"})
    with pytest.raises(DeviceError, match="device_map"):
        check_device_map("everywhere", None)
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    with pytest.raises(DeviceError, match="DEVICE=SIZE"):
        parse_max_memory("cpu")
    assert stat_dtype(torch.ones(2, dtype=torch.bfloat16)).dtype is torch.float32
    assert stat_dtype(torch.ones(2, dtype=torch.float64)).dtype is torch.float64


def test_bad_device_fails_before_loading(tmp_path):
    with pytest.raises(DeviceError):
        load_model(tmp_path / "missing", device="tpu")


def test_bf16_in_bf16_out(tmp_path):
    src = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    assert checkpoint_dtype(src) is torch.bfloat16
    assert config_dtype(src) is torch.bfloat16
    model, _ = load_model(src)  # dtype="auto"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = save_pretrained(apply_plan(model, PER_LAYER), tmp_path / "out")
    assert {t.dtype for t in checkpoint_tensors(out).values()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again, _ = load_model(out)  # per-layer: streamed into the skeleton, still bf16
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    as_fp32, _ = load_model(out, dtype="float32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}


def test_per_layer_loader_streams_tensors(tmp_path, monkeypatch, ids):
    import safetensors.torch

    model = tiny_model("llama")
    out = save_pretrained(apply_plan(model, PER_LAYER), tmp_path / "out")

    def whole_file(*a, **k):
        raise AssertionError("the per-layer loader read a whole checkpoint file into a dict")

    monkeypatch.setattr(safetensors.torch, "load_file", whole_file)
    loaded, _ = load_model(out, attn_implementation="eager")
    reference = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert all(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("budget, places", [("60KB", {"disk"}), ("150KB", {"cpu", "disk"})])
def test_device_map_offload_gives_the_same_scores(tmp_path, budget, places):
    """``device_map="auto"`` with a ``max_memory`` that forces weights to disk (all of them, or
    all but a few modules kept on the CPU): the same scores as the plain run (forward-only
    scorers, weight-reading ones included), for a loaded model and for a path that
    :func:`prunekit.score` loads with the device_map itself."""
    import prunekit

    src = tmp_path / "m"
    tiny_model("llama").save_pretrained(src)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    names = ["block_influence", "output_norm", "activation_frequency", "magnitude", "wanda"]
    plain, _ = load_model(src)
    offloaded, _ = load_model(src, device_map="auto", max_memory={"cpu": budget})
    assert set(offloaded.hf_device_map.values()) == places  # really offloaded
    assert any(p.is_meta for p in offloaded.parameters())
    a = prunekit.score(plain, ids, names, progress=False)
    b = prunekit.score(offloaded, ids, names, progress=False)
    c = prunekit.score(
        src, ids, names, progress=False, device_map="auto", max_memory={"cpu": budget}
    )
    for name in names:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=1e-5)


def test_compress_refuses_an_offloaded_model_and_says_what_to_do(tmp_path):
    import prunekit

    src = tmp_path / "m"
    save_pretrained(tiny_model("llama"), src, tiny_tokenizer())
    recipe = {"targets": {"layers": 1}, "evaluation": {"text": "none", "latency": False}}
    recipe["calibration"] = {"n_samples": 2, "seq_len": 8}
    with pytest.raises(DeviceError, match="--sequential") as e:
        prunekit.compress(
            src, recipe, tmp_path / "o", device_map="auto", max_memory={"cpu": "60KB"}
        )
    assert "max-memory" in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--device", "tpu"], ["--dtype", "int4"]])
def test_eval_flags_fail_before_loading(tmp_path, capsys, flags, monkeypatch):
    from prunekit.cli import main
    from prunekit.core import io

    def no_load(*a, **k):
        raise AssertionError("loaded before checking the flags")

    monkeypatch.setattr(io, "load_pretrained", no_load)
    src = tmp_path / "m"
    tiny_model("llama").save_pretrained(src)
    assert main(["eval", str(src), "--no-latency", *flags]) == 2
    assert flags[0].lstrip("-") in capsys.readouterr().err
