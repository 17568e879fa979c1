"""`hogwild run` end to end on the tiny model, in its own process (it loads the engine in-process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from live_server import REPO_ROOT


def hogwild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_renders_one_lane_per_worker_and_a_summary(tiny_model_dir: Path) -> None:
    result = hogwild(
        "run",
        "Say hi",
        "--names",
        "Ann,Ben,Cid",
        "--max-tokens",
        "6",
        "--no-final-answer",
        "--temperature",
        "0",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )
    assert result.returncode == 0, result.stderr
    for name in ("Ann", "Ben", "Cid"):
        assert f"[{name}] **{name} [1]:**" in result.stdout
    assert "18 completion (Ann 6, Ben 6, Cid 6)" in result.stdout
    assert "loading" in result.stderr  # load progress goes to stderr, lanes to stdout


def test_run_reports_a_missing_model_without_a_traceback(tmp_path: Path) -> None:
    result = hogwild("run", "Say hi", "--model", str(tmp_path / "missing"), "--device", "cpu")
    assert result.returncode == 2
    assert str(tmp_path / "missing") in result.stderr and "Traceback" not in result.stderr


def test_run_reports_a_truncated_weights_file_without_a_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 4)  # a download or copy cut short
    result = hogwild("run", "Say hi", "--model", str(broken), "--device", "cpu")
    assert result.returncode == 2
    assert f"cannot load model '{broken}'" in result.stderr and "Traceback" not in result.stderr


def test_run_refuses_zero_workers_instead_of_taking_the_default() -> None:
    result = hogwild("run", "Say hi", "--workers", "0")
    assert result.returncode == 2 and "workers must be between 1 and 8" in result.stderr


def test_run_reports_an_unknown_device_without_a_traceback(tiny_model_dir: Path) -> None:
    result = hogwild("run", "Say hi", "--model", str(tiny_model_dir), "--device", "nonsense")
    assert result.returncode == 2
    assert "device 'nonsense' is not a torch device" in result.stderr and "Traceback" not in result.stderr


def test_help_documents_every_subcommand() -> None:
    result = hogwild("--help")
    assert result.returncode == 0
    for command in ("serve", "run", "client"):
        assert command in result.stdout
        assert hogwild(command, "--help").returncode == 0
