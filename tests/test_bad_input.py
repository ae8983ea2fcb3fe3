"""Bad input never costs data, time or a traceback (issue 13).

Every case runs the real CLI in a fresh interpreter, as a user would, and asserts:
the exit code (2: bad input, 1: failure while working), a one-line ``prunekit: error: ...``
message without a traceback, nothing written at the output path, no stray temporary
directory beside it, and the input model's files unchanged (hash of names and bytes).

Preflight cases also assert that no weight tensor was read: the runner wraps
``safetensors.safe_open`` before anything imports it and counts ``get_tensor``/``get_slice``
calls on weight files (headers may be read).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import brown_text, save_tiny, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

RUNNER = r"""
import json, os, sys
for name in json.loads(os.environ.get("PK_HIDE_MODULES", "[]")):
    sys.modules[name] = None  # `import name` raises ImportError, as if not installed
count_file = os.environ.get("PK_COUNT_READS")
if count_file:
    import safetensors
    _orig = safetensors.safe_open

    class _Counting:
        def __init__(self, inner):
            self._inner = inner
        def __enter__(self):
            self._inner.__enter__()
            return self
        def __exit__(self, *a):
            return self._inner.__exit__(*a)
        def _count(self):
            with open(count_file, "a") as f:
                f.write("read\n")
        def get_tensor(self, *a, **k):
            self._count()
            return self._inner.get_tensor(*a, **k)
        def get_slice(self, *a, **k):
            self._count()
            return self._inner.get_slice(*a, **k)
        def __getattr__(self, name):
            return getattr(self._inner, name)

    def safe_open(*a, **k):
        return _Counting(_orig(*a, **k))

    safetensors.safe_open = safe_open
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    reads: int = 0
    extra: dict = field(default_factory=dict)


def run_cli(*args, hide=(), count_reads: Path | None = None, timeout=600) -> Run:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PRUNEKIT_DEBUG", None)
    env["PK_HIDE_MODULES"] = json.dumps(list(hide))
    if count_reads is not None:
        count_reads.unlink(missing_ok=True)
        env["PK_COUNT_READS"] = str(count_reads)
    res = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    reads = 0
    if count_reads is not None and count_reads.exists():
        reads = len(count_reads.read_text().splitlines())
    return Run(res.returncode, res.stdout, res.stderr, reads)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def assert_one_line_error(res: Run, code: int, *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("prunekit: error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    stray = [p.name for p in out.parent.glob(f".{out.name}*")]
    assert not stray, stray


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    brown = brown_text()
    (d / "calib.txt").write_text(brown[:40_000], encoding="utf-8")
    (d / "eval.txt").write_text(brown[-20_000:], encoding="utf-8")
    (d / "empty.txt").write_text("", encoding="utf-8")
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {arch: save_tiny(arch, d / arch) for arch in ("llama", "bert")}
    # An architecture without an adapter.
    import transformers as tf

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    cfg = tf.GPTNeoXConfig(vocab_size=128, num_hidden_layers=2, **sizes)
    neox = d / "neox"
    tf.GPTNeoXForCausalLM(cfg).save_pretrained(neox)
    tiny_tokenizer().save_pretrained(neox)
    out["neox"] = neox
    return out


@pytest.fixture
def work(tmp_path, models) -> dict[str, Path]:
    """A private copy of the tiny models (cases may corrupt them)."""
    out = {}
    for name, src in models.items():
        dst = tmp_path / "in" / name
        shutil.copytree(src, dst)
        out[name] = dst
    return out


def compress_args(
    model: Path,
    out: Path,
    texts: dict[str, Path],
    *extra: str,
    calib: Path | str | None = None,
    eval_text: Path | str | None = None,
    seq_len: int = 32,
) -> list[str]:
    return [
        "compress",
        model,
        "-o",
        out,
        "--calib",
        calib if calib is not None else texts["calib"],
        "--calib-samples",
        "4",
        "--seq-len",
        str(seq_len),
        "--eval-text",
        eval_text if eval_text is not None else texts["eval"],
        "--eval-max-chars",
        "4000",
        "--no-latency",
        *extra,
    ]


# ---- output guards -------------------------------------------------------------------------
def test_compress_into_its_own_input_is_refused(work, texts, tmp_path):
    m = work["llama"]
    before = tree_hash(m)
    res = run_cli(*compress_args(m, m, texts, "--layers", "1", "--overwrite"))
    assert_one_line_error(res, 2, "input")
    assert tree_hash(m) == before


@pytest.mark.parametrize(
    "where, flags", [("itself", ("--overwrite",)), ("a folder inside it", ())], ids=str
)
def test_apply_into_its_own_input_is_refused(where, flags, work, tmp_path):
    m = work["llama"]
    out = m if where == "itself" else m / "pruned"
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1]}))
    before = tree_hash(m)
    res = run_cli("apply", m, "--plan", tmp_path / "plan.json", "-o", out, *flags)
    assert_one_line_error(res, 2, "input")
    assert tree_hash(m) == before


def test_apply_into_the_parent_of_the_input_is_refused(work, tmp_path):
    nest = tmp_path / "nest"
    shutil.copytree(work["llama"], nest / "input")
    (nest / "notes.txt").write_text("unrelated")
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1]}))
    before = tree_hash(nest)
    res = run_cli(
        "apply", nest / "input", "--plan", tmp_path / "plan.json", "-o", nest, "--overwrite"
    )
    assert_one_line_error(res, 2, "input")
    assert tree_hash(nest) == before


def test_overwrite_refuses_a_directory_with_unrelated_files(work, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1]}))
    res = run_cli(
        "apply", work["llama"], "--plan", tmp_path / "plan.json", "-o", out, "--overwrite"
    )
    assert_one_line_error(res, 2, "thesis.tex")
    assert (out / "thesis.tex").read_text() == "precious"


def test_overwrite_replaces_an_earlier_prunekit_output(work, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1]}))
    args = ("apply", work["llama"], "--plan", tmp_path / "plan.json", "-o", out)
    assert run_cli(*args).returncode == 0
    res = run_cli(*args, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert (out / "prunekit.json").is_file()


def test_stale_temporary_directory_is_reported_and_removed(work, tmp_path):
    out = tmp_path / "o"
    stale = tmp_path / ".o.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / "plan.json").write_text(json.dumps({"layers": [1]}))
    res = run_cli("apply", work["llama"], "--plan", tmp_path / "plan.json", "-o", out)
    assert res.returncode == 0, res.stderr
    assert not stale.exists()
    assert ".o.tmp-deadbeef" in res.stdout + res.stderr


# ---- the matrix: one-line errors, nothing written, input unchanged -------------------------
def _plan_file(tmp_path: Path, plan) -> Path:
    p = tmp_path / "plan.json"
    p.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return p


def _compress(*extra: str, **kw):
    return lambda m, o, t, p: compress_args(m, o, t, *extra, **kw)


def _compress_with(**texts: str):
    """``compress --layers 1`` with ``--calib`` / ``--eval-text`` from the texts fixture or
    a literal (``calib="empty"`` -> texts["empty"])."""

    def build(m, o, t, p):
        kw = {k: t[v] if v in t else v for k, v in texts.items()}
        if kw.get("eval_text") == "nope.txt":
            kw["eval_text"] = t["calib"].parent / "nope.txt"
        return compress_args(m, o, t, "--layers", "1", **kw)

    return build


def _apply(plan):
    return lambda m, o, t, p: ["apply", m, "--plan", _plan_file(p, plan), "-o", o]


L1 = ("--layers", "1")
LAYER1 = _compress(*L1)

# name: (model, args builder, exit code, needles, preflight: no weight read)
CASES = {
    "nonexistent model": ("missing", LAYER1, 2, ("does not exist",), True),
    "not a model dir": ("notmodel", LAYER1, 2, ("config.json",), True),
    "unsupported architecture": ("neox", LAYER1, 2, ("gpt_neox", "adapter"), True),
    "fraction out of range": ("llama", _compress("--layers", "1.5"), 2, ("layers",), True),
    "unknown layer scorer": (
        "llama",
        _compress(*L1, "--layer-scorer", "nope"),
        2,
        ("nope", "block_influence"),
        True,
    ),
    "unknown quantizer": (
        "llama",
        _compress(*L1, "--quantize", "nope"),
        2,
        ("nope", "torchao"),
        True,
    ),
    "unknown recovery": ("llama", _compress(*L1, "--recover", "nope"), 2, ("nope", "lora"), True),
    "quantizer backend missing": (
        "llama",
        _compress(*L1, "--quantize", "torchao"),
        2,
        ("torchao",),
        True,
    ),
    "per-layer targets with a quantizer": (
        "llama",
        _compress("--neurons", "0.25", "--mode", "per_layer", "--quantize", "gptq"),
        2,
        ("per_layer", "mode uniform"),
        True,
    ),
    "sub-block removal with a quantizer": (
        "llama",
        _compress("--attention", "1", "--quantize", "awq"),
        2,
        ("sub-blocks", "unquantized"),
        True,
    ),
    "qlora without cuda": ("llama", _compress(*L1, "--recover", "qlora"), 2, ("qlora",), True),
    "layer target above unprotected": ("llama", _compress("--layers", "5"), 2, ("layers",), True),
    "neurons beyond the model": ("llama", _compress("--neurons", "100000"), 2, ("neurons",), True),
    "empty calibration file": ("llama", _compress_with(calib="empty"), 2, ("empty",), True),
    "calibration dataset that does not resolve": (
        "llama",
        _compress_with(calib="no-such-org/no_such_dataset_xyz"),
        2,
        ("no_such_dataset_xyz",),
        True,
    ),
    "eval text missing": ("llama", _compress_with(eval_text="nope.txt"), 2, ("nope.txt",), True),
    "bert seq_len beyond positions": (
        "bert",
        _compress(*L1, seq_len=1024),
        2,
        ("seq", "512"),
        True,
    ),
    "garbage safetensors": ("garbage", LAYER1, 2, ("model.safetensors",), False),
    "truncated safetensors": ("truncated", LAYER1, 2, ("model.safetensors",), False),
    "config.json not json": ("badconfig", LAYER1, 2, ("config.json",), True),
    "pickled weights": ("pickled", LAYER1, 2, ("--allow-pickle",), True),
    "quantized input (gptq config)": ("gptqconfig", LAYER1, 2, ("quantized",), True),
    "existing output": ("llama", LAYER1, 2, ("--overwrite",), True),
    "plan: heads count not a list": ("llama", _apply({"heads": {"0": 5}}), 2, ("heads",), True),
    "plan: fractional layer": ("llama", _apply({"layers": [1.7]}), 2, ("1.7",), True),
    "plan: GQA-breaking": ("llama", _apply({"heads": {"1": [0]}}), 2, ("GQA",), True),
    "plan: out of range": ("llama", _apply({"layers": [9]}), 2, ("out of range",), True),
    "plan: unknown key": ("llama", _apply({"layer": [1]}), 2, ("layer",), True),
    "plan: malformed JSON": ("llama", _apply('{"layers": [1'), 2, ("plan.json",), True),
}


def _device_case(command: str, *flags: str):
    """``compress`` / ``score`` / ``demo`` with device flags (issue 14): a bad value fails
    before any work, naming the flag and the values it takes."""

    def build(m, o, t, p):
        if command == "compress":
            return compress_args(m, o, t, *L1, *flags)
        if command == "score":
            calib = ["--calib", t["calib"], "--calib-samples", "4", "--seq-len", "32"]
            return ["score", m, "-o", o, *calib, *flags]
        return ["demo", "-o", o, *flags]

    return build


# name: (flags, needles of the one-line error)
DEVICE_FLAGS = {
    "unknown device": (("--device", "tpu"), ("--device", "tpu", "auto|cpu|cuda")),
    "cuda on a machine without": (("--device", "cuda"), ("--device", "has none", "--device cpu")),
    "dtype int8": (("--dtype", "int8"), ("--dtype", "int8", "bfloat16|float16|float32")),
    "max-memory without device-map": (
        ("--max-memory", "cpu=1GiB"),
        ("--max-memory", "needs --device-map"),
    ),
    "malformed max-memory": (
        ("--device-map", "auto", "--max-memory", "cpu"),
        ("--max-memory", "DEVICE=SIZE"),
    ),
}
for _command in ("compress", "score", "demo"):
    for _what, (_flags, _needles) in DEVICE_FLAGS.items():
        CASES[f"{_command}: {_what}"] = (
            "llama",
            _device_case(_command, *_flags),
            2,
            _needles,
            True,
        )


def _prepare(kind: str, work: dict[str, Path], tmp_path: Path) -> Path:
    if kind in work:
        return work[kind]
    m = tmp_path / "in" / kind
    if kind == "missing":
        return m
    if kind == "notmodel":
        m.mkdir(parents=True)
        (m / "readme.txt").write_text("not a model")
        return m
    shutil.copytree(work["llama"], m)
    weights = m / "model.safetensors"
    if kind == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "badconfig":
        (m / "config.json").write_text('{"model_type": "llama", ')
    elif kind == "pickled":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(weights), m / "pytorch_model.bin")
        weights.unlink()
    elif kind == "gptqconfig":
        config = json.loads((m / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (m / "config.json").write_text(json.dumps(config))
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_matrix(case, work, texts, tmp_path):
    kind, build, code, needles, preflight = CASES[case]
    if "cuda on a machine without" in case:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    model = _prepare(kind, work, tmp_path)
    out = tmp_path / "out" / "result"
    out.parent.mkdir()
    if case == "existing output":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    hide = ()
    if case == "quantizer backend missing":
        hide = ("torchao",)
    before = tree_hash(model) if model.exists() else None
    reads = tmp_path / "reads.log"
    res = run_cli(*build(model, out, texts, tmp_path), hide=hide, count_reads=reads)
    assert_one_line_error(res, code, *needles)
    if case == "existing output":
        assert (out / "keep.txt").read_text() == "precious"
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert_nothing_written(out)
    if before is not None:
        assert tree_hash(model) == before
    if preflight:
        assert res.reads == 0, f"{res.reads} weight tensors read before the error"


def test_debug_shows_the_traceback(work, texts, tmp_path):
    res = run_cli("--debug", *compress_args(work["neox"], tmp_path / "o", texts, "--layers", "1"))
    assert res.returncode == 2
    assert "Traceback" in res.stderr


def test_compress_accepts_allow_pickle(work, texts, tmp_path):
    m = _prepare("pickled", work, tmp_path)
    res = run_cli(*compress_args(m, tmp_path / "o", texts, "--layers", "1", "--allow-pickle"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---- random plans through `prunekit apply` -----------------------------------------------
_KEYS = ["layers", "heads", "neurons", "attention", "mlp", "meta", "layer", "0", "1"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 9) | st.sampled_from([1.7, 0.0, "1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner),
    max_leaves=8,
)
_PLANS = st.dictionaries(st.sampled_from(_KEYS[:7]), _JSON, max_size=3) | st.builds(
    lambda layers, heads: {"layers": layers, "heads": {"1": heads}},
    st.lists(st.integers(0, 3), max_size=2),
    st.lists(st.integers(0, 3), max_size=4),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=_PLANS)
def test_random_plans_apply_or_fail_in_one_line(plan, models, tmp_path_factory, capsys):
    """Valid -> applied (exit 0); invalid -> exit 2, one line, nothing written (in-process
    CLI, so hypothesis can afford many examples)."""
    from prunekit import PrunePlan, get_adapter
    from prunekit.cli import main
    from prunekit.core.io import read_config

    d = tmp_path_factory.mktemp("random-plan")
    src, out = models["llama"], d / "out"
    (d / "plan.json").write_text(json.dumps(plan))
    before = tree_hash(src)
    config = read_config(src)
    try:
        PrunePlan.from_dict(plan).validate(get_adapter(config).config_shapes(config))
        valid = True
    except ValueError:
        valid = False
    capsys.readouterr()
    code = main(["apply", str(src), "--plan", str(d / "plan.json"), "-o", str(out)])
    err = capsys.readouterr().err
    assert tree_hash(src) == before
    if valid:
        assert code == 0, err
        assert (out / "model.safetensors").is_file()
    else:
        assert assert_one_line_error(Run(code, "", err), 2)
        assert_nothing_written(out)


def test_foreign_errors_map_to_one_line_and_exit_code():
    """The one error path: foreign exceptions as the CLI sees them -> (exit code, message)."""
    import argparse

    import torch
    from safetensors import SafetensorError

    from prunekit.cli import explain

    args = argparse.Namespace(model="/models/m")
    cases = [
        (SafetensorError("Error while deserializing header: HeaderTooLarge"), 2, "/models/m"),
        (ModuleNotFoundError("No module named 'gptqmodel'", name="gptqmodel"), 2, "install"),
        (json.JSONDecodeError("Expecting value", "{", 1), 2, "json"),
        (torch.OutOfMemoryError("CUDA out of memory.\nTried to allocate"), 1, "--seq-len"),
        (PermissionError(13, "Permission denied", "/models/m/config.json"), 2, "config.json"),
        (OSError(28, "No space left on device"), 1, "No space left"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (AttributeError("'TorchAtenLinear' object has no attribute 'weight'"), 1, "--debug"),
    ]
    for exc, code, needle in cases:
        got, message = explain(exc, args)
        assert (got, "\n" in message) == (code, False), (exc, got, message)
        assert needle.lower() in message.lower(), (exc, message)
