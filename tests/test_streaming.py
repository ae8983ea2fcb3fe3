"""Streaming apply (checkpoint tensors read, sliced and written one by one) is the in-memory
``load_model`` + ``apply_plan`` + ``save_pretrained`` bit for bit, on sharded checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, tiny_model
from safetensors import safe_open

from prunekit import PrunePlan, apply_plan, load_model, save_pretrained
from prunekit.core.checkpoint import checkpoint_tensors, main_dtype, max_shard_bytes
from prunekit.core.streaming import (
    INDEX_FILE,
    plan_shards,
    stream_apply,
)
from prunekit.errors import ModelLoadError, PruningPlanError

SHARD = "20KB"
# 5 layers, 8 query heads in 2 KV groups of 4, 96 neurons
UNIFORM = PrunePlan(
    layers=[1],
    heads={i: [4, 5, 6, 7] for i in (0, 2, 3, 4)},
    neurons={i: list(range(0, 96, 3)) for i in (0, 2, 3, 4)},
)
PER_LAYER = PrunePlan(
    layers=[3],
    heads={0: [1, 5], 2: [0, 1, 2, 3], 4: [3, 7]},
    neurons={1: [0, 5, 95], 2: list(range(40)), 4: [10]},
)
# sub-blocks: layer 1 loses its attention, layer 2 its MLP, with heads/neurons cut elsewhere
SUB_BLOCKS = PrunePlan(
    layers=[4],
    attention=[1],
    mlp=[2],
    heads={0: [0, 1, 2, 3], 3: [2, 6]},
    neurons={1: list(range(0, 96, 2)), 3: [7]},
)


def _checkpoint(tmp_path: Path, arch: str = "llama", dtype=torch.float32) -> Path:
    path = tmp_path / f"{arch}-{str(dtype).split('.')[1]}"
    tiny_model(arch).to(dtype).save_pretrained(path, max_shard_size=SHARD)
    return path


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _in_memory(src: Path, plan: PrunePlan, out: Path, dtype) -> Path:
    model, tok = load_model(src, dtype=dtype)
    return save_pretrained(apply_plan(model, plan), out, tok)


def _assert_same(streamed: Path, in_memory: Path) -> None:
    a, b = _tensors(streamed), _tensors(in_memory)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((streamed / "config.json").read_text())
    cb = json.loads((in_memory / "config.json").read_text())
    assert ca == cb
    sa = json.loads((streamed / "prunekit.json").read_text())
    sb = json.loads((in_memory / "prunekit.json").read_text())
    assert {k: v for k, v in sa.items() if k != "versions"} == {
        k: v for k, v in sb.items() if k != "versions"
    }


def _assert_valid_index(directory: Path) -> None:
    index = json.loads((directory / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    assert files == {f.name for f in directory.glob("*.safetensors")}
    tensors = checkpoint_tensors(directory)
    assert set(index["weight_map"]) == set(tensors)
    for key, name in index["weight_map"].items():
        assert tensors[key].file.name == name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize(
    "plan", [UNIFORM, PER_LAYER, SUB_BLOCKS], ids=["uniform", "per_layer", "sub_blocks"]
)
def test_streaming_equals_in_memory(arch, plan, tmp_path):
    src = _checkpoint(tmp_path, arch)
    assert (src / INDEX_FILE).is_file()
    streamed = stream_apply(src, plan, tmp_path / "streamed")
    _assert_same(streamed, _in_memory(src, plan, tmp_path / "memory", torch.float32))
    _assert_valid_index(streamed)
    assert max_shard_bytes(checkpoint_tensors(streamed)) <= max_shard_bytes(checkpoint_tensors(src))


def test_streaming_bf16_stays_bf16_and_reloads(tmp_path, ids):
    src = _checkpoint(tmp_path, dtype=torch.bfloat16)
    streamed = stream_apply(src, UNIFORM, tmp_path / "streamed")
    memory = _in_memory(src, UNIFORM, tmp_path / "memory", torch.bfloat16)
    _assert_same(streamed, memory)
    assert {t.dtype for t in checkpoint_tensors(streamed).values()} == {"BF16"}
    assert json.loads((streamed / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(streamed, dtype=torch.bfloat16)
    reference, _ = load_model(memory, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("plan", [PER_LAYER, SUB_BLOCKS], ids=["per_layer", "sub_blocks"])
def test_streaming_bf16_per_layer_equals_in_memory(plan, tmp_path, ids):
    src = _checkpoint(tmp_path, "qwen2", dtype=torch.bfloat16)  # with q/k/v biases
    streamed = stream_apply(src, plan, tmp_path / "streamed")
    memory = _in_memory(src, plan, tmp_path / "memory", torch.bfloat16)
    _assert_same(streamed, memory)
    _assert_valid_index(streamed)
    assert {t.dtype for t in checkpoint_tensors(streamed).values()} == {"BF16"}
    model, _ = load_model(streamed)
    reference, _ = load_model(memory)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_streamed_files_are_plain_safetensors_stock_transformers_loads(tmp_path, ids):
    """Each file has safetensors' {"format": "pt"} metadata and 8-byte aligned data, loads
    through safe_open and safetensors.torch.load_file, and the uniform result loads in stock
    transformers with the logits of the in-memory result."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prunekit.core.checkpoint import read_header

    src = _checkpoint(tmp_path, dtype=torch.bfloat16)
    streamed = stream_apply(src, UNIFORM, tmp_path / "streamed")
    for f in sorted(streamed.glob("*.safetensors")):
        assert read_header(f)["__metadata__"] == {"format": "pt"}
        with safe_open(f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            assert set(h.keys()) == set(load_file(f))
        assert int.from_bytes(f.read_bytes()[:8], "little") % 8 == 0
    stock = AutoModelForCausalLM.from_pretrained(streamed)
    reference, _ = load_model(_in_memory(src, UNIFORM, tmp_path / "memory", torch.bfloat16))
    assert stock.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_read_selected_equals_index_select(dtype, tmp_path):
    """Reading the kept rows or columns of a tensor from its file equals reading it whole and
    index_select: runs of consecutive rows, single rows, a block boundary for columns."""
    from safetensors.torch import save_file

    from prunekit.core.tensorfile import read_selected, read_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 3, generator=g).to(dtype),
        "w": torch.randn(37, 3000, generator=g).to(dtype),  # > 1 MiB in float32: two blocks
        "b": torch.randn(5, generator=g).to(dtype),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    infos = checkpoint_tensors(tmp_path)
    assert torch.equal(read_tensor(infos["w"]), tensors["w"])
    assert torch.equal(read_tensor(infos["b"]), tensors["b"])
    for axis in (0, 1):
        n = tensors["w"].shape[axis]
        for keep in ([0], [n - 1], [0, 1, 2, 9, 10, n - 1], list(range(1, n, 3))):
            got = read_selected(infos["w"], torch.tensor(keep), axis)
            want = tensors["w"].index_select(axis, torch.tensor(keep))
            assert got.dtype == dtype
            assert torch.equal(got, want), (axis, keep)


def test_streaming_a_per_layer_checkpoint(tmp_path):
    """A second round on a per-layer result (its skeleton is reshaped layer by layer)."""
    src = _checkpoint(tmp_path)
    first = stream_apply(src, PER_LAYER, tmp_path / "first")
    again = PrunePlan(layers=[0], heads={1: [0, 4]}, neurons={2: [1, 2]})
    streamed = stream_apply(first, again, tmp_path / "streamed")
    model, tok = load_model(first)
    model.prunekit_plans = []  # the in-memory sidecar records only this round, like streaming
    memory = save_pretrained(apply_plan(model, again), tmp_path / "memory", tok)
    _assert_same(streamed, memory)


def test_one_file_in_one_file_out_and_tied_embeddings(tmp_path, ids):
    src = tmp_path / "one"
    tiny_model("llama").save_pretrained(src)
    out = stream_apply(src, UNIFORM, tmp_path / "out")
    assert [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / INDEX_FILE).exists()
    model, _ = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tensors_are_written_one_at_a_time(tmp_path, monkeypatch):
    """Nothing is saved from a dict of tensors; only the tensors the plan cuts are read into
    memory (one projection at a time, a weight's kept rows or columns only), everything else
    is copied as bytes."""
    import safetensors.torch

    from prunekit.core import streaming

    src = _checkpoint(tmp_path)
    tensors = checkpoint_tensors(src)
    where = {(t.file, t.start): k for k, t in tensors.items()}
    read, held = [], []
    real_read, real_selected = streaming.read_tensor, streaming.read_selected

    def no_save(*a, **k):
        raise AssertionError("a whole shard was handed to save_file")

    def count(info):
        read.append(where[info.file, info.start])
        held.append(info.nbytes)
        return real_read(info)

    def count_selected(info, keep, axis):
        read.append(where[info.file, info.start])
        out = real_selected(info, keep, axis)
        held.append(out.numel() * out.element_size())
        assert held[-1] < info.nbytes  # only the kept part was read into memory
        return out

    monkeypatch.setattr(safetensors.torch, "save_file", no_save)
    monkeypatch.setattr(streaming, "read_tensor", count)
    monkeypatch.setattr(streaming, "read_selected", count_selected)
    out = stream_apply(src, UNIFORM, tmp_path / "out")
    assert len(read) == len(set(read))  # each input tensor read at most once
    assert "model.embed_tokens.weight" not in read  # copied as bytes
    assert not [k for k in read if "layernorm" in k]
    kept = [i for i in range(5) if i not in UNIFORM.layers]
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(read) == len(kept) * len(projections)
    assert max(held) < max(t.nbytes for t in tensors.values())
    assert max_shard_bytes(checkpoint_tensors(out)) <= max_shard_bytes(tensors)
    _assert_same(out, _in_memory(src, UNIFORM, tmp_path / "memory", torch.float32))


def test_bad_plan_and_output_fail_before_writing(tmp_path):
    src = _checkpoint(tmp_path)
    with pytest.raises(PruningPlanError):
        stream_apply(src, PrunePlan(layers=[7]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="input checkpoint"):
        stream_apply(src, UNIFORM, src, overwrite=True)
    with pytest.raises(ModelLoadError):
        stream_apply(tmp_path / "missing", UNIFORM, tmp_path / "out")


def test_plan_shards_and_main_dtype(tmp_path):
    assert plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards({"a": 5, "b": 5}, None) == [["a", "b"]]
    src = _checkpoint(tmp_path, dtype=torch.bfloat16)
    assert main_dtype(checkpoint_tensors(src)) == torch.bfloat16


def test_streaming_cast_equals_in_memory_cast(tmp_path):
    src = _checkpoint(tmp_path)
    streamed = stream_apply(src, PER_LAYER, tmp_path / "streamed", dtype=torch.bfloat16)
    _assert_same(streamed, _in_memory(src, PER_LAYER, tmp_path / "memory", torch.bfloat16))


def test_cli_apply_streams_a_directory_and_info_reads_headers(tmp_path, capsys, monkeypatch):
    from prunekit.cli import main
    from prunekit.core import io

    src = _checkpoint(tmp_path, dtype=torch.bfloat16)
    plan = tmp_path / "plan.json"
    UNIFORM.to_json(plan)

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(io, "load_pretrained", no_load)
    assert main(["info", str(src)]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert main(["apply", str(src), "--plan", str(plan), "-o", str(tmp_path / "out")]) == 0
    assert "(streamed)" in capsys.readouterr().out
    monkeypatch.undo()
    args = ["apply", str(src), "--plan", str(plan), "-o", str(tmp_path / "mem"), "--in-memory"]
    assert main(args) == 0
    assert "(in memory)" in capsys.readouterr().out
    _assert_same(tmp_path / "out", tmp_path / "mem")
    bad = ["apply", str(src), "--plan", str(plan), "-o", str(tmp_path / "x"), "--dtype", "int3"]
    assert main(bad) == 2
    assert "dtype" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_adapter_with_its_own_slicing_gets_whole_tensors(tmp_path, monkeypatch):
    """An adapter that overrides slice_projection (e.g. a Conv1D [in, out] layout) has its
    projections read whole and cut by its own method; the result is still the in-memory one."""
    from prunekit.core import streaming
    from prunekit.plugins import get_adapter

    src = _checkpoint(tmp_path)
    adapter_cls = type(get_adapter(tiny_model("llama")))
    calls = []

    class OwnSlicing(adapter_cls):
        def slice_projection(self, module, keep, dim):
            calls.append(dim)
            return super().slice_projection(module, keep, dim)

    def no_partial_read(*a, **k):
        raise AssertionError("read only the kept part for an adapter with its own slicing")

    monkeypatch.setattr(streaming, "read_selected", no_partial_read)
    monkeypatch.setattr(streaming, "get_adapter", lambda model: OwnSlicing())
    streamed = stream_apply(src, PER_LAYER, tmp_path / "streamed")
    assert calls  # the adapter's own method cut the real tensors
    monkeypatch.undo()
    _assert_same(streamed, _in_memory(src, PER_LAYER, tmp_path / "memory", torch.float32))
