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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sequential_compress_equals_in_memory(tmp_path, dtype):
    """Both paths compute in the checkpoint's dtype (statistics in fp32): same plan, same
    tensors."""
    model_dir = _model_dir(tmp_path, dtype)
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


def test_sequential_writes_report_and_sidecar_without_evaluation(model_dir, tmp_path):
    result = prunekit.compress(
        model_dir, _recipe(sequential=True), tmp_path / "seq", progress=False
    )
    report = (result.output_dir / "report.md").read_text()
    assert result.report == result.output_dir / "report.md"
    assert "## What was removed" in report and result.plans[0].summary() in report
    assert "## Not measured" in report and f"prunekit eval {result.output_dir}" in report
    assert "perplexity" not in report.split("## Not measured")[0].lower()
    sidecar = json.loads((result.output_dir / "prunekit.json").read_text())
    assert sidecar["failures"] == {}
    assert set(sidecar["timings"]) == {"calibration", "score+select", "apply+save"}
    assert (
        sidecar["metrics"]["pruned"]["size_on_disk_mb"]
        < sidecar["metrics"]["dense"]["size_on_disk_mb"]
    )
    assert sidecar["scores"][0]["meta"]["sequential"] is True
    assert len(sidecar["dense_layer_shapes"]) == 5


def test_sequential_output_guards_before_any_work(model_dir, tmp_path, monkeypatch):
    """A non-empty output without --overwrite, or an output inside the input, fails before
    any scoring; nothing is written."""
    from prunekit.core import select

    def no_scoring(*a, **k):
        raise AssertionError("scored before the output was checked")

    monkeypatch.setattr(select, "plan_for", no_scoring)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        prunekit.compress(model_dir, _recipe(sequential=True), busy, progress=False)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="input"):
        prunekit.compress(model_dir, _recipe(sequential=True), model_dir / "out", progress=False)
    assert not (model_dir / "out").exists()


def test_sequential_failed_report_keeps_the_model(model_dir, tmp_path, monkeypatch):
    from prunekit.core import report
    from prunekit.errors import StageFailedError

    def broken(*a, **k):
        raise RuntimeError("plots broke")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(StageFailedError) as e:
        prunekit.compress(model_dir, _recipe(sequential=True), tmp_path / "seq", progress=False)
    out = tmp_path / "seq"
    assert "report" in e.value.failures
    assert json.loads((out / "prunekit.json").read_text())["failures"] == {
        "report": "RuntimeError: plots broke"
    }
    assert "plots broke" in (out / "report.md").read_text()
    model, _ = prunekit.load_model(out)
    assert model.config.num_hidden_layers == 4


def test_sequential_resume_reuses_the_kept_scores(model_dir, tmp_path, monkeypatch):
    """Scores are kept beside the output until the model is saved; a rerun with resume
    selects from them without scoring again and writes the same model."""
    from prunekit.core import select, sequential, streaming
    from prunekit.core.resume import cache_dir

    def disk_full(*a, **k):
        raise OSError("no space left on device")

    out = tmp_path / "seq"
    monkeypatch.setattr(streaming, "stream_apply", disk_full)
    with pytest.raises(OSError, match="no space"):
        prunekit.compress(model_dir, _recipe(sequential=True), out, progress=False)
    assert cache_dir(out).is_dir() and not out.exists()
    monkeypatch.undo()

    def no_scoring(*a, **k):
        raise AssertionError("scored again despite resume")

    monkeypatch.setattr(select, "plan_for", no_scoring)
    resumed = sequential.compress_sequential(
        model_dir, _recipe(sequential=True), out, progress=False, resume=True
    )
    assert not cache_dir(out).exists()  # removed once the model is saved
    monkeypatch.undo()
    fresh = prunekit.compress(model_dir, _recipe(sequential=True), tmp_path / "f", progress=False)
    assert [p.to_dict() for p in resumed.plans] == [p.to_dict() for p in fresh.plans]
    for d in (resumed.output_dir, fresh.output_dir):
        (d / "prunekit.json").write_text("{}")
    _assert_same(resumed.output_dir, fresh.output_dir)


def test_sequential_scores_in_the_model_dtype(model_dir):
    """A bf16 checkpoint is scored layer by layer in bf16 (as load_model loads it), the
    statistics in fp32: the same scores as the in-memory bf16 capture."""
    from prunekit.core.capture import Accumulator, capture_sequential

    class Dtypes(Accumulator):
        taps = frozenset({"weights", "neuron_inputs"})

        def __init__(self):
            self.seen = set()

        def on_weights(self, i, layer):
            self.seen |= {p.dtype for p in layer.parameters()}

        def on_neuron_inputs(self, i, a, layer):
            self.seen.add(a.dtype)

    rec = Dtypes()
    samples = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    capture_sequential(model_dir, samples, [rec], progress=False)
    assert rec.seen == {torch.bfloat16}
    scorers = ["block_influence", "output_norm", "activation_frequency"]
    seq = prunekit.score(str(model_dir), samples, scorers, sequential=True, progress=False)
    model, _ = prunekit.load_model(model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    mem = prunekit.score(model, samples, scorers, progress=False)
    for name in scorers:
        a, b = seq[name], mem[name]
        a = a if isinstance(a, torch.Tensor) else torch.cat(a)
        b = b if isinstance(b, torch.Tensor) else torch.cat(b)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cli_recipe_field_sequential(model_dir, tmp_path, capsys):
    """`sequential: true` in a recipe file runs the sequential path like --sequential."""
    import yaml

    from prunekit.cli import main

    recipe = tmp_path / "r.yaml"
    data = _recipe(sequential=True).to_dict()
    data["targets"] = {**TARGETS, "neuron_scorer": "wanda"}
    recipe.write_text(yaml.safe_dump(data))
    args = ["compress", str(model_dir), "-o", str(tmp_path / "out"), "--recipe", str(recipe)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layer by layer" in out and "streaming to" in out
    assert json.loads((tmp_path / "out" / "prunekit.json").read_text())["recipe"]["sequential"]
    assert (tmp_path / "out" / "report.md").is_file()
