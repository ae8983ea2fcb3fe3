"""The thin CLI, run as a user would (subprocess): `info`, `apply`, and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import logits, tiny_model

from prunekit import PrunePlan, apply_plan, load_pretrained, save_pretrained


def prunekit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunekit", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "llama"
    save_pretrained(tiny_model("llama"), path)
    return path


def test_info_prints_layer_shapes(dense_dir):
    res = prunekit_cli("info", dense_dir)
    assert res.returncode == 0, res.stderr
    assert "llama (adapter llama)" in res.stdout
    assert res.stdout.count("\n") >= 7  # header lines + 5 layers


def test_apply_matches_python_api(dense_dir, tmp_path, ids):
    plan = PrunePlan(layers=[2], heads={0: [0, 1, 2, 3]}, neurons={1: [3, 4, 5]})
    plan.to_json(tmp_path / "plan.json")
    res = prunekit_cli("apply", dense_dir, "--plan", tmp_path / "plan.json", "-o", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    assert "saved per-layer model" in res.stdout
    expected = logits(apply_plan(tiny_model("llama"), plan), ids)
    loaded, _ = load_pretrained(tmp_path / "o", attn_implementation="eager")
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=0)
    sidecar = json.loads((tmp_path / "o" / "prunekit.json").read_text())
    assert PrunePlan.from_dict(sidecar["plans"][0]) == plan


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"heads": {"0": list(range(8))}}, "removes all 8 heads of layer 0"),
        ({"heads": {"1": [0]}}, "GQA"),
        ({"layers": [9]}, "out of range"),
    ],
)
def test_apply_bad_plan_exits_nonzero_and_writes_nothing(dense_dir, tmp_path, plan, message):
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    res = prunekit_cli("apply", dense_dir, "--plan", tmp_path / "plan.json", "-o", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.startswith("prunekit: error:"), "fails before loading any weight"
    assert message in res.stderr
    assert not (tmp_path / "o").exists()


def test_apply_refuses_existing_output(dense_dir, tmp_path):
    PrunePlan(layers=[0]).to_json(tmp_path / "plan.json")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = prunekit_cli("apply", dense_dir, "--plan", tmp_path / "plan.json", "-o", out)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_missing_model_is_a_one_line_error(tmp_path):
    PrunePlan(layers=[0]).to_json(tmp_path / "plan.json")
    res = prunekit_cli("apply", tmp_path / "nope", "--plan", tmp_path / "plan.json", "-o", "x")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
