"""Side-by-side latency (core/speed_compare.py, speed_stage.py, speed_report.py): a model made
slower is reported slower and significant, identical models are "not significant", rounds
alternate, threads are fixed and restored, the significance rule, and the report's speed rows
(median with spread, speedup beside the FLOP ratio) through compress on tiny models.

No timing assertions on real models. This machine is shared: on wall time a few-millisecond
forward pass of a tiny model swings 20x (a run either fits in the process's time slice or
waits ~35 ms for the next one), so the tests that judge significance either slow a model by
far more than that (100 ms sleeps) or time CPU time (``clock="cpu"``), which other processes
do not inflate."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from conftest import brown_text, save_tiny, tiny_model, wiki_text

from prunekit.core.report import plot_before_after, result_table
from prunekit.core.speed_compare import LatencySettings, compare_latency, speedup
from prunekit.core.speed_report import draw_speed_bar, speed_notes
from prunekit.core.speed_stage import record_speed

# CPU time of one thread; each round counts the fastest of 3 back-to-back runs
CPU = dict(prompt_len=32, new_tokens=4, threads=1, best_of=3, clock="cpu")


def slowed(model, hook):
    """A copy of ``model`` with ``hook`` run after one of its layers (every forward)."""
    slow = copy.deepcopy(model)
    slow.model.layers[1].register_forward_hook(hook)
    return slow


def sleep(seconds: float):
    return lambda *_: time.sleep(seconds)


def spin(seconds: float):
    """Burn ``seconds`` of this process's CPU time."""

    def hook(*_):
        t0 = time.process_time()
        while time.process_time() - t0 < seconds:
            pass

    return hook


# ---- the comparison ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "clock, hook",
    [("wall", sleep(0.1)), ("cpu", spin(0.02))],
    ids=["wall-clock-sleep", "cpu-clock-spin"],
)
def test_slowed_model_is_slower_and_significant(clock, hook):
    dense = tiny_model("llama")
    settings = LatencySettings(prompt_len=8, new_tokens=2, rounds=5, clock=clock, threads=1)
    got = compare_latency({"dense": dense, "slow": slowed(dense, hook)}, settings)
    fast, slow = got["models"]["dense"], got["models"]["slow"]
    for key in ("prefill", "decode"):
        assert slow[f"{key}_tokens_per_s"] < fast[f"{key}_tokens_per_s"]
        s = got["speedups"]["slow"][key]
        assert s["significant"] is True, s
        assert s["high"] < 1.0 and s["median"] < 0.7
        assert len(s["rounds"]) == 5
        low, high = slow[f"{key}_tokens_per_s_range"]
        assert low <= slow[f"{key}_tokens_per_s"] <= high
    assert got["failed"] == {} and got["baseline"] == "dense"
    assert got["settings"]["clock"] == clock


def test_identical_models_are_not_significant():
    dense = tiny_model("llama")
    twin = copy.deepcopy(dense)  # same weights
    got = compare_latency({"dense": dense, "twin": twin}, LatencySettings(rounds=9, **CPU))
    for key in ("prefill", "decode"):
        s = got["speedups"]["twin"][key]
        assert s["significant"] is False, s
        assert s["low"] <= s["median"] <= s["high"]


def test_rounds_alternate_the_order():
    a, b = tiny_model("llama"), tiny_model("llama", seed=1)
    calls: list[str] = []
    for name, model in (("a", a), ("b", b)):
        model.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
    settings = LatencySettings(prompt_len=4, new_tokens=1, rounds=4, warmup=0)
    got = compare_latency({"a": a, "b": b}, settings)
    assert got["order"] == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    # each run is a prefill and one decode step: two forwards of the same model
    assert calls == list("aabbbbaaaabbbbaa")
    three = {"a": a, "b": b, "c": copy.deepcopy(a)}
    shuffle = LatencySettings(prompt_len=4, new_tokens=0, rounds=6, warmup=0, order="random")
    shuffled = compare_latency(three, shuffle)
    assert all(sorted(o) == ["a", "b", "c"] for o in shuffled["order"])
    assert len({tuple(o) for o in shuffled["order"]}) > 1  # not one fixed order
    assert compare_latency(three, shuffle)["order"] == shuffled["order"]  # seeded


def test_threads_are_fixed_while_timing_and_restored():
    model = tiny_model("llama")
    seen: list[int] = []
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    settings = LatencySettings(prompt_len=4, new_tokens=1, rounds=2, threads=target)
    got = compare_latency({"m": model}, settings)
    assert set(seen) == {target} and got["settings"]["threads"] == target
    assert torch.get_num_threads() == before
    assert got["speedups"] == {}  # one model: nothing to compare


def test_a_model_that_cannot_run_is_left_out_with_the_reason():
    good, bad = tiny_model("llama"), tiny_model("llama")

    def boom(*_):
        raise RuntimeError("no kernel for this device")

    bad.register_forward_pre_hook(boom)
    settings = LatencySettings(prompt_len=4, new_tokens=1, rounds=2)
    got = compare_latency({"dense": good, "quantized": bad}, settings)
    assert list(got["models"]) == ["dense"] and got["speedups"] == {}
    assert got["failed"] == {"quantized": "RuntimeError: no kernel for this device"}


def test_encoders_get_prefill_only():
    bert = tiny_model("bert")
    settings = LatencySettings(prompt_len=8, rounds=2)
    got = compare_latency({"a": bert, "b": copy.deepcopy(bert)}, settings)
    assert got["models"]["b"]["decode_tokens_per_s"] is None
    assert got["speedups"]["b"]["decode"] is None and got["speedups"]["b"]["prefill"] is not None


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        LatencySettings(rounds=0)
    with pytest.raises(ValueError, match="order must be 'alternate' or 'random'"):
        LatencySettings(order="fastest-first")
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        LatencySettings(clock="gpu")
    with pytest.raises(ValueError, match="baseline 'x' is not one of the models"):
        compare_latency({"m": tiny_model("llama")}, baseline="x")


# ---- the significance rule -----------------------------------------------------------------
def test_speedup_significance_rule():
    s = LatencySettings()
    base = [100.0] * 5
    faster = speedup(base, [118, 121, 125, 119, 130], s)
    assert faster["significant"] and faster["median"] == pytest.approx(1.21)
    assert (faster["low"], faster["high"]) == (pytest.approx(1.18), pytest.approx(1.30))
    # one round the other way: the min..max includes 1.0
    assert not speedup(base, [118, 121, 95, 119, 130], s)["significant"]
    # consistently faster but by 2%: below min_effect
    assert not speedup(base, [102, 102, 103, 101, 102], s)["significant"]
    assert speedup(base, [102, 102, 103, 101, 102], LatencySettings(min_effect=0.01))["significant"]
    # a consistent slowdown is significant too (below 1)
    assert speedup(base, [50, 52, 49, 51, 50], s)["significant"]
    # 4 rounds, all 1.5x: too few to rule out chance (2^(1-4) = 12.5%)
    assert not speedup([100.0] * 4, [150, 150, 150, 150], s)["significant"]


# ---- report and plot -----------------------------------------------------------------------
def metrics_from(got, flop_ratio=1.25):
    metrics = {"dense": {"params": 1000}, "pruned": {"params": 800}}
    record_speed(metrics, got, flop_ratio)
    return metrics


def fake_result(significant: bool):
    """A compare_latency result with known numbers (dense 100 tok/s, pruned 120)."""
    ratios = [1.2, 1.25, 1.15, 1.22, 1.18] if significant else [1.2, 0.9, 1.1, 0.95, 1.3]
    settings = {**LatencySettings().to_dict(), "threads": 2}  # as compare_latency records

    def figures(rates):
        return {
            "prefill_tokens_per_s": sorted(rates)[2],
            "prefill_tokens_per_s_range": [min(rates), max(rates)],
            "prefill_tokens_per_s_rounds": rates,
            "decode_tokens_per_s": None,
        }

    pruned = [100 * r for r in ratios]
    return {
        "models": {"dense": figures([100.0] * 5), "pruned": figures(pruned)},
        "speedups": {
            "pruned": {"prefill": speedup([100.0] * 5, pruned, LatencySettings()), "decode": None}
        },
        "failed": {},
        "settings": settings,
    }


def test_report_shows_spread_speedup_and_flop_ratio():
    table = result_table(metrics_from(fake_result(True)))
    assert "| prefill tokens/s | 100.0 (100.0–100.0) | 120.0 (115.0–125.0) |" in table
    assert "| prefill speedup vs dense (FLOP ratio) | – | 1.20x (1.15–1.25); FLOPs 1.25x |" in table
    assert "not significant" not in table
    assert "decode" not in table  # no decode figures: no rows


def test_report_says_not_significant_for_identical_models(tmp_path):
    dense = tiny_model("llama")
    got = compare_latency(
        {"dense": dense, "pruned": copy.deepcopy(dense)}, LatencySettings(rounds=9, **CPU)
    )
    metrics = metrics_from(got)
    table = result_table(metrics)
    row = next(line for line in table.splitlines() if line.startswith("| prefill speedup"))
    assert "not significant (" in row and "FLOPs 1.25x" in row
    tokens_row = next(line for line in table.splitlines() if line.startswith("| prefill tokens/s"))
    assert tokens_row.count("–") == 2  # a min–max range per stage
    notes = "\n".join(speed_notes(metrics))
    assert "9 interleaved rounds" in notes and "1 CPU threads, CPU time" in notes
    assert "every round agrees" in notes and "min–max" in notes
    assert plot_before_after(metrics, tmp_path / "before_after.png").stat().st_size > 0


def test_plot_draws_no_bar_when_not_significant():
    from matplotlib.figure import Figure

    for significant, expect_bar in ((True, True), (False, False)):
        ax = Figure().subplots()
        metrics = metrics_from(fake_result(significant))
        draw_speed_bar(ax, 0.0, 0.4, metrics["pruned"], "prefill_tokens_per_s", "C1")
        texts = [t.get_text() for t in ax.texts]
        assert (len(ax.patches) == 1) is expect_bar
        if expect_bar:
            assert texts == ["1.20"]
            assert ax.patches[0].get_height() == pytest.approx(1.2)
        else:
            assert texts == ["not significant"]


# ---- through compress -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "calib.txt").write_text(brown_text()[:20_000], encoding="utf-8")
    (d / "eval.txt").write_text(wiki_text()[:2_000], encoding="utf-8")
    return d


def recipe(texts, **evaluation):
    return {
        "targets": {"layers": 2},
        "calibration": {"source": str(texts / "calib.txt"), "n_samples": 4, "seq_len": 16},
        "evaluation": {
            "text": str(texts / "eval.txt"),
            "max_chars": 1000,
            "prompt_len": 8,
            "new_tokens": 2,
            **evaluation,
        },
    }


def test_compress_times_dense_and_pruned_side_by_side(texts, tmp_path):
    from prunekit.core.pipeline import compress

    src = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    result = compress(src, recipe(texts), out, progress=False)
    dense, pruned = (result.metrics[s]["latency"] for s in ("dense", "pruned"))
    assert dense["side_by_side"] and pruned["side_by_side"] and dense["speedup"] is None
    assert len(pruned["prefill_tokens_per_s_rounds"]) == 5  # evaluation.repeats rounds
    sp = pruned["speedup"]
    assert sp["vs"] == "dense" and sp["flop_ratio"] > 1.0 and sp["flop_seq_len"] == 8
    assert set(sp) >= {"prefill", "decode"} and isinstance(sp["prefill"]["significant"], bool)
    assert pruned["weights_memory_mb"] < dense["weights_memory_mb"]
    sidecar = json.loads((out / "prunekit.json").read_text())
    assert sidecar["metrics"]["pruned"]["latency"]["speedup"]["flop_ratio"] == sp["flop_ratio"]
    report = (out / "report.md").read_text()
    assert "| prefill speedup vs dense (FLOP ratio) | – |" in report
    assert f"FLOPs {sp['flop_ratio']:.2f}x" in report and "5 interleaved rounds" in report
    assert "latency" in result.timings and not result.failures


def test_compress_in_memory_model_says_dense_was_timed_alone(texts, tmp_path):
    from conftest import tiny_tokenizer

    from prunekit.core.pipeline import compress

    model = tiny_model("llama")
    result = compress(
        model, recipe(texts), tmp_path / "out", tokenizer=tiny_tokenizer(), progress=False
    )
    dense, pruned = (result.metrics[s]["latency"] for s in ("dense", "pruned"))
    assert dense["side_by_side"] is False and dense["prefill_tokens_per_s"] > 0
    assert pruned["speedup"] is None and pruned["prefill_tokens_per_s"] > 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "measured alone before pruning" in report and "speedup vs dense" not in report


def test_compress_skips_latency_with_one_line(texts, tmp_path, monkeypatch):
    from prunekit.core import speed_stage
    from prunekit.core.pipeline import compress

    src = save_tiny("llama", tmp_path / "llama")
    off = compress(src, recipe(texts, latency=False), tmp_path / "off", progress=False)
    assert off.metrics["dense"]["latency"] == {
        "note": "speed not measured: evaluation.latency is off"
    }
    assert "latency" not in off.metrics["pruned"]
    assert (
        "- dense: speed not measured: evaluation.latency is off"
        in (tmp_path / "off" / "report.md").read_text()
    )
    monkeypatch.setattr(speed_stage, "_free_mb", lambda device: 0.01)
    tight = compress(src, recipe(texts), tmp_path / "tight", progress=False)
    note = tight.metrics["dense"]["latency"]["note"]
    assert note.startswith("dense not timed side by side: its weights") and "do not fit" in note
    assert tight.metrics["pruned"]["latency"]["speedup"] is None  # timed, not compared
    assert not tight.failures
