"""Run a launcher module (torchrun) so that it ends with its parent::

    python -m carrara.training.frameworks.launch PARENT_PID MODULE [ARGS...]

runs ``python -m MODULE ARGS...`` in this process after asking Linux to send it SIGTERM when
the process that started it dies (``prctl(PR_SET_PDEATHSIG)``). A training worker that is
SIGKILLed (OOM killer, a node drain's hard kill) therefore leaves no orphan torchrun training
on: torchrun, on SIGTERM, stops its ranks, and each rank also leaves on its own once the
launcher is gone (it watches ``$CARRARA_LAUNCHER_PID``, set here). If the parent died before
the request was made (``getppid()`` is no longer ``PARENT_PID``) this exits at once. Elsewhere
than Linux the module just runs.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

__all__ = ["LAUNCHER_PID_ENV", "main"]

#: Set for the launched module (and so for torchrun's ranks): this process's pid.
LAUNCHER_PID_ENV = "CARRARA_LAUNCHER_PID"

PR_SET_PDEATHSIG = 1
#: Exit status when the parent was already gone (as a SIGTERM'd process would report).
ORPHANED = 128 + int(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or not args[0].isdigit():
        print("usage: python -m carrara.training.frameworks.launch PARENT_PID MODULE [ARGS...]",
              file=sys.stderr)  # fmt: skip
        return 2
    parent, module = int(args[0]), args[1]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            return ORPHANED
    # The ranks torchrun starts watch this process (see torch_ddp): if torchrun itself dies
    # without stopping them, they end too.
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    sys.argv = [module, *args[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
