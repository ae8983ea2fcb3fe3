"""End to end: `prunekit compress` on tiny models through the CLI (subprocess), recipes,
per-layer mode, iterative mode, the report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    ARCHS,
    brown_text,
    run_python,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
    wiki_text,
)

from prunekit import load_pretrained
from prunekit.core.pipeline import compress
from prunekit.core.recipe import Recipe


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    brown = brown_text()
    wiki = wiki_text()
    (d / "calib.txt").write_text(brown[:40_000], encoding="utf-8")
    (d / "eval.txt").write_text(wiki[:4_000], encoding="utf-8")
    return d


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunekit", *map(str, args)], capture_output=True, text=True
    )


def small_run_flags(texts) -> list[str]:
    return [
        "--calib",
        texts / "calib.txt",
        "--calib-samples",
        "8",
        "--seq-len",
        "32",
        "--eval-text",
        texts / "eval.txt",
        "--eval-max-chars",
        "3000",
    ]


def probe(out):
    from safetensors.torch import load_file

    return load_file(out / "probe" / "probe.safetensors")


STOCK_PROBE = """
import sys, torch, transformers
from safetensors.torch import load_file
path = {path!r}
probe = load_file(path + "/probe/probe.safetensors")
cls = transformers.AutoModel if {encoder!r} else transformers.AutoModelForCausalLM
model = cls.from_pretrained(path).eval()
with torch.no_grad():
    out = model(input_ids=probe["input_ids"])
out = out.last_hidden_state if {encoder!r} else out.logits
torch.testing.assert_close(out, probe["output"], atol=1e-5, rtol=0)
assert "prunekit" not in sys.modules
print("OK", model.config.num_hidden_layers)
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_compress_uniform_cli_loads_in_stock_transformers(arch, texts, tmp_path):
    src = save_tiny(arch, tmp_path / "dense")
    heads = [] if arch == "bert" else ["--heads", "0.5"]  # BERT has no head_dim: per-layer
    res = cli(
        "compress",
        src,
        "-o",
        tmp_path / "out",
        "--layers",
        "1",
        *heads,
        "--neurons",
        "0.25",
        "--mode",
        "uniform",
        *small_run_flags(texts),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| perplexity |" in res.stdout or "| embedding cosine |" in res.stdout
    assert "uniform: loads with stock transformers" in res.stdout
    out = tmp_path / "out"
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["layout"] == "uniform"
    assert {"dense", "pruned"} <= set(sidecar["metrics"])
    assert sidecar["recipe"]["targets"]["neurons"] == 0.25
    shapes = sidecar["layer_shapes"]
    assert len(shapes) == 4
    assert len({(s["n_heads"], s["intermediate"]) for s in shapes}) == 1
    if arch != "bert":
        assert shapes[0]["n_heads"] == 4 and shapes[0]["n_kv_heads"] == 1
    assert (out / "report.md").is_file()
    assert (out / "plots" / "before_after.png").is_file()
    check = run_python(STOCK_PROBE.format(path=str(out), encoder=arch == "bert"))
    assert check.returncode == 0 and "OK 4" in check.stdout, check.stderr[-3000:]


def test_compress_recipe_file_per_layer(texts, tmp_path):
    src = save_tiny("llama", tmp_path / "dense")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
targets:
  layers: 1
  heads: 0.25
  neurons: 0.3
  mode: per_layer
  round_to: 1
calibration: {{source: {texts / "calib.txt"}, n_samples: 8, seq_len: 32}}
evaluation: {{text: {texts / "eval.txt"}, max_chars: 3000, latency: false}}
"""
    )
    res = cli("compress", src, "-o", tmp_path / "out", "--recipe", recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["recipe"]["targets"]["mode"] == "per_layer"
    model, _ = load_pretrained(out)
    p = probe(out)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=p["input_ids"]).logits, p["output"], atol=1e-5, rtol=0
        )


def test_python_api_iterative(texts, tmp_path):
    recipe = Recipe.from_dict(
        {
            "targets": {"layers": 2, "neurons": 0.25, "mode": "uniform", "round_to": 1},
            "iterative": 2,
            "calibration": {"source": str(texts / "calib.txt"), "n_samples": 8, "seq_len": 32},
            "evaluation": {"text": str(texts / "eval.txt"), "max_chars": 3000, "latency": False},
        }
    )
    model = tiny_model("llama")
    result = compress(model, recipe, tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False)
    assert len(result.plans) == 2
    assert sum(len(p.layers) for p in result.plans) == 2
    assert model.config.num_hidden_layers == 3
    assert model.config.intermediate_size == 96 - 24
    dense, pruned = result.metrics["dense"], result.metrics["pruned"]
    assert pruned["params"] < dense["params"]
    assert pruned["perplexity"]["perplexity"] > 0


def test_recipe_round_trip_and_field_errors(tmp_path):
    recipe = Recipe.from_dict(
        {"targets": {"layers": 0.2}, "recovery": {"method": "lora", "steps": 5}}
    )
    recipe.to_file(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml") == recipe
    recipe.to_file(tmp_path / "r.json")
    assert Recipe.from_file(tmp_path / "r.json") == recipe
    with pytest.raises(ValueError, match="calibration.n_samples"):
        Recipe.from_dict({"calibration": {"n_samples": 0}})
    with pytest.raises(ValueError, match="unknown fields"):
        Recipe.from_dict({"evaluation": {"txt": "x"}})
    with pytest.raises(ValueError, match="unknown sections"):
        Recipe.from_dict({"target": {}})
    with pytest.raises(ValueError, match="iterative"):
        Recipe.from_dict({"iterative": 0})


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("d") / "dense")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "1", "--layer-scorer", "nope"], "valid scorers:"),
        (["--layers", "1.5"], "layers"),
        (["--layers", "-2"], "layers"),
        (["--layers", "1", "--eval-text", "/nonexistent/x.txt"], "not found"),
        (["--layers", "1", "--recover", "nope"], "valid recovery methods:"),
        (["--layers", "1", "--quantize", "nope"], "valid quantizers:"),
        ([], "nothing to remove"),
    ],
)
def test_bad_input_one_line_error_nothing_written(dense_dir, tmp_path, extra, message):
    res = cli("compress", dense_dir, "-o", tmp_path / "out", *extra)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("prunekit: error:") and message in last, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(dense_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    res = cli("compress", dense_dir, "-o", out, "--layers", "1")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "precious.txt").read_text() == "keep"


def test_compress_recover_quantize_then_eval_and_refuse_to_prune_again(texts, tmp_path):
    pytest.importorskip("torchao")
    src = save_tiny("llama", tmp_path / "dense")
    out = tmp_path / "out"
    res = cli(
        "compress", src, "-o", out, "--layers", "1", "--neurons", "0.25",
        "--recover", "lora", "--recover-steps", "4",
        "--quantize", "torchao", "--quant-scheme", "int8_weight_only",
        "--no-latency", *small_run_flags(texts),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    sidecar = json.loads((out / "prunekit.json").read_text())
    metrics = sidecar["metrics"]
    assert list(metrics) == ["dense", "pruned", "recovered", "quantized"]
    assert sidecar["quantization"]["method"] == "torchao"
    assert sidecar["recovery"][0]["steps"] >= 1
    # Sizes on disk: int8 weights are smaller than the fp32 dense checkpoint.
    assert 0 < metrics["quantized"]["size_on_disk_mb"] < metrics["dense"]["size_on_disk_mb"]
    for stage in ("dense", "pruned", "recovered", "quantized"):
        assert metrics[stage]["perplexity"]["perplexity"] > 1
    assert (out / "plots" / "recovery_loss_1.png").is_file()
    assert "| weights on disk (MB) |" in (out / "report.md").read_text()

    ev = cli("eval", out, "--text", texts / "eval.txt", "--max-chars", "2000", "--no-latency")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "perplexity" in ev.stdout

    again = cli("compress", out, "-o", tmp_path / "again", "--layers", "1")
    assert again.returncode != 0 and "the model is quantized" in again.stderr
    assert not (tmp_path / "again").exists()


# ---- the generic plugin sections and options -------------------------------------------------
def _parse(*argv):
    from prunekit.cli import build_parser
    from prunekit.commands.compress import _recipe_from_args

    return _recipe_from_args(build_parser().parse_args(["compress", "m", "-o", "o", *argv]))


def test_recipe_plugin_sections_take_options_and_shorthands(texts):
    pytest.importorskip("torchao")
    from prunekit.core.pipeline import preflight

    recipe = Recipe.from_dict(
        {
            "targets": {"layers": 1},
            "calibration": {"source": str(texts / "calib.txt")},
            "evaluation": {"text": str(texts / "eval.txt")},
            "recovery": {"method": "lora", "steps": 7, "options": {"lr": 5e-5, "lora_r": 4}},
            "quantize": {"method": "torchao", "options": {"scheme": "int8_dynamic"}},
        }
    )
    plugins = preflight(recipe)
    assert plugins.recovery.name == "lora" and plugins.quantizer.name == "torchao"
    assert plugins.scorers["layers"].name == "block_influence"
    rc = plugins.recovery_config
    assert (rc.method, rc.steps, rc.lr, rc.lora_r) == ("lora", 7, 5e-5, 4)
    assert plugins.quantize_config.scheme == "int8_dynamic"
    # the shorthand fields fold into the options; options round-trip through the recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    bad = recipe.to_dict()
    bad["recovery"]["options"] = {"nope": 1}
    with pytest.raises(ValueError, match=r"recovery.options.*nope.*valid:"):
        preflight(Recipe.from_dict(bad))
    bad = recipe.to_dict()
    bad["quantize"]["options"] = {"scheme": "int3_magic"}
    with pytest.raises(ValueError, match=r"quantize.options.*scheme"):
        preflight(Recipe.from_dict(bad))


def test_cli_option_flags_fold_into_the_recipe():
    recipe = _parse(
        "--layers", "1", "--layer-scorer", "angular_distance", "--scorer-opt", "token=all",
        "--recover", "lora", "--recover-steps", "3", "--recover-opt", "lora_r=4",
        "--recover-opt", "lr=1e-5", "--quantize", "torchao", "--quant-opt", "scheme=int8_dynamic",
    )  # fmt: skip
    assert recipe.targets.layers == 1 and isinstance(recipe.targets.layers, int)
    assert recipe.targets.scorer_options == {"angular_distance": {"token": "all"}}
    assert recipe.recovery.steps == 3
    assert recipe.recovery.options == {"lora_r": "4", "lr": "1e-5"}
    assert recipe.quantize.options == {"scheme": "int8_dynamic"}
    with pytest.raises(ValueError, match="--recover-opt: no recovery method"):
        _parse("--layers", "1", "--recover-opt", "lr=1")
    with pytest.raises(ValueError, match="--layers"):
        _parse("--layers", "1.5")
    with pytest.raises(ValueError, match="no requested scorer has option 'nope'"):
        _parse("--layers", "1", "--scorer-opt", "nope=1")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recover", "lora", "--recover-opt", "lora_r=zero"], "recovery.options"),
        (["--recover", "lora", "--recover-opt", "nope=1"], "nope"),
        (["--recover", "lora", "--recover-opt", "lr"], "expected key=value"),
    ],
)
def test_bad_plugin_options_fail_before_loading(dense_dir, tmp_path, extra, message):
    res = cli("compress", dense_dir, "-o", tmp_path / "out", "--layers", "1", *extra)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("prunekit: error:") and message in last, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_package_exports_compress_and_recipe():
    import prunekit

    assert prunekit.compress is compress and prunekit.Recipe is Recipe


def test_report_plots_leave_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from prunekit.core.report import plot_before_after, result_table

    matplotlib.use("svg")  # whatever the process chose stays chosen
    try:
        metrics = {"dense": {"params": 10, "perplexity": {"perplexity": 5.0}}}
        metrics["pruned"] = {"params": 8, "perplexity": {"perplexity": 6.0}}
        assert plot_before_after(metrics, tmp_path / "b.png").is_file()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use("agg")
    table = result_table(metrics)
    assert "| perplexity | 5.00 | 6.00 |" in table and "decode" not in table
