"""Triton kernels against their torch references; the benchmark and ``bench-kernels``.

Kernel checks run in ONE fresh subprocess (``KERNEL_SCRIPT``), with ``TRITON_INTERPRET=1``
when there is no GPU. Triton decides interpreted-or-compiled when a ``@triton.jit`` function
is defined, including ``triton.language``'s own helpers at ``import triton``; any earlier test
in this process that imported Triton without the variable would leave the kernels unrunnable
on the CPU, so the kernels never run in the pytest process itself.

Tolerances (elementwise ``|out - ref| <= atol + rtol * |ref|``, ref computed in float32 from
the same, already-rounded inputs, outputs of order 1):

- float32: atol = rtol = 1e-5 (IEEE fp32 dot products, TF32 off, as torch by default);
- float16: atol = rtol = 2e-3, about 4 fp16 ulps at 1.0 (fp32 accumulation; the kernel
  rounds the output, and the MLP its intermediate activation, to fp16).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_python

if not torch.cuda.is_available():
    # Matches the Makefile; only matters for in-process imports of prunekit.kernels, which here
    # never launch a kernel (see the module docstring).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3)}

KERNEL_SCRIPT = r"""
import json, sys, traceback
import torch
import prunekit.kernels as K
from prunekit.kernels.mlp import _interpreting

TOL = TOL_JSON
dev = "cuda" if torch.cuda.is_available() else "cpu"
assert dev == "cuda" or _interpreting(), "the kernels are not in interpreter mode"
torch.backends.cuda.matmul.allow_tf32 = False
results = {}

def rand(*shape, scale=1.0, gen):
    return torch.randn(*shape, generator=gen) * scale

def check(name, dtype, fn):
    # fn(dtype) -> (kernel output, float32 reference)
    try:
        out, ref = fn(getattr(torch, dtype))
        out, ref = out.float().cpu(), ref.float().cpu()
        atol, rtol = TOL[dtype]
        excess = ((out - ref).abs() / (atol + rtol * ref.abs())).max().item()
        results[name] = {
            "shape": list(out.shape), "ref_shape": list(ref.shape),
            "max_abs_err": (out - ref).abs().max().item(),
            "ref_max": ref.abs().max().item(),
            "tol_ratio": excess, "finite": bool(torch.isfinite(out).all()),
        }
    except Exception:
        results[name] = {"error": traceback.format_exc()}

def to(dtype, *ts):
    # round to dtype on the host, so kernel and reference see the same numbers
    return [t.to(dtype) for t in ts]

def gated(dtype, tokens=37, hidden=72, inter=1000, batch_dims=(), transposed=False):
    g = torch.Generator().manual_seed(0)
    x = rand(*batch_dims, tokens, hidden, gen=g)
    wg = rand(inter, hidden, scale=hidden ** -0.5, gen=g)
    wu = rand(inter, hidden, scale=hidden ** -0.5, gen=g)
    wd = rand(hidden, inter, scale=inter ** -0.5, gen=g)
    x, wg, wu, wd = to(dtype, x, wg, wu, wd)
    ref = K.gated_mlp_reference(x.float(), wg.float(), wu.float(), wd.float())
    d = [t.to(dev) for t in (x, wg, wu, wd)]
    if transposed:  # same values, nn.Linear layout as a transposed (non-contiguous) view
        d[1] = d[1].t().contiguous().t()
        d[3] = d[3].t().contiguous().t()
        assert not d[1].is_contiguous()
    return K.gated_mlp(*d), ref

def gelu(dtype, tokens=37, hidden=72, inter=1000, bias=True):
    g = torch.Generator().manual_seed(1)
    x = rand(tokens, hidden, gen=g)
    w1 = rand(inter, hidden, scale=hidden ** -0.5, gen=g)
    b1 = rand(inter, scale=0.5, gen=g)
    w2 = rand(hidden, inter, scale=inter ** -0.5, gen=g)
    b2 = rand(hidden, scale=0.5, gen=g)
    x, w1, b1, w2, b2 = to(dtype, x, w1, b1, w2, b2)
    if not bias:
        b1 = b2 = None
    f = lambda t: None if t is None else t.float()
    ref = K.gelu_mlp_reference(x.float(), w1.float(), f(b1), w2.float(), f(b2))
    d = [None if t is None else t.to(dev) for t in (x, w1, b1, w2, b2)]
    return K.gelu_mlp(*d), ref

def attn(dtype, b=2, hq=9, hkv=3, tq=45, tk=None, d=64, causal=True, strided=False,
         ref_fn=None):
    g = torch.Generator().manual_seed(2)
    tk = tq if tk is None else tk
    if strided:  # [B, T, H, D] projections viewed as [B, H, T, D] without a copy
        q = rand(b, tq, hq, d, gen=g).transpose(1, 2)
        k = rand(b, tk, hkv, d, gen=g).transpose(1, 2)
        v = rand(b, tk, hkv, d, gen=g).transpose(1, 2)
    else:
        q, k, v = (rand(b, h, t, d, gen=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    q, k, v = to(dtype, q, k, v)
    ref = (ref_fn or K.attention_reference)(q.float(), k.float(), v.float(), causal=causal)
    return K.attention(q.to(dev), k.to(dev), v.to(dev), causal=causal), ref

def wrong_grouping(q, k, v, causal):
    # GQA mapping h -> h % Hkv (repeat instead of repeat_interleave): a plausible bug
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

for dt in ("float32", "float16"):
    check(f"gated_mlp-inter1000-{dt}", dt, lambda t: gated(t))
    check(f"gelu_mlp-inter1000-{dt}", dt, lambda t: gelu(t))
    for causal in (True, False):
        name = f"attention-9q3kv-T45-d64-{'causal' if causal else 'full'}-{dt}"
        check(name, dt, lambda t: attn(t, causal=causal))
check("gated_mlp-3d-strided-inter200-float32", "float32",
      lambda t: gated(t, tokens=19, inter=200, batch_dims=(2,), transposed=True))
check("gated_mlp-1token-inter33-float32", "float32", lambda t: gated(t, tokens=1, inter=33))
check("gelu_mlp-nobias-inter200-float32", "float32", lambda t: gelu(t, inter=200, bias=False))
check("attention-mqa-4q1kv-T33-d128-causal-float32", "float32",
      lambda t: attn(t, b=1, hq=4, hkv=1, tq=33, d=128))
check("attention-mha-cross-T20x45-d16-full-float32", "float32",
      lambda t: attn(t, b=1, hq=2, hkv=2, tq=20, tk=45, d=16, causal=False))
check("attention-strided-6q2kv-T23-d32-causal-float16", "float16",
      lambda t: attn(t, b=2, hq=6, hkv=2, tq=23, d=32, strided=True))
# negative controls: the comparisons above must be able to fail
check("control-wrong-gqa-grouping", "float32", lambda t: attn(t, ref_fn=wrong_grouping))
check("control-causal-vs-full", "float32",
      lambda t: attn(t, causal=True, ref_fn=lambda q, k, v, causal:
                     K.attention_reference(q, k, v, causal=False)))

# launcher validation: fails before anything is launched, says how to fix
errors = {}
def err(name, fn):
    try:
        fn()
        errors[name] = None
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=dev)
err("heads-not-multiple", lambda: K.attention(z(1, 9, 8, 16), z(1, 2, 8, 16), z(1, 2, 8, 16)))
err("head-dim-8", lambda: K.attention(z(1, 2, 8, 8), z(1, 2, 8, 8), z(1, 2, 8, 8)))
err("causal-lengths", lambda: K.attention(z(1, 2, 8, 16), z(1, 2, 9, 16), z(1, 2, 9, 16)))
err("w-down-shape", lambda: K.gated_mlp(z(3, 8), z(12, 8), z(12, 8), z(12, 8)))
err("dtype-mix", lambda: K.gated_mlp(z(3, 8), z(12, 8, dtype=torch.float16), z(12, 8),
                                     z(8, 12)))
print("RESULTS" + json.dumps({"results": results, "errors": errors}))
"""


@pytest.fixture(scope="module")
def kernel_run():
    env = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    code = KERNEL_SCRIPT.replace("TOL_JSON", json.dumps(TOL))
    proc = run_python(code, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")]
    assert proc.returncode == 0 and lines, f"kernel script failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("RESULTS"))


ACCURACY_CASES = [
    *(
        f"{op}-{dt}"
        for dt in ("float32", "float16")
        for op in (
            "gated_mlp-inter1000",
            "gelu_mlp-inter1000",
            "attention-9q3kv-T45-d64-causal",
            "attention-9q3kv-T45-d64-full",
        )
    ),
    "gated_mlp-3d-strided-inter200-float32",
    "gated_mlp-1token-inter33-float32",
    "gelu_mlp-nobias-inter200-float32",
    "attention-mqa-4q1kv-T33-d128-causal-float32",
    "attention-mha-cross-T20x45-d16-full-float32",
    "attention-strided-6q2kv-T23-d32-causal-float16",
]


@pytest.mark.parametrize("case", ACCURACY_CASES)
def test_kernel_matches_torch_reference(kernel_run, case):
    r = kernel_run["results"][case]
    assert "error" not in r, r.get("error")
    assert r["shape"] == r["ref_shape"]
    assert r["finite"]
    assert r["ref_max"] > 0.1, "degenerate test data"
    assert r["tol_ratio"] <= 1.0, f"{case}: max |err| {r['max_abs_err']:.3g} exceeds tolerance"


@pytest.mark.parametrize("control", ["control-wrong-gqa-grouping", "control-causal-vs-full"])
def test_accuracy_checks_catch_wrong_answers(kernel_run, control):
    """The same data compared with a wrong reference (GQA h % Hkv instead of h // group;
    causal vs non-causal) is far outside the tolerance, so the checks above have teeth."""
    r = kernel_run["results"][control]
    assert "error" not in r, r.get("error")
    assert r["max_abs_err"] > 0.1
    assert r["tol_ratio"] > 1000


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("heads-not-multiple", ["(9)", "multiple", "KV heads (2)"]),
        ("head-dim-8", ["head_dim", "power of two", "8"]),
        ("causal-lengths", ["causal", "8", "9"]),
        ("w-down-shape", ["w_down", "[hidden=8, intermediate=12]", "(12, 8)"]),
        ("dtype-mix", ["w_gate", "torch.float16", "cast"]),
    ],
)
def test_launchers_reject_bad_inputs_with_a_fix(kernel_run, name, words):
    message = kernel_run["errors"][name]
    assert message is not None and message.startswith("ValueError"), message
    for word in words:
        assert word in message, message


# --------------------------------------------------------------------------------------------
# optional dependency: nothing imports triton unless asked
# --------------------------------------------------------------------------------------------
def test_prunekit_and_cli_do_not_import_triton():
    proc = run_python(
        "import sys, prunekit, prunekit.cli\n"
        "prunekit.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')"
        " or m.startswith('prunekit.kernels')))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_torch_path_works_without_triton(tmp_path):
    """Triton blocked: references and the CPU benchmark work; a kernel says what to install."""
    proc = run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, prunekit.kernels as K\n"
        "x = torch.randn(3, 8); w = torch.randn(5, 8)\n"
        "print('ref', tuple(K.gated_mlp_reference(x, w, w, w.T).shape))\n"
        "try:\n    from prunekit.kernels import attention\nexcept ImportError as e:\n"
        "    print('ImportError', e)\n"
        "shape = dict(hidden=16, n_heads=2, n_kv_heads=1, head_dim=8, intermediate=24)\n"
        "rows = K.bench_layer_shapes([dict(label='dense', **shape)], seq_len=8, repeats=1,"
        " device='cpu')\n"
        "print('providers', sorted({r['provider'] for r in rows}))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "ref (3, 8)" in proc.stdout
    assert "ImportError prunekit.kernels.attention needs Triton" in proc.stdout
    assert "pip install 'prunekit[kernels]'" in proc.stdout
    assert "providers ['torch']" in proc.stdout


# --------------------------------------------------------------------------------------------
# benchmark logic (CPU, torch provider; no kernel launches in this process)
# --------------------------------------------------------------------------------------------
def _shape(label, **kw):
    base = dict(hidden=32, n_heads=8, n_kv_heads=2, head_dim=16, intermediate=128, gated=True)
    return {"label": label, **{**base, **kw}}


def test_bench_rows_speedups_flops_and_rounding_notes():
    from prunekit.kernels import bench_layer_shapes, format_table

    rows = bench_layer_shapes(
        [_shape("dense"), _shape("pruned", n_heads=4, n_kv_heads=1, intermediate=72)],
        seq_len=10,
        batch=2,
        repeats=2,
        device="cpu",
    )
    by = {(r["label"], r["op"]): r for r in rows}
    assert set(by) == {
        (lbl, op) for lbl in ("dense", "pruned") for op in ("gated_mlp", "attention")
    }
    assert {r["provider"] for r in rows} == {"torch"}  # no GPU: Triton is not timed
    # hand-counted FLOPs: MLP 3 matmuls of tokens x hidden x inter; causal attention counts the
    # 10*11/2 = 55 query-key pairs per head, 2 matmuls of head_dim each
    assert by["dense", "gated_mlp"]["flops"] == 2 * 20 * 32 * 128 * 3
    assert by["pruned", "gated_mlp"]["flops"] == 2 * 20 * 32 * 72 * 3
    assert by["dense", "attention"]["flops"] == 4 * 2 * 8 * 55 * 16
    assert by["pruned", "gated_mlp"]["ideal_speedup"] == pytest.approx(128 / 72)
    assert by["pruned", "attention"]["ideal_speedup"] == pytest.approx(2.0)
    for r in rows:
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
    pr = by["pruned", "gated_mlp"]
    dr = by["dense", "gated_mlp"]
    assert pr["speedup_vs_dense"] == pytest.approx(dr["ms"] / pr["ms"])
    assert dr["speedup_vs_dense"] is None
    # 72 is off the grid (next: 128 for both x64 and x128); 4 heads * 16 = 64 is off x128 only
    assert "intermediate=72 is not a multiple of 64 or 128" in pr["rounding_note"]
    assert "128 (x64/x128)" in pr["rounding_note"]
    assert (
        "n_heads*head_dim=64 is not a multiple of 128" in by["pruned", "attention"]["rounding_note"]
    )
    assert by["dense", "gated_mlp"]["rounding_note"] == ""
    table = format_table(rows)
    assert "[1] intermediate=72" in table and "1.78x" in table


def test_rounded_head_counts_keep_whole_kv_groups():
    from prunekit.kernels.shapes import KernelShape, rounded_heads

    smol = KernelShape("pruned", hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1)
    assert rounded_heads(smol, 64) == 9
    assert rounded_heads(smol, 128) == 12  # 10 and 11 heads would split KV groups
    llama = KernelShape("p", hidden=4096, n_heads=24, n_kv_heads=6, head_dim=128, intermediate=1)
    assert rounded_heads(llama, 128) == 24


def test_layer_shape_validation_names_the_field():
    from prunekit.kernels.shapes import KernelShape

    with pytest.raises(ValueError, match="n_heads .9. must be a multiple of n_kv_heads .2."):
        KernelShape("dense", hidden=8, n_heads=9, n_kv_heads=2, head_dim=16, intermediate=4)
    with pytest.raises(ValueError, match="intermediate must be an integer >= 1"):
        KernelShape("dense", hidden=8, n_heads=2, n_kv_heads=2, head_dim=16, intermediate=0)
    with pytest.raises(ValueError, match="unknown layer-shape keys .'width'."):
        KernelShape.coerce({**_shape("dense"), "width": 3})
    assert KernelShape.coerce(_shape("dense", gated=False)).causal is False  # BERT: encoder


def test_csv_and_png_writers(tmp_path):
    from prunekit.kernels.output import COLUMNS, plot, write_csv

    row = {c: None for c in COLUMNS}
    row.update(label="dense", op="gated_mlp", shape="s", provider="torch", ms=1.0, ms_p20=0.9)
    row.update(ms_p80=1.1, flops=10, tflops=1e-8, rounding_note="", device="cpu")
    out = write_csv([row, {**row, "label": "pruned", "speedup_vs_dense": 1.5}], tmp_path / "a.csv")
    with out.open() as fh:
        got = list(csv.DictReader(fh))
    assert [r["label"] for r in got] == ["dense", "pruned"]
    assert got[1]["speedup_vs_dense"] == "1.5" and got[0]["speedup_vs_dense"] == ""
    png = plot(
        [row, {**row, "label": "pruned", "speedup_vs_dense": 1.5, "ideal_speedup": 2.0}],
        tmp_path / "a.png",
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.png"]  # no temp files


def test_kernel_shape_from_core_layer_shape_and_plot_leaves_pyplot_alone(tmp_path):
    """A core LayerShape becomes a timing shape with the adapter's kinds; plotting draws on its
    own Figure and neither imports pyplot nor switches the process-wide backend."""
    import matplotlib

    from prunekit.core.shapes import LayerShape
    from prunekit.kernels.bench import bench_layer_shapes
    from prunekit.kernels.output import plot
    from prunekit.kernels.shapes import KernelShape

    layer = LayerShape(n_heads=6, n_kv_heads=3, head_dim=16, intermediate=66)
    shape = KernelShape.from_layer(layer, label="pruned", hidden=96, gated=False, causal=False)
    assert shape == KernelShape("pruned", 96, 6, 3, 16, 66, gated=False, causal=False)
    rows = bench_layer_shapes([shape], seq_len=4, repeats=1, device="cpu")
    assert [(r["op"], r["width"]) for r in rows] == [("gelu_mlp", 66), ("attention", 96)]
    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot(rows, tmp_path / "k.png")
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


# --------------------------------------------------------------------------------------------
# prunekit bench-kernels, end to end
# --------------------------------------------------------------------------------------------
def _tiny_llama(tmp_path: Path) -> tuple[Path, object]:
    import transformers as tf

    from prunekit import save_pretrained

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=96,
        num_hidden_layers=4,
        intermediate_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
    )
    model = tf.LlamaForCausalLM(config).eval()
    dense = save_pretrained(model, tmp_path / "dense")
    return dense, model


#: A short CPU timing: 12 tokens, one repeat.
FAST_CPU = ("--seq-len", "12", "--repeats", "1", "--device", "cpu")
PLAN = {"layers": [3], "heads": {"0": [2, 3], "1": [0, 2, 4]}, "neurons": {"0": list(range(30))}}


def _bench(*argv: str):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "prunekit", "bench-kernels", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def _read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "kernels.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_bench_kernels_cli_with_plan_and_with_pruned_dir(tmp_path):
    from prunekit import PrunePlan, apply_plan, save_pretrained
    from prunekit.core.io import read_config
    from prunekit.kernels.shapes import planned_shapes

    dense_dir, model = _tiny_llama(tmp_path)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(PLAN))

    # the shapes computed from the config alone agree with real surgery
    from prunekit import get_adapter

    adapter = get_adapter(model)
    expect = planned_shapes(
        adapter.config_shapes(read_config(dense_dir)), PrunePlan.from_dict(PLAN)
    )
    apply_plan(model, PrunePlan.from_dict(PLAN))
    assert expect == adapter.shapes(model)
    pruned_dir = save_pretrained(model, tmp_path / "pruned")

    out = tmp_path / "out-plan"
    proc = _bench(str(dense_dir), "--plan", str(plan_file), "-o", str(out), *FAST_CPU)
    assert proc.returncode == 0, proc.stderr
    assert "timing the torch path only" in proc.stdout
    assert "layers 0: 4 heads / 2 KV, head_dim 16, MLP 66" in proc.stdout
    assert "layers 1: 3 heads / 3 KV, head_dim 16, MLP 96" in proc.stdout
    assert "whole stack" in proc.stdout
    rows = _read_rows(out)
    assert (out / "kernels.png").read_bytes()[:4] == b"\x89PNG"
    keyed = {(r["label"], r["op"], r["width"]): r for r in rows}
    # dense: 6 heads x 16 = 96 wide attention, MLP 96; pruned adds MLP 66, attention 64 and 48
    assert set(keyed) == {
        ("dense", "gated_mlp", "96"),
        ("dense", "attention", "96"),
        ("pruned", "gated_mlp", "66"),
        ("pruned", "attention", "64"),
        ("pruned", "gated_mlp", "96"),
        ("pruned", "attention", "48"),
        ("pruned", "attention", "96"),
    }
    assert {r["provider"] for r in rows} == {"torch"}
    assert float(keyed["pruned", "gated_mlp", "66"]["ideal_speedup"]) == pytest.approx(96 / 66)
    assert float(keyed["pruned", "attention", "48"]["ideal_speedup"]) == pytest.approx(2.0)
    assert (
        "intermediate=66 is not a multiple of 64 or 128"
        in (keyed["pruned", "gated_mlp", "66"]["rounding_note"])
    )

    # the same comparison from the saved pruned directory
    out2 = tmp_path / "out-dir"
    proc = _bench(str(dense_dir), str(pruned_dir), "-o", str(out2), *FAST_CPU)
    assert proc.returncode == 0, proc.stderr
    assert {(r["label"], r["op"], r["width"]) for r in _read_rows(out2)} == set(keyed)


def test_bench_kernels_cli_errors(tmp_path, capsys):
    from prunekit.cli import main

    dense_dir, _ = _tiny_llama(tmp_path)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"heads": {"0": [0, 1, 2, 3, 4, 5]}}))
    out = tmp_path / "out"
    assert main(["bench-kernels", str(dense_dir), str(dense_dir), "--plan", str(plan_file)]) == 2
    assert "either --plan or PRUNED_DIR" in capsys.readouterr().err
    assert main(["bench-kernels", str(dense_dir), "--plan", str(plan_file), "-o", str(out)]) == 2
    assert "removes all 6 heads of layer 0" in capsys.readouterr().err
    assert main(["bench-kernels", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert not out.exists()  # nothing written when the input is bad
