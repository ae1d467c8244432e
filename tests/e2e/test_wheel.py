"""The wheel carries its native libraries: ``scripts/build-wheel.sh`` builds it and vendors
protobuf, grpc++, abseil, hiredis and OpenSSL into ``carrara.libs/`` (auditwheel), and a fresh
virtualenv with only the wheel and its Python dependencies imports ``carrara._native`` with
every non-glibc library resolved inside the wheel — so it loads on a machine without
``libprotobuf-dev`` / ``libgrpc++-dev`` / ``libhiredis-dev``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: What a manylinux wheel may take from the system (the policy's libraries; zlib is one).
SYSTEM = ("linux-vdso", "libc.so", "libm.so", "libstdc++", "libgcc_s", "ld-linux", "libpthread",
          "libdl.so", "librt.so", "libz.so.1")  # fmt: skip


@pytest.mark.integration
def test_the_wheel_imports_with_only_its_own_libraries(tmp_path: Path) -> None:
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent), "OUT": str(tmp_path)}
    built = subprocess.run(
        ["bash", "scripts/build-wheel.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("carrara-*manylinux*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LD_", "PYTHON"))}
    probe = subprocess.run(
        [str(py), "-c", "import carrara._native as n; print(n.__file__)"],
        cwd=tmp_path,  # not the source tree
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    module = Path(probe.stdout.strip())
    assert str(venv) in str(module)
    ldd = subprocess.run(["ldd", str(module)], capture_output=True, text=True, check=True).stdout
    assert "not found" not in ldd, ldd
    outside = [
        line.strip()
        for line in ldd.splitlines()
        if "carrara.libs" not in line and not any(s in line for s in SYSTEM)
    ]
    assert outside == [], outside
    for needed in ("libprotobuf", "libgrpc++", "libhiredis"):
        assert any(needed in line and "carrara.libs" in line for line in ldd.splitlines()), needed
