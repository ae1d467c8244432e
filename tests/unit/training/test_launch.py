"""The torchrun launcher shim: runs the module with its arguments, and refuses to start once
the parent that asked for it is gone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from carrara.training.frameworks import launch

SHIM = [sys.executable, "-m", "carrara.training.frameworks.launch"]


def test_runs_the_module_as_main_with_its_arguments() -> None:
    out = subprocess.run(
        [*SHIM, str(os.getpid()), "json.tool", "--sort-keys"],
        input=b'{"b": 1, "a": 2}', capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.decode().split() == ["{", '"a":', "2,", '"b":', "1", "}"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_parent_already_gone_means_no_start() -> None:
    # PID 1 is not our parent: as if the worker died before the shim could ask to follow it.
    out = subprocess.run([*SHIM, "1", "json.tool"], input=b"{}", capture_output=True, timeout=60)
    assert out.returncode == launch.ORPHANED and out.stdout == b""


def test_usage() -> None:
    assert launch.main(["not-a-pid", "json.tool"]) == 2
    assert launch.main([]) == 2
