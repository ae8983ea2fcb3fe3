"""A late failure, a kill or a random plan never costs the model or leaves debris (issue 13).

- Preflight: targets, sequence lengths and quantized checkpoints are checked from
  ``config.json`` alone; a target that cannot be met exactly is refused or, where rounding is
  the documented behaviour, the plan says what was asked and what is removed.
- An exception in evaluation after pruning leaves a complete, loadable output and a report
  naming the failure (exit code 1, one line saying the model was saved).
- Every quantizer through the real ``prunekit compress`` (prune -> quantize -> evaluate ->
  save -> stock reload).
- SIGTERM while saving leaves neither output nor temporary directory; after ``kill -9`` the
  next run to the same output reports and removes the stale temporary directory.
- Random JSON plans to ``prunekit apply``: valid -> applied, invalid -> one line, exit 2,
  nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import brown_text, run_python, save_tiny, tiny_tokenizer, wiki_text

from prunekit.core.io import read_config
from prunekit.core.preflight import check_model_input
from prunekit.core.select import check_targets
from prunekit.core.targets import Targets
from prunekit.plugins import get_adapter

# The CLI in a fresh interpreter, with optional injected faults (before prunekit runs):
# PK_FAIL_EVAL=N makes the N-th evaluation raise; PK_SLOW_SAVE=1 makes saving wait (after
# the weights are in the temporary directory) so that a test can signal the process.
RUNNER = r"""
import os, sys, time
fail_at = int(os.environ.get("PK_FAIL_EVAL", "0"))
if fail_at:
    import prunekit.core.evaluate as ev
    real, calls = ev.evaluate, []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected evaluation failure")
        return real(*a, **k)

    ev.evaluate = evaluate
if os.environ.get("PK_SLOW_SAVE"):
    import prunekit.core.pipeline as pl

    def slow_probe(out_dir, probe):
        print("SAVING", flush=True)
        time.sleep(120)

    pl.save_probe = slow_probe
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    full.pop("PRUNEKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        timeout=600,
        **kw,
    )


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(brown_text()[:40_000], encoding="utf-8")
    (d / "eval.txt").write_text(wiki_text()[:4_000], encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


def flags(texts: Path) -> list[str]:
    return [
        "--calib", texts / "calib.txt", "--calib-samples", "4", "--seq-len", "32",
        "--eval-text", texts / "eval.txt", "--eval-max-chars", "2000", "--no-latency",
    ]  # fmt: skip


def one_error_line(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("prunekit: error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def stock_reload(path: Path, layers: int) -> None:
    code = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "assert 'prunekit' not in sys.modules\n"
        "print('OK', m.config.num_hidden_layers)\n"
    )
    res = run_python(code)
    assert res.returncode == 0 and f"OK {layers}" in res.stdout, res.stderr[-3000:]


# ---- preflight and no silent clamping ------------------------------------------------------
def shapes_of(path: Path) -> list:
    config = read_config(path)
    return get_adapter(config).config_shapes(config)


@pytest.mark.parametrize(
    "targets, message",
    [
        (dict(layers=4), "only 3 are unprotected"),  # 5 layers, first and last protected
        (dict(neurons=100_000), "100000 of the 480 MLP neurons"),
        (dict(neurons=480), "480 of the 480"),
        (dict(heads=41), "41 of the 40 query heads"),
        (dict(layers=0.05), "removes nothing"),  # rounds to 0 of 5 layers
        (dict(heads=2), "below half the smallest uniform step"),
    ],
)
def test_targets_the_model_cannot_meet_fail_from_its_config(llama, targets, message):
    with pytest.raises(ValueError, match=message):
        check_model_input(llama, targets=Targets(**targets))


def test_rounded_targets_say_what_was_asked_and_what_is_removed(llama):
    # 8 query heads in 2 KV groups per layer: uniform group removal cannot remove 30%.
    plan = check_targets(shapes_of(llama), Targets(heads=0.3, neurons=0.3))
    heads, neurons = plan.meta["adjusted"]
    assert heads.startswith("heads: asked 30% = 12 of 40 query heads, removing 20 (50%)")
    assert "whole KV groups" in heads
    assert neurons.startswith("neurons: asked 30% = 144 of 480 MLP neurons, removing 160")
    assert "round_to=64" in neurons
    exact = check_targets(shapes_of(llama), Targets(heads=0.5, layers=1))
    assert "adjusted" not in exact.meta


def test_seq_len_beyond_positions_and_quantized_config_fail_before_loading(tmp_path):
    bert = save_tiny("bert", tmp_path / "bert")
    with pytest.raises(ValueError, match=r"seq_len=1024: longer than .* \(512\)"):
        check_model_input(bert, seq_lens={"calibration.seq_len": 1024})
    llama = save_tiny("llama", tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (llama / "config.json").write_text(json.dumps(config))
    (llama / "model.safetensors").write_bytes(b"")  # never read: the config decides
    with pytest.raises(ValueError, match=r"the model is quantized \(awq"):
        check_model_input(llama, targets=Targets(layers=1))
    check_model_input(llama, quantized_ok=True)  # evaluation may read it


# ---- a late failure keeps the model --------------------------------------------------------
def test_evaluation_failure_after_pruning_keeps_a_complete_output(llama, texts, tmp_path):
    out = tmp_path / "out"
    # The 1st evaluation is the dense model's, the 2nd the pruned model's: make it fail.
    res = run_cli(
        "compress", llama, "-o", out, "--layers", "1", *flags(texts), env={"PK_FAIL_EVAL": "2"}
    )
    line = one_error_line(res, 1)
    assert f"saved to {out}" in line and "injected evaluation failure" in line
    assert not list(tmp_path.glob(".out*"))
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert "injected evaluation failure" in sidecar["failures"]["evaluation of the pruned model"]
    assert sidecar["metrics"]["pruned"]["size_on_disk_mb"] > 0
    report = (out / "report.md").read_text()
    assert "## Failed stages" in report and "injected evaluation failure" in report
    assert (out / "probe" / "probe.safetensors").is_file()
    stock_reload(out, 4)


def test_resume_reuses_the_scores_of_a_failed_run(llama, texts, tmp_path, monkeypatch):
    import prunekit.core.pipeline as pl
    import prunekit.core.select as sel
    from prunekit.core.resume import cache_dir

    recipe = {
        "targets": {"layers": 1, "neurons": 0.25},
        "calibration": {"source": str(texts / "calib.txt"), "n_samples": 4, "seq_len": 32},
        "evaluation": {"text": str(texts / "eval.txt"), "max_chars": 2000, "latency": False},
    }
    out = tmp_path / "out"

    def boom(run):
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(pl, "_quantize", boom)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        pl.compress(llama, recipe, out, progress=False)
    assert not out.exists()
    kept = cache_dir(out) / "scores-step1.json"
    assert kept.is_file()
    first = json.loads(kept.read_text())["scores"]

    monkeypatch.undo()
    calls = []
    real = sel.plan_for
    monkeypatch.setattr(sel, "plan_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = pl.compress(llama, recipe, out, progress=False, resume=True)
    assert calls == []  # the kept scores were selected from, not recomputed
    assert result.plans[0].layers and (out / "model.safetensors").is_file()
    assert json.loads((out / "prunekit.json").read_text())["scores"][0] == first
    assert not cache_dir(out).exists()  # removed once the model is saved


# ---- every quantizer through the real pipeline ---------------------------------------------
def quant_friendly_llama(path: Path) -> Path:
    """A tiny Llama whose widths suit 4-bit kernels (multiples of 64)."""
    import torch
    import transformers as tf

    from prunekit import save_pretrained

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
    )  # fmt: skip
    return save_pretrained(tf.LlamaForCausalLM(config).eval(), path, tiny_tokenizer())


def _quantizer_usable(name: str) -> tuple[bool, str]:
    from prunekit.plugins import get_plugins

    return get_plugins().quantizers.get(name).available()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [
        ("torchao", ["--quant-scheme", "int8_weight_only"]),
        ("gptq", ["--quant-bits", "4", "--quant-group-size", "64"]),
        ("awq", ["--quant-bits", "4", "--quant-group-size", "64"]),
    ],
)
def test_every_quantizer_through_compress(name, extra, texts, tmp_path):
    ok, why = _quantizer_usable(name)
    if not ok:
        pytest.skip(f"{name}: {why}")
    src = quant_friendly_llama(tmp_path / "dense")
    out = tmp_path / "out"
    res = run_cli("compress", src, "-o", out, "--layers", "1", "--quantize", name, *extra,
                  *flags(texts))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert not sidecar.get("failures"), sidecar["failures"]
    quantized = sidecar["metrics"]["quantized"]
    assert quantized["perplexity"]["perplexity"] > 1 and quantized["flops_per_token"] > 0
    assert sidecar["quantization"]["method"] == name
    stock_reload(out, 3)


# ---- signals while saving ------------------------------------------------------------------
def _start_slow_save(src: Path, out: Path, texts: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PK_SLOW_SAVE": "1"}
    args = ["compress", src, "-o", out, "--layers", "1", *flags(texts)]
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_temporary(proc: subprocess.Popen, out: Path) -> Path:
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.tmp-*"))
        if found and (found[0] / "model.safetensors").exists() and proc.poll() is None:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("no temporary output directory appeared")


def test_sigterm_while_saving_leaves_nothing(llama, texts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_save(llama, out, texts)
    _wait_for_temporary(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")) and not list(tmp_path.glob(".out.old-*"))
    # only the scores kept for --resume remain beside the output
    assert [p.name for p in tmp_path.glob(".out*")] in ([], [".out.cache"])
    assert [p.name for p in (tmp_path / ".out.cache").glob("*")] in ([], ["scores-step1.json"])


def test_kill_9_leaves_a_temporary_the_next_run_removes(llama, texts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_save(llama, out, texts)
    stale = _wait_for_temporary(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert stale.is_dir() and not out.exists()
    res = run_cli("compress", llama, "-o", out, "--layers", "1", *flags(texts))
    assert res.returncode == 0, res.stderr[-3000:]
    assert stale.name in res.stderr and "stale" in res.stderr
    assert not stale.exists() and (out / "model.safetensors").is_file()


# ---- random plans to `prunekit apply` ------------------------------------------------------
def _valid_plans():
    from hypothesis import strategies as st

    # tiny llama: 5 layers, 8 query heads in 2 KV groups of 4, 96 MLP neurons
    @st.composite
    def plan(draw):
        layers = draw(st.lists(st.integers(0, 4), unique=True, max_size=3))
        kept = [i for i in range(5) if i not in layers]
        heads = draw(st.dictionaries(st.sampled_from(kept), st.sampled_from([0, 1]), max_size=2))
        neurons = draw(
            st.dictionaries(
                st.sampled_from(kept),
                st.lists(st.integers(0, 95), unique=True, min_size=1, max_size=90),
                max_size=2,
            )
        )
        if not (layers or heads or neurons):
            layers = [1]
        return {
            "layers": sorted(layers),
            "heads": {str(i): list(range(4 * g, 4 * g + 4)) for i, g in heads.items()},
            "neurons": {str(i): sorted(v) for i, v in neurons.items()},
        }

    return plan()


def _any_json():
    from hypothesis import strategies as st

    scalars = (
        st.none() | st.booleans() | st.integers(-3, 100) | st.floats(-2, 200) | st.text(max_size=3)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["0", "1", "4", "9", "x"]), inner, max_size=3)
        ),
        max_leaves=8,
    )
    keys = st.sampled_from(["layers", "heads", "neurons", "layer", "meta", "subblocks"])
    return st.dictionaries(keys, values, max_size=3) | values


def _apply(model: Path, plan, tmp: Path, capsys) -> tuple[int, str, Path]:
    from prunekit.cli import main

    d = Path(tmp)
    (d / "plan.json").write_text(json.dumps(plan))
    out = d / "out"
    capsys.readouterr()
    code = main(["apply", str(model), "--plan", str(d / "plan.json"), "-o", str(out)])
    return code, capsys.readouterr().err, out


def _check_outcome(code: int, err: str, out: Path, expect_ok: bool | None) -> None:
    if code == 0:
        assert expect_ok is not False
        assert (out / "prunekit.json").is_file() and (out / "model.safetensors").is_file()
        return
    assert expect_ok is not True, err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("prunekit: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(out.parent.glob(".out*"))


def test_random_json_plans_to_apply(llama, capsys):
    import tempfile

    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    cfg = settings(
        max_examples=12,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )

    @cfg
    @given(plan=_valid_plans())
    def valid(plan):
        with tempfile.TemporaryDirectory() as tmp:
            _check_outcome(*_apply(llama, plan, Path(tmp), capsys), expect_ok=True)

    @cfg
    @given(plan=_any_json())
    def anything(plan):
        with tempfile.TemporaryDirectory() as tmp:
            _check_outcome(*_apply(llama, plan, Path(tmp), capsys), expect_ok=None)

    valid()
    anything()
    assert hypothesis


@pytest.mark.parametrize(
    "plan, ok",
    [({"layers": [1], "heads": {str(i): [4, 5, 6, 7] for i in (0, 2, 3, 4)}}, True),
     ({"layers": [1.7]}, False),
     ({"heads": {"1": [0]}}, False)],
)  # fmt: skip
def test_apply_plans_in_a_subprocess(llama, plan, ok, tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    res = run_cli("apply", llama, "--plan", tmp_path / "plan.json", "-o", out)
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
        stock_reload(out, 4)
    else:
        one_error_line(res, 2)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
