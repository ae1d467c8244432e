"""``carrara demo --backend postgres,redis`` at small size: the same loop on the real servers
(registry, catalog, queue, triggers and monitoring in a fresh PostgreSQL schema; online store
and event log under a fresh Redis prefix), every check holding, and both dropped afterwards."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from carrara.demo import SHIFTED, demo_report


def test_demo_on_postgres_and_redis(tmp_path: Path, postgres_url: str, redis_url: str) -> None:
    import psycopg
    import redis

    out = io.StringIO()
    report = demo_report(
        2_000,
        path=tmp_path,
        load_seconds=1.0,
        rate=200.0,
        train_rows=6_000,
        backend="postgres,redis",
        pg_url=postgres_url,
        redis_url=redis_url,
        console=Console(file=out, width=160),
    )
    text = out.getvalue()
    assert report.ok, text
    assert report.backend == "postgres,redis"
    run = report.isolation
    assert run.startswith("carrara_demo_")
    assert f"PostgreSQL schema {run}, Redis prefix {run}" in text

    # The loop itself: both frameworks, the split, the drift alert, the retrained version.
    assert [(v.version, v.framework) for v in report.versions[:2]] == [
        (1, "xgboost"),
        (2, "pytorch"),
    ]
    assert report.canary_share is not None and report.split_tolerance is not None
    assert abs(report.canary_share - 0.10) <= report.split_tolerance
    assert report.drift is not None and report.drift.feature == SHIFTED
    assert report.retrain is not None and report.retrain.state == "SUCCEEDED"
    assert report.retrain.version == 3 and report.retrain.promoted

    # Cleaned up: no schema, no keys left behind.
    with psycopg.connect(postgres_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (run,)
        ).fetchone()
        assert left == (0,)
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{run}*", count=1000)) == []
    finally:
        client.close()
