"""A normal (non-editable) install: the wheel carries GSM8K's data, and the installed package, with
the source tree out of reach, runs ``fedattn eval gsm8k`` (data read from the install, not from src/)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = "fedattn/evaluation/tasks/data/gsm8k"
DATA_FILES = ("test.jsonl", "train.jsonl", "LICENSE")
PIP_TIMEOUT_S = 120


def pip(*words: str) -> None:
    """Run pip quietly; its whole output is the failure message."""
    command = [sys.executable, "-m", "pip", *words, "--disable-pip-version-check", "--no-deps"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the project (a build writes build/ and egg-info where it runs)."""
    work = tmp_path_factory.mktemp("packaging")
    project = work / "project"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", project / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, project / name)
    pip("wheel", str(project), "--no-build-isolation", "-w", str(work / "dist"))
    (built,) = (work / "dist").glob("fedattn-*.whl")
    return built


def test_wheel_carries_the_gsm8k_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    for name in DATA_FILES:
        source = ROOT / "src" / DATA / name
        assert sizes.get(f"{DATA}/{name}") == source.stat().st_size, name


def test_installed_wheel_runs_eval_gsm8k(wheel, tmp_path):
    site = tmp_path / "site"
    pip("install", "--target", str(site), str(wheel))
    out, elsewhere = tmp_path / "results", tmp_path / "cwd"
    elsewhere.mkdir()
    words = ["eval", "gsm8k", "--model", "tiny-random", "--limit", "1", "--max-new-tokens", "4", "--out", str(out)]
    # the same process reports where the package came from, then runs the CLI as `python -m fedattn.cli` does
    launch = (
        "import runpy, sys, fedattn; print('package:', fedattn.__file__, file=sys.stderr);"
        f"sys.argv = ['fedattn', *{words!r}]; runpy.run_module('fedattn.cli', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", launch], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"package: {site / 'fedattn' / '__init__.py'}\n" in result.stderr
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 1
    assert json.loads(records[0])["index"] == 0
