"""Quantizers after pruning: torchao (int8 weight-only, int8 dynamic, int4 grouped), GPTQ and
AWQ. Each is run on a pruned tiny Llama, saved, and reloaded with stock transformers in a
fresh process that never imports prunekit.

The tiny Llama here is wider than conftest's (hidden 128, head_dim 32, MLP 256): GPTQ/AWQ
kernels need every quantized input width to be a multiple of the group size (64 here) and
packed 4-bit rows of 8 values. Its tokenizer is byte-level (256 byte tokens + EOS), so real
calibration text (Brown) goes through the same path as for a real model.

Tolerances (fp32 logits of the pruned model as reference, relative Frobenius error
``||q - ref|| / ||ref||``): int8 per-channel keeps each weight within half a step of
``max|W_o| / 127`` (about 0.4% of the largest weight), which measured ~1% logits error; we
allow 4%. 4-bit with groups of 64 has 16 levels per group, ~10x the int8 step; the measured
error is 10-20% on this random model, we allow 35%. Both are far below what a wrong model
gives (an unrelated random model: ~140%), and the reloaded model must reproduce the
in-memory quantized model's logits to 1e-4 (fp32 backends) or within 1% (GPTQModel's AWQ packs
and runs in bf16, whose rounding step is 2^-8 ~ 0.4% and whose sums depend on the thread
blocking of the process).
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import run_python
from torch import nn

import prunekit
from prunekit import PrunePlan, PruningPlanError, RegistryError, apply_plan
from prunekit.quantizers import (
    AWQConfig,
    GPTQConfig,
    QuantizationError,
    QuantizerUnavailableError,
    TorchAOConfig,
    get_quantizer,
    is_quantized,
    quantize,
    quantizer_config,
    save_quantized,
)
from prunekit.quantizers.awq import autoawq_usable
from prunekit.quantizers.gptqmodel_backend import gptqmodel_missing

VOCAB = 257  # 256 byte tokens + <|endoftext|>
INT8_TOL = 0.04
INT4_TOL = 0.35
GROUP = 64


# ---- fixtures ------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, plus EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos
    )


def quant_llama(seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        initializer_range=0.05,
    )
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config).eval()


# Uniform: one layer, one query head of each KV group and half the MLP go. Both KV groups stay,
# so k/v keep 64 output rows (GPTQModel's AWQ clips in blocks of 64 rows).
PLAN = PrunePlan(
    layers=[1],
    heads={i: [1, 3] for i in (0, 2)},
    neurons={i: list(range(0, 256, 2)) for i in (0, 2)},
)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def pruned():
    return apply_plan(quant_llama(), PLAN)


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Pruning then quantizing works."
    return tokenizer(text, return_tensors="pt").input_ids[:, :48]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


RELOAD = """
import json, sys, torch, transformers
path = sys.argv[1] if len(sys.argv) > 1 else {path!r}
model = transformers.AutoModelForCausalLM.from_pretrained(
    path, device_map="cpu", attn_implementation="eager"
).eval()
ids = torch.load(path + "/../ids.pt")
with torch.no_grad():
    logits = model(input_ids=ids).logits.float()
torch.save(logits, path + "/../reloaded.pt")
gen = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
assert "prunekit" not in sys.modules, "the stock loader must not need prunekit"
qc = model.config.quantization_config
method = qc.get("quant_method") if isinstance(qc, dict) else qc.quant_method
method = getattr(method, "value", method)
print(json.dumps({{"gen": gen.tolist(), "layers": model.config.num_hidden_layers,
                  "quant_method": method}}))
"""


def save_and_reload(quantized, tokenizer, ids, tmp_path):
    """Save, reload in a fresh process; return (reloaded logits, its report, out dir)."""
    out = tmp_path / "q"
    save_quantized(quantized, out, tokenizer)
    torch.save(ids, tmp_path / "ids.pt")
    r = run_python(RELOAD.format(path=str(out)), env={"GPTQMODEL_CPU_WORKERS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return torch.load(tmp_path / "reloaded.pt"), report, out


def check_roundtrip(quantized, pruned, tokenizer, ids, tmp_path, tol, method):
    ref = logits(pruned, ids)
    q = logits(quantized, ids)
    err = rel_err(q, ref)
    assert 0 < err < tol, f"relative logits error {err:.4f} (tolerance {tol})"
    # An unrelated model is far off: the tolerance would catch wrong weights.
    assert rel_err(logits(apply_plan(quant_llama(seed=1), PLAN), ids), ref) > 4 * tol
    reloaded, report, out = save_and_reload(quantized, tokenizer, ids, tmp_path)
    if next(quantized.parameters()).dtype == torch.float32:
        torch.testing.assert_close(reloaded, q, atol=1e-4, rtol=1e-4)
    else:  # 16-bit kernels (GPTQModel's AWQ): bf16 sums differ with thread blocking, eps 2^-8
        assert rel_err(reloaded, q) < 1e-2
    assert report["layers"] == 2 and report["quant_method"] == method
    with torch.no_grad():
        gen = quantized.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert report["gen"] == gen.tolist() and len(report["gen"][0]) == 14
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["quantization"]["method"] in ("awq", "gptq", "torchao")
    assert sidecar["plans"] == [PLAN.to_dict()]
    assert sidecar["layer_shapes"][0] == {
        "n_heads": 2,
        "n_kv_heads": 2,
        "head_dim": 32,
        "intermediate": 128,
    }
    assert sidecar["quantization"]["size_on_disk_mb"] > 0
    return err, out


# ---- configs and registry -------------------------------------------------------------------
def test_registered_and_lookup_lists_names():
    names = prunekit.get_plugins().quantizers.names()
    assert {"awq", "gptq", "torchao"} <= set(names)
    with pytest.raises(RegistryError, match="awq, (.+, )?gptq, torchao"):
        get_quantizer("nf4")


def test_config_from_args_defaults_and_overrides():
    assert quantizer_config(get_quantizer("gptq")) == GPTQConfig(bits=4, group_size=128)
    assert quantizer_config(get_quantizer("awq")) == AWQConfig(bits=4, group_size=128)
    assert quantizer_config(get_quantizer("torchao")).scheme == "int8_weight_only"
    assert quantizer_config(get_quantizer("torchao"), bits=4, group_size=32) == TorchAOConfig(
        scheme="int4_grouped", group_size=32
    )
    assert quantizer_config(get_quantizer("torchao"), scheme="int8_dynamic").bits == 8
    assert quantizer_config(get_quantizer("gptq"), bits=8, group_size=-1).group_size == -1
    with pytest.raises(ValueError, match="only applies to the torchao"):
        quantizer_config(get_quantizer("gptq"), scheme="int8_dynamic")
    with pytest.raises(ValueError, match="bits=3"):
        quantizer_config(get_quantizer("torchao"), bits=3)
    with pytest.raises(ValueError, match="does not match scheme"):
        quantizer_config(get_quantizer("torchao"), bits=4, scheme="int8_weight_only")


def test_quantizers_follow_the_plugin_contract():
    import dataclasses

    for name in ("awq", "gptq", "torchao"):
        quantizer = get_quantizer(name)
        assert dataclasses.is_dataclass(quantizer.config_class)
        ok, why = quantizer.available()
        assert isinstance(ok, bool) and isinstance(why, str)
        assert not hasattr(quantizer, "config_cls")


def test_any_option_is_settable_generically():
    gptq = get_quantizer("gptq")
    # CLI strings (--quant-opt key=value) are coerced to the field types.
    config = quantizer_config(gptq, {"desc_act": "true", "damp_percent": "0.1", "sym": "false"})
    assert config == GPTQConfig(desc_act=True, damp_percent=0.1, sym=False)
    # Options come on top of the flags.
    assert quantizer_config(gptq, {"group_size": "64"}, group_size=32).group_size == 64
    assert quantizer_config(get_quantizer("awq"), {"backend": "gptqmodel"}).backend == "gptqmodel"
    with pytest.raises(ValueError, match=r"quantize.options: unknown option.*damp.*valid:.*"):
        quantizer_config(gptq, {"damp": "0.1"})
    with pytest.raises(ValueError, match="quantize.options: damp_percent"):
        quantizer_config(gptq, {"damp_percent": "2"})


def test_flags_map_onto_options_generically_for_a_third_party_quantizer():
    from dataclasses import dataclass, field

    from prunekit.core.quantize import options_from_flags

    @dataclass
    class NF4Config:
        bits: int = field(default=4, metadata={"help": "bits"})
        double_quant: bool = field(default=True, metadata={"help": "quantize the scales"})

    class NF4:
        name = "nf4"
        config_class = NF4Config

    assert options_from_flags(NF4(), bits=4) == {"bits": 4}
    assert options_from_flags(NF4()) == {}
    with pytest.raises(ValueError, match=r"--quant-group-size.*nf4.*bits, double_quant"):
        options_from_flags(NF4(), group_size=64)
    assert quantizer_config(NF4(), {"double_quant": "false"}) == NF4Config(double_quant=False)


def test_quantize_takes_the_quantizer_object(pruned, tokenizer):
    with pytest.raises(TypeError, match=r"get_quantizer\('torchao'\)"):
        quantize(pruned, tokenizer, "torchao")


def test_core_imports_no_plugin_package():
    code = (
        "import sys, prunekit.core.quantize, prunekit.core.recovery\n"
        "bad = [m for m in sys.modules if m.startswith(('prunekit.quantizers', "
        "'prunekit.recoveries', 'prunekit.scorers', 'prunekit.adapters'))]\n"
        "assert not bad, bad\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (GPTQConfig, {"bits": 5}, "bits"),
        (GPTQConfig, {"group_size": 100}, "group_size"),
        (GPTQConfig, {"damp_percent": 0}, "damp_percent"),
        (GPTQConfig, {"n_samples": 0}, "n_samples"),
        (GPTQConfig, {"backend": "exllama"}, "backend"),
        (AWQConfig, {"bits": 8}, "bits"),
        (AWQConfig, {"group_size": -1}, "group_size"),
        (AWQConfig, {"seq_len": 1}, "seq_len"),
        (TorchAOConfig, {"scheme": "int4_weight_only"}, "scheme"),
        (TorchAOConfig, {"sym": "yes"}, "sym"),
    ],
)
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_available_explains_what_to_install(monkeypatch, pruned, tokenizer):
    # A module set to None in sys.modules is neither found nor importable: as if uninstalled.
    monkeypatch.setitem(sys.modules, "torchao", None)
    ok, why = get_quantizer("torchao").available()
    assert not ok and "pip install 'prunekit[torchao]'" in why
    with pytest.raises(QuantizerUnavailableError, match=r"prunekit\[torchao\]") as e:
        quantize(pruned, tokenizer, get_quantizer("torchao"))
    assert isinstance(e.value, ImportError) and e.value.quantizer == "torchao"
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    monkeypatch.setitem(sys.modules, "auto_gptq", None)
    ok, why = get_quantizer("gptq").available()
    assert not ok and "gptqmodel" in why and "pip install 'prunekit[gptq]'" in why
    ok, why = get_quantizer("awq").available()
    assert not ok and "prunekit[gptq]" in why and "prunekit[awq]" in why


# ---- refusals --------------------------------------------------------------------------------
def test_refuses_per_layer_and_indivisible_models(pruned, tokenizer):
    per_layer = apply_plan(quant_llama(), PrunePlan(neurons={0: [0, 1]}))
    with pytest.raises(QuantizationError, match="per-layer"):
        quantize(per_layer, tokenizer, get_quantizer("torchao"))
    odd = apply_plan(quant_llama(), PrunePlan(neurons={i: list(range(32)) for i in range(3)}))
    with pytest.raises(QuantizationError, match="224 input features.*group_size 64"):
        quantize(odd, tokenizer, get_quantizer("gptq"), GPTQConfig(group_size=GROUP))
    with pytest.raises(TypeError, match="GPTQConfig"):
        quantize(pruned, tokenizer, get_quantizer("gptq"), TorchAOConfig())
    with pytest.raises(QuantizationError, match="not quantized"):
        save_quantized(pruned, "/nonexistent/never-written", tokenizer)


def test_calibration_ids_validated(pruned, tokenizer):
    from prunekit.core.quantize import calibration_ids

    ids = calibration_ids(tokenizer, torch.arange(300).reshape(3, 100) % VOCAB, 2, 50, VOCAB)
    assert ids.shape == (2, 50) and ids.dtype == torch.int64
    with pytest.raises(QuantizationError, match="vocabulary"):
        calibration_ids(tokenizer, torch.full((2, 8), 1000), 2, 8, VOCAB)
    brown = calibration_ids(tokenizer, None, 3, 16, VOCAB)  # Brown, like pruning
    assert brown.shape == (3, 16)
    text = tokenizer.decode(brown[0])
    assert text.isprintable() or "\n" in text


# ---- torchao -----------------------------------------------------------------------------------
def fake_quant_int8(model: nn.Module) -> nn.Module:
    """Reference int8 weight-only: per output channel, symmetric over [-128, 127], so the
    scale is max|W| / 127.5 (half the range of the grid, torchao's symmetric mapping)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    w = m.weight
                    s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.5
                    m.weight.copy_(torch.clamp(torch.round(w / s), -128, 127) * s)
    return ref


@pytest.mark.parametrize(
    ("scheme", "tol"),
    [("int8_weight_only", INT8_TOL), ("int8_dynamic", INT8_TOL), ("int4_grouped", INT4_TOL)],
)
def test_torchao_quantize_save_reload(scheme, tol, pruned, tokenizer, text_ids, tmp_path):
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    config = TorchAOConfig(scheme=scheme, group_size=GROUP)
    quantized = quantize(pruned, tokenizer, get_quantizer("torchao"), config)
    # The input model is untouched, the output is marked quantized.
    assert not is_quantized(pruned)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    assert is_quantized(quantized)
    # Embeddings and the LM head stay full precision, and stay tied.
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert type(quantized.model.embed_tokens.weight) is nn.Parameter
    err, out = check_roundtrip(quantized, pruned, tokenizer, text_ids, tmp_path, tol, "torchao")
    if scheme == "int8_weight_only":
        # Same answer as the plain per-channel int8 reference (weights may differ by one step
        # where w / s falls on a rounding tie).
        reference = fake_quant_int8(pruned)
        for got, want in zip(quantized.model.layers, reference.model.layers, strict=True):
            w_got = got.mlp.down_proj.weight.dequantize()
            w_want = want.mlp.down_proj.weight
            step = pruned.model.layers[0].mlp.down_proj.weight.abs().max() / 127.5
            assert (w_got - w_want).abs().max() <= step * 1.001
            assert (w_got != w_want).float().mean() < 0.01
        # The few tie steps move the logits far less than quantization itself does.
        assert rel_err(logits(quantized, text_ids), logits(reference, text_ids)) < err / 5
    with pytest.raises(PruningPlanError, match="quantized"):
        apply_plan(quantized, PrunePlan(layers=[0]))
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(quantized, tokenizer, get_quantizer("torchao"))


def test_save_quantized_is_atomic_and_refuses_existing(pruned, tokenizer, tmp_path):
    quantized = quantize(pruned, tokenizer, get_quantizer("torchao"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(prunekit.OutputExistsError):
        save_quantized(quantized, out, tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces only an empty directory or an earlier model output (issue 13)
    with pytest.raises(prunekit.PrunekitError, match="keep.txt"):
        save_quantized(quantized, out, tokenizer, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    save_quantized(quantized, out, tokenizer, overwrite=True)  # an empty directory
    save_quantized(quantized, out, tokenizer, overwrite=True, extra={"metrics": {"x": 1}})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "prunekit.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no leftovers
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["metrics"] == {"x": 1} and sidecar["quantization"]["quant_method"]


def test_torchao_tensor_subclass_without_marks_is_detected(pruned):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    bare = copy.deepcopy(pruned)
    quantize_(bare, Int8WeightOnlyConfig())  # no hf_quantizer, no quantization_config
    assert is_quantized(bare)


# ---- GPTQ / AWQ -------------------------------------------------------------------------------
needs_gptqmodel = pytest.mark.skipif(
    bool(gptqmodel_missing()),
    reason=f"{' and '.join(gptqmodel_missing())} not installed (pip install 'prunekit[gptq]')",
)


def rtn_error(pruned, ids, bits: int, group: int, sym: bool) -> float:
    """Logits error of plain round-to-nearest with the same grid (the baseline GPTQ and AWQ
    improve on with calibration)."""
    ref = copy.deepcopy(pruned)
    levels = 2**bits - 1
    with torch.no_grad():
        for layer in ref.model.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    w = m.weight.view(m.out_features, -1, group)
                    if sym:
                        s = w.abs().amax(-1, keepdim=True) / (levels // 2 + 0.5)
                        q = torch.clamp(torch.round(w / s), -(levels // 2) - 1, levels // 2) * s
                    else:
                        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                        s = (hi - lo) / levels
                        z = torch.round(-lo / s)
                        q = (torch.clamp(torch.round(w / s) + z, 0, levels) - z) * s
                    m.weight.copy_(q.view_as(m.weight))
    return rel_err(logits(ref, ids), logits(pruned, ids))


@needs_gptqmodel
def test_gptq_quantize_save_reload(pruned, tokenizer, text_ids, tmp_path):
    from prunekit.core.calibration import load_calibration

    calib = load_calibration(None, tokenizer, n_samples=16, seq_len=64)
    config = GPTQConfig(group_size=GROUP, n_samples=16, seq_len=64)
    quantized = quantize(pruned, tokenizer, get_quantizer("gptq"), config, calib_ids=calib)
    assert is_quantized(quantized) and not is_quantized(pruned)
    err, _ = check_roundtrip(quantized, pruned, tokenizer, text_ids, tmp_path, INT4_TOL, "gptq")
    # GPTQ minimises the layer output error on the calibration text: on held-out text of the
    # same kind it should not be worse than plain rounding to the same grid.
    held_out = load_calibration(None, tokenizer, n_samples=4, seq_len=64, seed=7)
    gptq = rel_err(logits(quantized, held_out), logits(pruned, held_out))
    assert gptq < 1.1 * rtn_error(pruned, held_out, 4, GROUP, sym=True)
    with pytest.raises(PruningPlanError, match="quantized"):
        apply_plan(quantized, PrunePlan(layers=[0]))


AWQ_BACKENDS = [
    pytest.param("gptqmodel", marks=needs_gptqmodel),
    pytest.param(
        "autoawq",
        marks=[
            needs_gptqmodel,
            pytest.mark.skipif(not autoawq_usable()[0], reason=autoawq_usable()[1]),
        ],
    ),
]


@needs_gptqmodel
def test_awq_gptqmodel_refuses_rows_it_cannot_clip(tokenizer):
    # One KV group of head_dim 32 left: v_proj has 32 output rows, GPTQModel's AWQ would
    # assert inside a worker thread. The quantizer says so before anything runs.
    one_group = apply_plan(quant_llama(), PrunePlan(heads={i: [2, 3] for i in range(3)}))
    config = AWQConfig(group_size=GROUP, n_samples=2, seq_len=16, backend="gptqmodel")
    with pytest.raises(QuantizationError, match=r"v_proj has 32 output features"):
        quantize(one_group, tokenizer, get_quantizer("awq"), config)


@pytest.mark.parametrize("backend", AWQ_BACKENDS)
def test_awq_quantize_save_reload(backend, pruned, tokenizer, text_ids, tmp_path):
    config = AWQConfig(group_size=GROUP, n_samples=16, seq_len=64, backend=backend)
    quantized = quantize(
        pruned, tokenizer, get_quantizer("awq"), config
    )  # Brown calibration by default
    assert quantized.__dict__["_prunekit_quantization"]["backend"] == backend
    check_roundtrip(quantized, pruned, tokenizer, text_ids, tmp_path, INT4_TOL, "awq")
