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
    # group_size None by default: fitted to the model (128, else 64, else 32) when quantizing
    assert quantizer_config(get_quantizer("gptq")) == GPTQConfig(bits=4, group_size=None)
    assert quantizer_config(get_quantizer("awq")) == AWQConfig(bits=4, group_size=None)
    assert quantizer_config(get_quantizer("gptq"), group_size=128).group_size == 128
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
    from prunekit.core.quantize import check_quantizable, group_size_fit

    per_layer = apply_plan(quant_llama(), PrunePlan(neurons={0: [0, 1]}))
    with pytest.raises(QuantizationError, match="per-layer"):
        check_quantizable(per_layer)  # what quantize() runs first, backend or not
    if get_quantizer("torchao").available()[0]:
        with pytest.raises(QuantizationError, match="per-layer"):
            quantize(per_layer, tokenizer, get_quantizer("torchao"))
    odd = apply_plan(quant_llama(), PrunePlan(neurons={i: list(range(32)) for i in range(3)}))
    gptq, config = get_quantizer("gptq"), GPTQConfig(group_size=GROUP)
    match = "224 input features, not a multiple of group_size 64; pass --quant-group-size 32"
    with pytest.raises(QuantizationError, match=match):
        group_size_fit(odd, gptq, config)  # what quantize() runs before the backend
    if gptq.available()[0]:
        with pytest.raises(QuantizationError, match=match):
            quantize(odd, tokenizer, gptq, config)
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
needs_torchao = pytest.mark.skipif(
    not get_quantizer("torchao").available()[0], reason=get_quantizer("torchao").available()[1]
)


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


@needs_torchao
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


@needs_torchao
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


@needs_torchao
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


# ---- group sizes that fit the model (issue 15) -----------------------------------------------
def test_group_size_fitting_picks_the_largest_that_divides_every_width():
    from prunekit.core.quant_groups import GroupSizeError, fit_group_size

    smollm2 = fit_group_size(None, {576: "the hidden size", 1536: "layer 0 MLP"})
    assert (smollm2.used, smollm2.requested, smollm2.fitted) == (64, None, True)
    assert smollm2.widths == (576, 1536)
    assert "default 128 does not divide the hidden size (576 input features)" in smollm2.note
    llama = fit_group_size(None, [4096, 11008])
    assert (llama.used, llama.fitted, llama.note) == (128, False, "group size 128 (the default)")
    assert fit_group_size(None, [288, 1536]).used == 32  # 288 = 32 x 9
    assert fit_group_size(-1, [100]).used == -1  # one scale per output channel always fits
    assert fit_group_size(64, [576, 1536]).used == 64  # explicit and dividing: used as given
    assert fit_group_size(16, [48]).used == 16  # explicit below 32 is the user's choice
    assert fit_group_size(None, [576]).to_dict() == {
        "requested": "default",
        "default": 128,
        "used": 64,
        "widths": [576],
        "note": fit_group_size(None, [576]).note,
    }
    # Nothing from 32 to 128 divides 100 = 4 x 25: refused, saying what to pass.
    with pytest.raises(GroupSizeError, match=r"layer 0 mlp.down_proj has 100 input features "
                       r"\(100 = 4 x 25\).*--quant-group-size -1.*round_to: 32") as e:  # fmt: skip
        fit_group_size(None, {100: "layer 0 mlp.down_proj", 576: "the hidden size"})
    assert isinstance(e.value, QuantizationError) and isinstance(e.value, ValueError)
    # Without per-channel groups (AWQ) the message does not offer -1.
    with pytest.raises(GroupSizeError) as e:
        fit_group_size(None, [100], per_channel_ok=False)
    assert "-1" not in str(e.value) and "--quant-group-size 4" not in str(e.value)
    with pytest.raises(GroupSizeError, match=r"--quant-group-size 8 \(groups of 8"):
        fit_group_size(None, [72])  # 72 = 8 x 9: 8 divides it, offered but not chosen
    # An explicit size that does not divide is refused with the one that fits proposed.
    with pytest.raises(GroupSizeError, match=r"the hidden size has 576 input features, not a "
                       r"multiple of group_size 128; pass --quant-group-size 64"):  # fmt: skip
        fit_group_size(128, {576: "the hidden size", 1536: "layer 0 MLP"})


def odd_llama(hidden: int = 192, intermediate: int = 384, seed: int = 0) -> nn.Module:
    """A tiny Llama whose hidden size is not a multiple of 128 (192 = 3 x 64)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=4, intermediate_size=intermediate,
        num_attention_heads=hidden // 32, num_key_value_heads=2, head_dim=32,
        tie_word_embeddings=True, initializer_range=0.05,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return tf.LlamaForCausalLM(config).eval()


def test_group_size_fit_on_a_model_and_per_quantizer(tokenizer):
    from prunekit.core.quant_groups import GroupSizeError, model_widths
    from prunekit.core.quantize import check_divisible, group_size_fit

    model = odd_llama()
    assert model_widths(model) == {192: "layer 0 self_attn.q_proj", 384: "layer 0 mlp.down_proj"}
    assert check_divisible(model, None) == 64 and check_divisible(model, -1) == -1
    config, fit = group_size_fit(model, get_quantizer("gptq"))
    assert config == GPTQConfig(group_size=64) and fit.used == 64 and fit.requested is None
    assert group_size_fit(model, get_quantizer("awq"))[0].group_size == 64
    # torchao: only int4_grouped quantizes in groups; the int8 schemes are left alone.
    assert group_size_fit(model, get_quantizer("torchao")) == (TorchAOConfig(), None)
    int4 = TorchAOConfig(scheme="int4_grouped")
    assert group_size_fit(model, get_quantizer("torchao"), int4)[0].group_size == 64
    with pytest.raises(GroupSizeError, match="group_size 128; pass --quant-group-size 64"):
        group_size_fit(model, get_quantizer("gptq"), GPTQConfig(group_size=128))
    # AWQ cannot use -1, so an unfittable width is refused without offering it.
    narrow = apply_plan(odd_llama(), PrunePlan(neurons={i: list(range(4)) for i in range(4)}))
    with pytest.raises(GroupSizeError, match="380 input features") as e:
        group_size_fit(narrow, get_quantizer("awq"))
    assert "-1" not in str(e.value)
    with pytest.raises(GroupSizeError, match=r"380 input features.*--quant-group-size -1"):
        group_size_fit(narrow, get_quantizer("gptq"))


def test_planned_widths_are_those_of_the_pruned_model():
    from prunekit.core.quant_groups import model_widths, planned_widths, shapes_after

    model = odd_llama()
    adapter = prunekit.get_plugins().adapters.get("llama")
    plan = PrunePlan(
        layers=[3],
        heads={i: [0, 1, 2] for i in (0, 1)},  # one whole KV group of three query heads
        neurons={i: list(range(64)) for i in (0, 1)},
        mlp=[2],
    )
    shapes = shapes_after(adapter.config_shapes(model.config), plan)
    pruned = apply_plan(model, plan)
    assert shapes == adapter.shapes(pruned)
    assert set(planned_widths(model.config, shapes)) == set(model_widths(pruned)) == {96, 192, 320}


def test_preflight_refuses_a_group_size_from_the_config_alone(tmp_path, tokenizer):
    from prunekit.core.preflight import check_model_input
    from prunekit.core.quant_groups import GroupSizeError
    from prunekit.core.targets import Targets

    path = prunekit.save_pretrained(odd_llama(), tmp_path / "odd", tokenizer)
    (path / "model.safetensors").unlink()  # preflight reads config.json only
    gptq = get_quantizer("gptq")
    check_model_input(path, targets=Targets(layers=1), quantize=(gptq, GPTQConfig()))
    with pytest.raises(GroupSizeError, match="hidden size has 192 input features.*size 64"):
        check_model_input(
            path, targets=Targets(layers=1), quantize=(gptq, GPTQConfig(group_size=128))
        )
    # The planned widths count: 20% of the neurons (round_to 64) leave 320 = 64 x 5 per
    # layer, so 64 fits; 30% without rounding leave 269, which nothing from 32 up divides.
    check_model_input(path, targets=Targets(neurons=0.2), quantize=(gptq, GPTQConfig()))
    odd = Targets(neurons=0.3, round_to=1)
    with pytest.raises(GroupSizeError, match=r"layer 0 MLP has 269 input features"):
        check_model_input(path, targets=odd, quantize=(gptq, GPTQConfig()))
    # torchao's int8 schemes have no groups: nothing to check; int4_grouped is checked.
    torchao = get_quantizer("torchao")
    check_model_input(path, targets=odd, quantize=(torchao, TorchAOConfig()))
    with pytest.raises(GroupSizeError, match="269 input features"):
        int4 = TorchAOConfig(scheme="int4_grouped")
        check_model_input(path, targets=odd, quantize=(torchao, int4))


# ---- compress --quantize end to end (CLI) -----------------------------------------------------
# Each quantizer with its defaults, except torchao's int4_grouped (its only grouped scheme).
E2E = [
    pytest.param("gptq", [], marks=needs_gptqmodel),
    pytest.param("awq", [], marks=needs_gptqmodel),
    pytest.param("torchao", ["--quant-scheme", "int4_grouped"], marks=needs_torchao),
]


def compress_cli(src, out, texts, *args, samples: int = 4, seq_len: int = 32, eval_chars=2000):
    import os
    import subprocess

    argv = [
        "compress", src, "-o", out, *args, "--calib", texts / "calib.txt",
        "--calib-samples", samples, "--seq-len", seq_len, "--eval-text", texts / "eval.txt",
        "--eval-max-chars", eval_chars, "--no-latency",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PRUNEKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "prunekit", *map(str, argv)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from conftest import brown_text, wiki_text

    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    (d / "eval.txt").write_text(wiki_text()[:4_000], encoding="utf-8")
    return d


def check_quantized_output(out, name: str, used: int, res, ppl_ratio: float = 1.25) -> dict:
    """The sidecar, report and metrics of a ``compress --quantize`` output; the quantized
    perplexity within ``ppl_ratio`` of the pruned model's (a random tiny model's perplexity is
    near its vocabulary size, which 4-bit noise barely moves: measured 0.95x (torchao int4)
    and 1.01x (gptq) the pruned model's)."""
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert not sidecar.get("failures"), sidecar["failures"]
    quant = sidecar["quantization"]
    assert quant["method"] == name and quant["config"]["group_size"] == used
    assert quant["group_size"]["requested"] == "default" and quant["group_size"]["used"] == used
    assert f"quantizing with {name} ({quant['group_size']['note']})" in res.stdout
    report = (out / "report.md").read_text()
    assert "## Quantization" in report and quant["group_size"]["note"] in report
    m = sidecar["metrics"]
    # The quantized model is evaluated like the others: same shapes, hence the same FLOPs and
    # (packed weights counted by in x out features) the same parameter count.
    assert m["quantized"]["flops_per_token"] == m["pruned"]["flops_per_token"] > 0
    assert m["quantized"]["params"] == m["pruned"]["params"]
    assert m["quantized"]["params_no_embeddings"] == m["pruned"]["params_no_embeddings"]
    q, p = m["quantized"]["perplexity"]["perplexity"], m["pruned"]["perplexity"]["perplexity"]
    assert 0.8 * p < q < ppl_ratio * p, (q, p)
    assert m["quantized"]["size_on_disk_mb"] < 0.5 * m["dense"]["size_on_disk_mb"]
    if name in ("gptq", "awq"):
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["group_size"] == used
    return sidecar


@pytest.mark.parametrize(("name", "extra"), E2E)
def test_compress_quantize_with_defaults_fits_the_group_size(name, extra, tokenizer, texts,
                                                              tmp_path):  # fmt: skip
    # hidden 192 = 3 x 64 and MLP 384: the default 128 does not divide the hidden size.
    src = prunekit.save_pretrained(odd_llama(), tmp_path / "dense", tokenizer)
    out = tmp_path / "out"
    res = compress_cli(src, out, texts, "--layers", "1", "--quantize", name, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    sidecar = check_quantized_output(out, name, 64, res)
    assert "default 128 does not divide layer 0 self_attn.q_proj (192" in res.stdout
    assert sidecar["quantization"]["group_size"]["widths"] == [192, 384]


@needs_gptqmodel
def test_compress_refuses_an_explicit_group_size_before_loading(tokenizer, texts, tmp_path):
    src = prunekit.save_pretrained(odd_llama(), tmp_path / "dense", tokenizer)
    (src / "model.safetensors").write_bytes(b"not read")  # preflight reads config.json only
    out = tmp_path / "out"
    args = ("--layers", "1", "--quantize", "gptq", "--quant-group-size", "128")
    res = compress_cli(src, out, texts, *args)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("prunekit: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr
    assert "192 input features, not a multiple of group_size 128" in errors[0]
    assert "pass --quant-group-size 64" in errors[0]
    assert "loading" not in res.stdout and not out.exists()


# AWQ runs end to end on the tiny model above; on SmolLM2 GPTQModel's AWQ scale search took
# 12.5 min on this shared 2-core CPU (GPTQ: 2.3 min, torchao: 1.3 min), beyond a slow test.
SMOLLM2_E2E = [
    pytest.param("gptq", [], marks=needs_gptqmodel),
    pytest.param("torchao", ["--quant-scheme", "int4_grouped"], marks=needs_torchao),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "extra"), SMOLLM2_E2E)
def test_compress_quantize_smollm2_with_defaults(name, extra, texts, tmp_path):
    # SmolLM2-135M: hidden 576 = 9 x 64, MLP 1536; the default group size 128 becomes 64.
    from prunekit.core.models import default_model_dir

    out = tmp_path / "out"
    # GPTQ/AWQ calibrate on the pruning windows (4 x 64 tokens here)
    res = compress_cli(
        default_model_dir(), out, texts, "--layers", "6", "--quantize", name, *extra,
        samples=4, seq_len=64, eval_chars=1000,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    # 4-bit on a 135M model costs perplexity: measured 1.5x (torchao int4, gptq with 8 x 128
    # calibration tokens) to 1.8x (gptq with these 4 x 64) the pruned model's on this slice;
    # a broken quantization (wrong groups, packing) is off by orders of magnitude.
    sidecar = check_quantized_output(out, name, 64, res, ppl_ratio=2.5)
    assert sidecar["quantization"]["group_size"]["widths"] == [576, 1536]
