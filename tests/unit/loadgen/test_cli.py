"""``carrara loadtest`` end to end on loopback: verdicts, exit status, JSON and HTML output,
the ramp, and the multi-process generator."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from carrara.cli import main
from carrara.loadgen.runner import LoadTestResult, StagePlan, run_stage
from carrara.loadgen.selftest import DelayServer, MixtureDelay
from carrara.loadgen.targets import TargetSpec


def test_loadtest_passes_and_writes_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with DelayServer(MixtureDelay([(1.0, 5.0, 10.0)])) as server:
        code = main(
            [
                "loadtest",
                f"http://127.0.0.1:{server.port}",
                "--rate", "300", "--duration", "1", "--warmup", "0.2",
                "--entity-dist", "zipf:1.2", "--batch", "3",
                "--slo", "p99=500ms,errors=1%",
                "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"),
            ]
        )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "open 300/s" in out
    result = msgspec.json.decode((tmp_path / "r.json").read_bytes(), type=LoadTestResult)
    stage = result.stages[0]
    assert result.passed and stage.verdict is not None and stage.verdict.passed
    assert stage.offered_rate == 300 and stage.achieved_rate == pytest.approx(300, rel=0.2)
    assert 5.0 <= stage.latency.p50_ms < 500
    assert json.loads((tmp_path / "r.json").read_text())["slo"]["latency_ms"] == {"p99": 500.0}
    page = (tmp_path / "r.html").read_text()
    assert "<svg" in page and "polyline" in page


def test_loadtest_fails_a_missed_slo() -> None:
    with DelayServer(MixtureDelay([(1.0, 30.0, 40.0)])) as server:
        code = main(
            [
                "loadtest", f"http://127.0.0.1:{server.port}", "--rate", "100",
                "--duration", "0.5", "--warmup", "0.1", "--slo", "p99=10ms",
            ]
        )  # fmt: skip
    assert code == 1


def test_ramp_finds_where_the_slo_breaks(tmp_path: Path) -> None:
    """A null target's latency is the generator's own: with a tight SLO the ramp stops at a
    rate this machine cannot pace; with a loose one every step passes."""
    code = main(
        [
            "loadtest", "null", "--ramp", "200:600:200", "--duration", "0.3", "--warmup", "0.1",
            "--slo", "p99=1s", "--json", str(tmp_path / "ramp.json"),
            "--html", str(tmp_path / "ramp.html"),
        ]
    )  # fmt: skip
    assert code == 0
    result = msgspec.json.decode((tmp_path / "ramp.json").read_bytes(), type=LoadTestResult)
    assert [s.offered_rate for s in result.stages] == [200, 400, 600]
    assert result.max_passing_rate == 600 and result.first_failing_rate is None
    assert "latency against offered rate" in (tmp_path / "ramp.html").read_text()


def test_two_generator_processes_share_the_rate() -> None:
    with DelayServer(MixtureDelay([(1.0, 20.0, 20.0)])) as server:
        spec = TargetSpec(kind="http", address=f"127.0.0.1:{server.port}")
        result = run_stage(
            spec,
            StagePlan(rate=200, arrivals="constant", duration_s=1.0, warmup_s=0.2, processes=2),
        )
        assert server.requests == pytest.approx(240, abs=4)
    assert result.processes == 2 and result.errors == {}
    assert result.requests == pytest.approx(200, abs=3)
    assert result.latency.p50_ms == pytest.approx(20.0, rel=0.1)
