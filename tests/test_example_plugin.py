"""A third-party plugin of every non-adapter kind (``tests/plugins/prunekit-example``: the
scorer ``example_layers``, the quantizer ``example_rtn``, the recovery method
``example_norms``), registered through the ``prunekit`` entry-point group and driven by the
real CLI with its own options (``--scorer-opt``, ``--quant-opt``, ``--recover-opt``). The
adapter kind is covered by ``tests/test_thirdparty_plugin.py`` (``prunekit-gpt2``).
``scripts/setup-venv.sh`` installs the plugin (``pip install --no-deps -e``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import brown_text, run_python, save_tiny, tiny_model, wiki_text

from prunekit.plugins import reset_plugins

pytest.importorskip(
    "prunekit_example", reason="pip install --no-deps -e tests/plugins/prunekit-example"
)

HIDDEN = 64  # tiny_config's hidden_size: the size of the final norm


@pytest.fixture(autouse=True, scope="module")
def _with_entry_points():
    reset_plugins()  # a plugin set cached by another test may lack the entry points
    yield
    reset_plugins()


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunekit", *map(str, args)], capture_output=True, text=True
    )


def test_entry_point_registers_one_plugin_of_each_kind():
    from prunekit_example.quantizer import RoundToNearestConfig
    from prunekit_example.recovery import NormRecoveryConfig
    from prunekit_example.scorer import WeightNormConfig

    from prunekit.contracts import Plugin
    from prunekit.plugins import get_plugins

    plugins = get_plugins()
    assert plugins.provided["example"] == {
        "register_scorers": ["example_layers"],
        "register_quantizers": ["example_rtn"],
        "register_recoveries": ["example_norms"],
    }
    scorer = plugins.scorers.get("example_layers")
    quantizer = plugins.quantizers.get("example_rtn")
    recovery = plugins.recoveries.get("example_norms")
    assert (scorer.config_class, quantizer.config_class, recovery.config_class) == (
        WeightNormConfig,
        RoundToNearestConfig,
        NormRecoveryConfig,
    )
    for plugin in (scorer, quantizer, recovery):
        assert isinstance(plugin, Plugin)
        assert plugin.available() == (True, "")
    assert plugins.scorers.origin("example_layers") == "example"


def test_disabling_the_entry_point_removes_its_plugins():
    code = (
        "from prunekit.plugins import get_plugins\n"
        "p = get_plugins()\n"
        "print(sorted({'example_layers', 'example_rtn', 'example_norms'}\n"
        "    & {*p.scorers, *p.quantizers, *p.recoveries}))\n"
    )
    on = run_python(code)
    off = run_python(code, env={"PRUNEKIT_DISABLE_PLUGINS": "example"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr[-2000:] + off.stderr[-2000:]
    assert on.stdout.strip() == "['example_layers', 'example_norms', 'example_rtn']"
    assert off.stdout.strip() == "[]"


def test_plugins_command_lists_them():
    res = cli("plugins")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "example" in res.stdout
    for name in ("example_layers", "example_rtn", "example_norms"):
        assert name in res.stdout


def _natural_layer(model) -> int:
    """The middle layer ``example_layers`` removes without options (lowest weight norm)."""
    layers = model.model.layers
    norms = [sum(float(p.detach().pow(2).sum()) for p in layer.parameters()) for layer in layers]
    inner = range(1, len(layers) - 1)  # first and last are protected
    return min(inner, key=lambda i: norms[i])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Calibration and evaluation text, and a tiny Llama saved as a model directory."""
    d = tmp_path_factory.mktemp("example")
    (d / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    (d / "eval.txt").write_text(wiki_text()[:4_000], encoding="utf-8")
    save_tiny("llama", d / "dense")
    return d


@pytest.fixture(scope="module")
def compressed(inputs):
    """One CLI run through all three plugins, each with options from the command line."""
    d, dense = inputs, inputs / "dense"
    drop = next(i for i in (1, 2, 3) if i != _natural_layer(tiny_model("llama")))
    res = cli(
        "compress", dense, "-o", d / "out", "--layers", "1",
        "--layer-scorer", "example_layers",
        "--scorer-opt", f"example_layers.drop={drop}", "--scorer-opt", "power=2",
        "--recover", "example_norms", "--recover-steps", "2",
        "--recover-opt", "norms=final", "--recover-opt", "seq_len=32",
        "--recover-opt", "batch_size=2", "--recover-opt", "eval_every=1",
        "--quantize", "example_rtn", "--quant-opt", "bits=4", "--quant-opt", "note=hello",
        "--calib", d / "calib.txt", "--calib-samples", "8", "--seq-len", "32",
        "--eval-text", d / "eval.txt", "--eval-max-chars", "3000", "--no-latency",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = d / "out"
    return out, drop, json.loads((out / "prunekit.json").read_text())


def test_scorer_receives_its_cli_options(compressed):
    _, drop, sidecar = compressed
    assert [plan["layers"] for plan in sidecar["plans"]] == [[drop]]
    assert sidecar["scores"][0]["meta"]["scorers"]["example_layers"] == {"power": 2, "drop": drop}


def test_recovery_method_receives_its_cli_options(compressed):
    _, _, sidecar = compressed
    (run,) = sidecar["recovery"]
    assert run["method"] == "example_norms"
    assert run["config"]["norms"] == "final" and run["config"]["seq_len"] == 32
    assert run["trainable_params"] == HIDDEN  # the final norm only (norms=all: 4·2+1 norms)
    assert run["steps"] == 2


def test_quantizer_receives_its_cli_options(compressed):
    from safetensors.torch import load_file

    out, _, sidecar = compressed
    assert sidecar["quantization"]["method"] == "example_rtn"
    assert sidecar["quantization"]["config"] == {"bits": 4, "note": "hello"}
    record = json.loads((out / "example_quant.json").read_text())
    assert record == {"bits": 4, "note": "hello", "linears": 4 * 7, "calib_rows": 8}
    weights = load_file(out / "model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert max(len(torch.unique(row)) for row in q) <= 2**4  # on a 4-bit grid per row
    assert sidecar["layer_shapes"] and len(sidecar["layer_shapes"]) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "example_rtn", "--quant-opt", "bits=12"], "quantize.options"),
        (["--quantize", "example_rtn", "--quant-opt", "nope=1"], "valid: bits, note"),
        (["--recover", "example_norms", "--recover-opt", "norms=some"], "norms must be"),
        (["--layer-scorer", "example_layers", "--scorer-opt", "power=0"], "power must be > 0"),
    ],
)
def test_bad_plugin_options_fail_before_loading(inputs, tmp_path, extra, message):
    """Options are checked by the plugin's own config at the edge, before any model is read."""
    res = cli("compress", inputs / "dense", "-o", tmp_path / "out", "--layers", "1", *extra)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("prunekit: error:") and message in last, res.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_quant_flags_map_onto_a_third_party_quantizers_fields():
    from prunekit.core.quantize import get_quantizer, quantizer_config

    quantizer = get_quantizer("example_rtn")
    assert quantizer_config(quantizer, bits=3).bits == 3
    assert quantizer_config(quantizer, {"bits": "5"}, bits=3).bits == 5  # options win
    with pytest.raises(ValueError, match=r"--quant-scheme.*example_rtn.*bits, note"):
        quantizer_config(quantizer, scheme="int8_dynamic")
