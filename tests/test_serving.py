"""Serving pruned models: the trust_remote_code module of per-layer / sub-block results (loaded
in a process that cannot import prunekit), the DeciLM / Nemotron-NAS export checked against a
reference implementation written from the published config semantics, and loadable_by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DECODERS, VOCAB, logits, run_python, tiny_config, tiny_model
from decilm_reference import DeciLMReference
from torch import nn

from prunekit import PrunePlan, apply_plan, save_pretrained
from prunekit.core.export import decilm_config, export_decilm, ffn_mult_for, ffn_mult_width
from prunekit.core.io import global_access
from prunekit.core.serving import (
    PRUNEKIT,
    REMOTE_CODE,
    STOCK,
    VLLM_DECILM,
    VLLM_NATIVE_DECILM,
    loadable_by,
    write_remote_code,
)
from prunekit.errors import ExportError

#: the attention keys of the Nemotron-NAS checkpoints (Llama-3.3-Nemotron-Super-49B config.json)
NEMOTRON_ATTENTION_KEYS = (
    "n_heads_in_group no_op num_sink_tokens replace_with_linear sparsify unshifted_sink "
    "use_prefill_window_in_sink_attention window_length"
)
PER_LAYER_PLAN = PrunePlan(heads={1: [0, 1, 2, 3]}, neurons={2: list(range(10))}, layers=[4])


class _ZeroAttention(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(nn.Module):
    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def save_with_skips(model: nn.Module, out: Path, skips: dict[int, list[str]]) -> nn.Module:
    """Remove sub-blocks by hand (module and its norm) and save them as transformers'
    ``skip`` entries: the sub-block format, independent of prunekit's surgery."""
    layers = model.model.layers
    for i, kinds in skips.items():
        if "attention" in kinds:
            layers[i].self_attn, layers[i].input_layernorm = _ZeroAttention(), nn.Identity()
        if "mlp" in kinds:
            layers[i].mlp, layers[i].post_attention_layernorm = _ZeroMLP(), nn.Identity()
    model.config.per_layer_config = {i: {"skip": kinds} for i, kinds in skips.items()}
    with global_access(model.config):
        model.save_pretrained(out)
    write_remote_code(out)
    return model


def ids_for_test() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


_LOAD_WITHOUT_PRUNEKIT = """
import sys, json
sys.modules["prunekit"] = None  # prunekit cannot be imported in this process
import torch, transformers
ids = torch.tensor({ids})
for path in {paths}:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, attn_implementation="eager")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, path + "/remote_logits.pt")
    prompt = ids[:1, :4]
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached), (path, cached, uncached)
    print(path, type(model).__name__)
"""


def _load_in_clean_process(paths: list[Path], tmp_path: Path, ids: torch.Tensor) -> str:
    code = _LOAD_WITHOUT_PRUNEKIT.format(ids=ids.tolist(), paths=[str(p) for p in paths])
    env = {"PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_per_layer_and_subblock_results_load_with_remote_code_without_prunekit(tmp_path):
    ids = ids_for_test()
    expected, paths = {}, []
    for arch in DECODERS:
        model = apply_plan(tiny_model(arch), PER_LAYER_PLAN)
        out = save_pretrained(model, tmp_path / f"{arch}-per-layer")
        assert write_remote_code(out)
        expected[out] = logits(model, ids)
        sub = save_with_skips(
            tiny_model(arch, seed=1), tmp_path / f"{arch}-subblock", {0: ["attention"], 2: ["mlp"]}
        )
        expected[tmp_path / f"{arch}-subblock"] = logits(sub, ids)
        paths += [out, tmp_path / f"{arch}-subblock"]
    stdout = _load_in_clean_process(paths, tmp_path, ids)
    assert stdout.count("Prunekit") == len(paths)
    for path, want in expected.items():
        got = torch.load(Path(path) / "remote_logits.pt")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_remote_code_config_keeps_transformers_format(tmp_path):
    model = apply_plan(tiny_model("llama"), PER_LAYER_PLAN)
    out = save_pretrained(model, tmp_path / "m")
    write_remote_code(out)
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"] == {
        "1": {"num_attention_heads": 4, "num_key_value_heads": 1},
        "2": {"intermediate_size": 86},
    }
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_prunekit.PrunekitLlamaForCausalLM"
    )
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "modeling_prunekit.py").is_file()
    for name in ("modeling_prunekit.py", "configuration_prunekit.py"):
        source = (out / name).read_text()
        assert "import prunekit" not in source and "from prunekit" not in source


def test_save_pretrained_writes_remote_code_and_states_runtimes(tmp_path):
    out = save_pretrained(apply_plan(tiny_model("qwen2"), PER_LAYER_PLAN), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_prunekit.PrunekitQwen2Config"
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["loadable_by"] == [REMOTE_CODE, PRUNEKIT] == loadable_by(out)
    uniform = save_pretrained(
        apply_plan(tiny_model("llama"), PrunePlan(layers=[0])), tmp_path / "u"
    )
    assert json.loads((uniform / "prunekit.json").read_text())["loadable_by"] == [
        STOCK,
        "vllm",
        PRUNEKIT,
    ]
    assert not (uniform / "modeling_prunekit.py").exists()


def test_uniform_result_gets_no_remote_code_and_stale_code_is_removed(tmp_path):
    out = save_pretrained(apply_plan(tiny_model("llama"), PrunePlan(layers=[1])), tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_prunekit.PrunekitLlamaConfig"}
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_prunekit.py").write_text("stale")
    assert not write_remote_code(out)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "modeling_prunekit.py").exists()
    assert loadable_by(out) == [STOCK, "vllm", PRUNEKIT]


# ---- DeciLM / Nemotron-NAS --------------------------------------------------------------
def _export_and_compare(model: nn.Module, src: Path, out: Path, ids: torch.Tensor) -> dict:
    export_decilm(src, out)
    reference = DeciLMReference(out)
    torch.testing.assert_close(reference.logits(ids), logits(model, ids), atol=1e-5, rtol=1e-5)
    return json.loads((out / "config.json").read_text())


def test_decilm_export_of_per_layer_widths_matches_reference(tmp_path):
    model = apply_plan(
        tiny_model("llama"), PrunePlan(neurons={0: list(range(10)), 2: list(range(30))}, layers=[3])
    )
    src = save_pretrained(model, tmp_path / "m")
    config = _export_and_compare(model, src, tmp_path / "deci", ids_for_test())
    blocks = config["block_configs"]
    assert len(blocks) == 4 and config["num_hidden_layers"] == 4
    assert [b["ffn"]["intermediate_size"] for b in blocks] == [86, 96, 66, 96]
    assert all(b["attention"]["n_heads_in_group"] == 4 for b in blocks)
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert config["num_key_value_heads"] is None and config["intermediate_size"] is None
    assert config["torch_dtype"] == config["dtype"] == "float32"  # 4.x and 5.x readers
    assert VLLM_DECILM in loadable_by(src)
    assert loadable_by(tmp_path / "deci") == [VLLM_NATIVE_DECILM, REMOTE_CODE]
    sidecar = json.loads((tmp_path / "deci" / "prunekit.json").read_text())
    assert (
        sidecar["loadable_by"] == [VLLM_NATIVE_DECILM, REMOTE_CODE]
        and sidecar["export"]["format"] == "decilm"
    )


def test_decilm_config_reads_like_vllm_expects(tmp_path):
    """vLLM reads the export's config through ``AutoConfig(trust_remote_code=True)`` and then
    ``block.attention.no_op``, ``n_heads_in_group`` and ``hasattr(block.ffn, "ffn_mult")``."""
    save_with_skips(tiny_model("llama"), tmp_path / "m", {1: ["attention"]})
    src = tmp_path / "m"
    export_decilm(src, tmp_path / "deci")
    code = (
        "import sys; sys.modules['prunekit'] = None\n"
        "import transformers\n"
        f"c = transformers.AutoConfig.from_pretrained({str(tmp_path / 'deci')!r}, "
        "trust_remote_code=True)\n"
        "b = c.block_configs\n"
        "assert type(c).__name__ == 'DeciLMConfig' and c.model_type == 'nemotron-nas'\n"
        "assert b[1].attention.no_op and not b[0].attention.no_op\n"
        "assert c.num_attention_heads // b[0].attention.n_heads_in_group == 2\n"
        "assert not hasattr(b[0].ffn, 'ffn_mult') and b[0].ffn.intermediate_size == 96\n"
        "assert c.to_dict()['block_configs'][1]['attention']['no_op'] is True\n"
    )
    env = {"PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = run_python(code, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_decilm_export_uses_ffn_mult_when_representable(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.intermediate_size, config.num_hidden_layers = 512, 3
    config._attn_implementation = "eager"
    model = tf.LlamaForCausalLM(config).eval()
    apply_plan(model, PrunePlan(neurons={1: list(range(256))}))
    src = save_pretrained(model, tmp_path / "m")
    out = _export_and_compare(model, src, tmp_path / "deci", ids_for_test())
    assert [b["ffn"].get("ffn_mult") for b in out["block_configs"]] == [12.0, 6.0, 12.0]
    assert all("intermediate_size" not in b["ffn"] for b in out["block_configs"])


def test_decilm_export_of_subblocks_matches_reference(tmp_path):
    model = save_with_skips(tiny_model("llama"), tmp_path / "m", {1: ["attention"], 3: ["mlp"]})
    config = _export_and_compare(model, tmp_path / "m", tmp_path / "deci", ids_for_test())
    blocks = config["block_configs"]
    attention = blocks[1]["attention"]
    assert (attention["no_op"], attention["n_heads_in_group"]) == (True, None)
    assert sorted(attention) == NEMOTRON_ATTENTION_KEYS.split()
    assert blocks[3]["ffn"] == {
        "ffn_mult": None,
        "no_op": True,
        "replace_with_linear": False,
        "sparsify": None,
    }


def test_decilm_export_from_a_model_object(tmp_path):
    model = apply_plan(tiny_model("llama"), PrunePlan(neurons={0: [1, 2]}))
    export_decilm(model, tmp_path / "deci")
    ids = ids_for_test()
    torch.testing.assert_close(
        DeciLMReference(tmp_path / "deci").logits(ids), logits(model, ids), atol=1e-5, rtol=1e-5
    )


def test_decilm_exports_load_with_remote_code_without_prunekit(tmp_path):
    """transformers builds an export with trust_remote_code (modeling_decilm: block_configs as
    per_layer_config) in a process without prunekit: the prunekit model's and the reference's
    logits, cached generation equal to uncached; per-layer widths, ffn_mult widths with
    per-layer KV grouping (a --serve decilm plan) and attention/MLP no-ops."""
    from prunekit.core.select import Targets, select

    ids = ids_for_test()
    models = {
        "widths": apply_plan(tiny_model("llama"), PrunePlan(neurons={0: [1, 2]}, layers=[3])),
        "subblocks": apply_plan(tiny_model("llama", seed=1), PrunePlan(attention=[1], mlp=[2])),
    }
    served = _ffn_mult_llama()
    targets = Targets(mode="per_layer", heads=20, neurons=0.3, serve="decilm")
    models["served"] = apply_plan(served, select(_serve_scores(served), targets))
    paths = []
    for name, model in models.items():
        paths.append(export_decilm(model, tmp_path / name))
    stdout = _load_in_clean_process(paths, tmp_path, ids)
    assert stdout.count("DeciLMForCausalLM") == len(paths)
    for path, model in zip(paths, models.values(), strict=True):
        got = torch.load(path / "remote_logits.pt")
        torch.testing.assert_close(got, logits(model, ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, DeciLMReference(path).logits(ids), atol=1e-5, rtol=1e-5)
        assert (path / "modeling_decilm.py").is_file()


def test_decilm_refuses_non_uniform_query_heads(tmp_path):
    src = save_pretrained(apply_plan(tiny_model("llama"), PER_LAYER_PLAN), tmp_path / "m")
    with pytest.raises(ExportError, match=r"non-uniform query heads.*layer 1: 4") as info:
        export_decilm(src, tmp_path / "deci")
    assert info.value.format == "decilm"
    assert not (tmp_path / "deci").exists()
    assert VLLM_DECILM not in loadable_by(src)


@pytest.mark.parametrize("arch, what", [("qwen2", "not Llama-family"), ("mistral", "sliding")])
def test_decilm_refuses_what_it_cannot_express(arch, what, tmp_path):
    src = save_pretrained(apply_plan(tiny_model(arch), PrunePlan(layers=[0])), tmp_path / "m")
    with pytest.raises(ExportError, match=what):
        export_decilm(src, tmp_path / "deci")


def test_decilm_refuses_widths_without_ffn_mult_when_required(tmp_path):
    src = save_pretrained(apply_plan(tiny_model("llama"), PrunePlan(layers=[0])), tmp_path / "m")
    with pytest.raises(ExportError, match="ffn_mult"):
        export_decilm(src, tmp_path / "deci", require_ffn_mult=True)


def test_ffn_mult_round_trip():
    for hidden in (64, 576, 4096, 8192):
        for width in range(256, 8 * hidden, 256):
            mult = ffn_mult_for(width, hidden)
            assert mult is not None and ffn_mult_width(mult, hidden) == width
    assert ffn_mult_for(1536 + 1, 576) is None
    assert ffn_mult_width(5.25, 8192) == 28672  # Llama-3.1-70B's MLP width
    raw = {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "num_hidden_layers": 1,
    }
    assert decilm_config(raw)["block_configs"][0]["ffn"]["ffn_mult"] == 5.25


def test_cli_export(tmp_path, capsys):
    from prunekit.cli import main

    src = save_pretrained(apply_plan(tiny_model("llama"), PrunePlan(layers=[2])), tmp_path / "m")
    assert main(["export", str(src), "--format", "decilm", "-o", str(tmp_path / "deci")]) == 0
    assert "DeciLMForCausalLM" in capsys.readouterr().out
    bad = save_pretrained(apply_plan(tiny_model("llama"), PER_LAYER_PLAN), tmp_path / "bad")
    assert main(["export", str(bad), "-o", str(tmp_path / "deci2")]) != 0
    assert "non-uniform query heads" in capsys.readouterr().err


# ---- --serve decilm: a selection that exports -------------------------------------------------
def _ffn_mult_llama(seed: int = 0) -> nn.Module:
    """tiny Llama (5 layers, 8 query heads in 2 KV groups of 4) with 512-wide MLPs (hidden
    64): widths that ffn_mult expresses are multiples of 256."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config("llama")
    config.intermediate_size = 512
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config).eval()


def _serve_scores(model: nn.Module):
    """Head scores that make layer 0 cheapest to cut by a whole KV group and layer 1 by the
    same count from each group; random neuron scores."""
    from prunekit.core.scores import Scores
    from prunekit.plugins import get_adapter

    g = torch.Generator().manual_seed(0)
    heads = [1 + torch.rand(8, generator=g) for _ in range(5)]
    heads[0][:4] = 0.0  # group 0 of layer 0
    heads[1][[0, 1, 4, 5]] = 0.0  # two heads of each group of layer 1
    neurons = [torch.rand(512, generator=g) for _ in range(5)]
    values = {"taylor": heads, "activation_frequency": neurons}
    units = {"taylor": "heads", "activation_frequency": "neurons"}
    return Scores(values, units, get_adapter(model).shapes(model))


def test_serve_decilm_plan_exports_and_matches_the_reference(tmp_path):
    from prunekit.core.select import Targets, select

    model = _ffn_mult_llama()
    scores = _serve_scores(model)
    asked = dict(mode="per_layer", heads=20, neurons=0.3)
    free = select(scores, Targets(**asked))
    served = select(scores, Targets(**asked, serve="decilm"))
    # per_layer without --serve: query-head counts differ per layer -> DeciLM refuses it
    src = save_pretrained(apply_plan(_ffn_mult_llama(), free), tmp_path / "free")
    with pytest.raises(ExportError, match="non-uniform query heads"):
        export_decilm(src, tmp_path / "free-deci")
    # --serve decilm: 4 query heads from every layer, protected ones too; layer 0 loses KV
    # group 0, layer 1 two heads of each group (its KV heads stay)
    assert sorted(served.heads) == [0, 1, 2, 3, 4]
    assert all(len(h) == 4 for h in served.heads.values())
    assert served.heads[0] == [0, 1, 2, 3] and served.heads[1] == [0, 1, 4, 5]
    assert sorted(served.neurons) == [1, 2, 3]  # protected layers keep their MLP
    assert all((512 - len(n)) % 256 == 0 for n in served.neurons.values())
    assert served.meta["targets"]["round_to"] == 256 and served.meta["targets"]["serve"] == "decilm"
    apply_plan(model, served)
    src = save_pretrained(model, tmp_path / "served")
    assert VLLM_DECILM in loadable_by(src)
    export_decilm(src, tmp_path / "deci", require_ffn_mult=True)
    ids = ids_for_test()
    torch.testing.assert_close(
        DeciLMReference(tmp_path / "deci").logits(ids), logits(model, ids), atol=1e-5, rtol=1e-5
    )
    config = json.loads((tmp_path / "deci" / "config.json").read_text())
    assert config["num_attention_heads"] == 4
    groups = [b["attention"]["n_heads_in_group"] for b in config["block_configs"]]
    assert groups[0] == 4 and groups[1] == 2  # 1 KV head vs 2 KV heads, 4 query heads each
    assert all(b["ffn"]["ffn_mult"] in (6.0, 12.0) for b in config["block_configs"])


def test_serve_decilm_refuses_what_it_cannot_make():
    from prunekit.core.scores import Scores
    from prunekit.core.select import Targets, select
    from prunekit.core.shapes import LayerShape

    with pytest.raises(ValueError, match=r"serve must be one of \('decilm',\)"):
        Targets(serve="vllm")
    uneven = [LayerShape(8, 2, 8, 96), LayerShape(4, 1, 8, 96), LayerShape(8, 2, 8, 96)]
    rows = {"taylor": [torch.rand(s.n_heads) for s in uneven]}
    targets = Targets(mode="per_layer", heads=4, serve="decilm")
    with pytest.raises(ValueError, match=r"layers already differ \(layer 0: 8, layer 1: 4"):
        select(Scores(rows, {"taylor": "heads"}, uneven), targets)
    even = [LayerShape(8, 2, 8, 96)] * 3
    rows = {"taylor": [torch.rand(8) for _ in even]}
    with pytest.raises(ValueError, match=r"below half the smallest step.*\(6: 2 query heads"):
        select(
            Scores(rows, {"taylor": "heads"}, even),
            Targets(mode="per_layer", heads=2, serve="decilm"),
        )
    # min_heads=5 leaves only r=2 (per group) in every layer; 7 heads -> r=2 everywhere
    plan = select(
        Scores(rows, {"taylor": "heads"}, even),
        Targets(mode="per_layer", heads=7, min_heads=5, serve="decilm"),
    )
    assert [len(plan.heads[i]) for i in range(3)] == [2, 2, 2]
    assert "serve='decilm' removes one query-head count" in plan.meta["adjusted"][0]


@pytest.mark.parametrize(
    "flags, runtimes",
    [
        (["--layers", "1"], [STOCK, "vllm", PRUNEKIT]),
        (
            ["--mode", "per_layer", "--heads", "0.25", "--neurons", "0.2", "--export", "decilm"],
            [REMOTE_CODE, VLLM_DECILM, PRUNEKIT],
        ),
    ],
    ids=["uniform", "per_layer_export_decilm"],
)
def test_cli_and_report_state_the_runtimes(flags, runtimes, tmp_path):
    """compress prints and reports which runtimes load the result (the sub-block case is in
    test_subblock); --export decilm selects what DeciLM expresses and writes the export."""
    from conftest import brown_text, save_tiny, wiki_text
    from test_pipeline import cli, small_run_flags

    from prunekit.core.recipe import Recipe

    (tmp_path / "calib.txt").write_text(brown_text()[:20_000], encoding="utf-8")
    (tmp_path / "eval.txt").write_text(wiki_text()[:3_000], encoding="utf-8")
    src, out = save_tiny("llama", tmp_path / "dense"), tmp_path / "out"
    res = cli("compress", src, "-o", out, *flags, "--no-latency", *small_run_flags(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert loadable_by(out) == runtimes
    assert f"loads in: {', '.join(runtimes)}" in res.stdout
    assert f"Loads in: {', '.join(runtimes)}" in (out / "report.md").read_text()
    if "--export" not in flags:
        assert not (tmp_path / "out-decilm").exists()
        return
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["recipe"]["targets"]["serve"] == "decilm"
    assert Recipe.from_dict(sidecar["recipe"]).targets.serve == "decilm"
    heads = {s["n_heads"] for s in sidecar["layer_shapes"]}
    assert heads == {6}  # 2 of 8 query heads from every layer, protected ones too
    # --export decilm implies --serve decilm and writes OUTPUT-decilm after the model
    assert f"wrote decilm export to {tmp_path / 'out-decilm'}" in res.stdout
    assert loadable_by(tmp_path / "out-decilm") == [VLLM_NATIVE_DECILM, REMOTE_CODE]


def test_serve_decilm_refuses_a_model_it_cannot_hold_before_loading(tmp_path):
    from conftest import save_tiny

    from prunekit.core.preflight import check_model_input
    from prunekit.core.select import Targets

    targets = Targets(mode="per_layer", neurons=0.2, serve="decilm")
    with pytest.raises(ValueError, match=r"serve='decilm': .*not Llama-family"):
        check_model_input(save_tiny("qwen2", tmp_path / "qwen2"), targets=targets)
    with pytest.raises(ValueError, match=r"serve='decilm': .*sliding window"):
        check_model_input(save_tiny("mistral", tmp_path / "mistral"), targets=targets)
    assert len(check_model_input(save_tiny("llama", tmp_path / "llama"), targets=targets)) == 5
    uneven = save_pretrained(apply_plan(tiny_model("llama"), PER_LAYER_PLAN), tmp_path / "uneven")
    with pytest.raises(ValueError, match="non-uniform query heads"):
        check_model_input(uneven, targets=targets)
