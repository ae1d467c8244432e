"""The `carrara` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import carrara
from carrara.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"carrara {carrara.__version__}"
    assert carrara.__version__ == "0.1.0"


def test_help_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "demo" in capsys.readouterr().out


def test_console_script_runs_demo(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "carrara",
            "demo",
            "--entities",
            "500",
            "--load-seconds",
            "1.2",
            "--path",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=90,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in (
        "features",
        "training set",
        "training",
        "promotion",
        "serving",
        "gRPC",
        "load run",
        "traffic split",
        "monitoring (baseline)",
        "drift alert",
    ):
        assert f"│ {stage} " in out.stdout, stage
    assert "FAILED" not in out.stdout
    drift = next(line for line in out.stdout.splitlines() if line.startswith("drift: "))
    assert "avg_fare shifted" in drift and "'avg_fare'" in drift.split("alerts on", 1)[1]
    assert "demo all checks passed" in out.stdout
    assert (tmp_path / "demo" / "registry.db").is_file()
