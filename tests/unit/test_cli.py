"""The `carrara` entry point."""

from __future__ import annotations

import subprocess
import sys

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


def test_console_script_runs_demo() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "carrara", "demo", "--entities", "500"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "assembled == reference" in out.stdout
    assert "yes" in out.stdout
