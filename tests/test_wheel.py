"""A fresh install anywhere: build the wheel, install it (without dependencies) into a new
virtual environment that borrows the test environment's installed dependencies, and run
``prunekit compress`` with no ``--calib`` from a folder outside the checkout, with no
development data folder (``PRUNEKIT_DATA=/nonexistent``): the bundled text must suffice."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROOT, save_tiny

pytestmark = pytest.mark.slow


def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: int = 600):
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, (
        f"{cmd}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # built from a copy, so no build/ or egg-info lands in (or is reused from) the checkout
    src = dist / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "prunekit", src / "prunekit", ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    # no build isolation: the build backend (setuptools) is already installed, and no index
    # need be reachable
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*pip, src, "-w", dist], cwd=dist)
    (found,) = dist.glob("prunekit-*.whl")
    return found


def test_wheel_ships_the_calibration_text_and_its_licence(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "prunekit/data/brown-sample.txt" in names
    assert "prunekit/data/LICENSE-brown.txt" in names
    assert not [n for n in names if n.startswith("tests/")]


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new venv holding only the wheel; a .pth file puts this environment's site-packages
    after its own, so torch and transformers are found without reinstalling them (but not
    the checkout: .pth files in the borrowed folder, such as the editable install's, are not
    run)."""
    env = tmp_path_factory.mktemp("env") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env], cwd=env.parent)
    python = env / "bin" / "python"
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=env
    ).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    Path(purelib, "borrowed-deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q"]
    _run([*pip, "--no-index", wheel], cwd=env.parent)
    return env


def test_compress_from_the_installed_wheel_outside_the_checkout(fresh_env, tmp_path):
    model = save_tiny("llama", tmp_path / "model")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PRUNEKIT_DATA": "/nonexistent",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        # the test plugins installed (editable) in this environment are not in a fresh one
        "PRUNEKIT_DISABLE_PLUGINS": ",".join(e.name for e in entry_points(group="prunekit")),
        "PATH": f"{fresh_env / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    where = _run(
        [fresh_env / "bin" / "python", "-c", "import prunekit; print(prunekit.__file__)"],
        cwd=work,
        env=env,
    ).stdout.strip()
    assert Path(where).is_relative_to(fresh_env), where  # the wheel, not the checkout
    assert not Path(where).is_relative_to(ROOT)
    flags = ["--layers", "1", "--calib-samples", "8", "--seq-len", "64", "--no-latency"]
    out = _run(
        [
            fresh_env / "bin" / "prunekit",
            "compress",
            model,
            "-o",
            "out",
            *flags,
            "--eval-text",
            "none",
        ],
        cwd=work,
        env=env,
    )
    config = json.loads((work / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4, out.stdout
    sidecar = json.loads((work / "out" / "prunekit.json").read_text())
    assert sidecar["recipe"]["calibration"]["source"] is None  # the bundled text
