"""The torchrun launcher shim: runs the module with its arguments, and refuses to start once
the parent that asked for it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carrara.training.frameworks import launch
from tests.proc import alive

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_leaves_once_its_launcher_is_gone(tmp_path: Path) -> None:
    """A rank whose launcher (torchrun) was SIGKILLed, so never stopped it, ends by itself."""
    pid_file = tmp_path / "rank.pid"
    rank = (
        "import os, sys, time\n"
        "from carrara.training.frameworks.torch_ddp import _leave_with_launcher\n"
        "_leave_with_launcher(poll_s=0.05)\n"
        "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    launcher = (
        "import os, subprocess, sys, time\n"
        f"env = dict(os.environ, {launch.LAUNCHER_PID_ENV}=str(os.getpid()))\n"
        "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], env=env)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher, rank, str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        gone = not alive(child)
        if not gone:
            os.kill(child, signal.SIGKILL)
        assert gone, "the rank outlived its launcher"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
