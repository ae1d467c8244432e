"""The console's server side: its routes on the control plane (app files, whoami, live gateway
figures) and the figures' arithmetic (Prometheus text, windowed rates, split shares and
histogram quantiles) against hand-computed values."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carrara.config import Settings
from carrara.console.gateway_metrics import GatewayScraper, parse_metrics, quantile
from carrara.services import ControlPlane
from tests.asgi import call

TOKEN = "console-unit-token"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    home = tmp_path_factory.mktemp("console")
    cp = ControlPlane(Settings(home=str(home), online_store_url="memory://", api_token=TOKEN))
    try:
        yield cp
    finally:
        cp.close()


def test_app_files_are_served_with_etags(plane: ControlPlane) -> None:
    index = call(plane.app, "GET", "/console")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    for name in ("app.js", "charts.js", "style.css"):
        assert f"/console/{name}" in index.text
        r = call(plane.app, "GET", f"/console/{name}")
        assert r.status_code == 200
        assert r.headers["cache-control"] == "no-cache"
        again = call(
            plane.app, "GET", f"/console/{name}", headers={"If-None-Match": r.headers["etag"]}
        )
        assert again.status_code == 304 and again.content == b""
    assert (
        call(plane.app, "GET", "/console/app.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    missing = call(plane.app, "GET", "/console/missing.js")
    assert missing.status_code == 404 and missing.json()["error"] == "NOT_FOUND"
    # Only files of the app's folder, by a plain name: no way out of it.
    assert call(plane.app, "GET", "/console/..%2F__init__.py").status_code == 404
    assert call(plane.app, "GET", "/console/__init__.py").status_code == 404


def test_whoami_checks_the_token(plane: ControlPlane) -> None:
    r = call(plane.app, "GET", "/auth/whoami")
    assert r.status_code == 401 and "Bearer" in r.json()["message"]
    assert (
        call(plane.app, "GET", "/auth/whoami", headers={"Authorization": "Bearer x"}).status_code
        == 401
    )
    assert (
        call(plane.app, "GET", "/auth/whoami", headers={"Authorization": "Basic x"}).status_code
        == 401
    )
    ok = call(plane.app, "GET", "/auth/whoami", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.json() == {"subject": "bootstrap", "roles": ["admin"]}
    token = plane.registry.tokens.create("ana", ["approver", "reader"])
    ana = call(plane.app, "GET", "/auth/whoami", headers={"Authorization": f"Bearer {token}"})
    assert ana.json() == {"subject": "ana", "roles": ["approver", "reader"]}


def test_console_routes_are_documented(plane: ControlPlane) -> None:
    paths = call(plane.app, "GET", "/openapi.json").json()["paths"]
    for path in ("/console", "/console/{asset}", "/auth/whoami", "/serving/variants"):
        assert path in paths


def test_serving_figures_without_a_gateway_say_so(plane: ControlPlane) -> None:
    r = call(plane.app, "GET", "/serving/variants")
    assert r.status_code == 200
    body = r.json()
    assert body["reachable"] is False and "no gateway" in body["error"]
    assert call(plane.app, "GET", "/serving/variants?window_s=abc").status_code == 400
    assert call(plane.app, "GET", "/serving/variants?window_s=0").status_code == 400


# -- the figures ----------------------------------------------------------------------------

BOUNDS = ("0.001", "0.005", "0.01", "+Inf")


def _text(
    counts: dict[str, tuple[float, float, list[float]]],
    errors: float = 0.0,
    variant_errors: dict[str, tuple[float, float]] | None = None,
) -> str:
    """Gateway /metrics text: variant -> (entities, requests, per-bucket counts);
    ``variant_errors``: variant -> (errors, degraded entities)."""
    lines = ["# HELP carrara_predictions_total Entities predicted", "# TYPE x counter"]
    for variant, (entities, requests, buckets) in counts.items():
        version = "1" if variant == "champion" else "2"
        labels = f'model="m",version="{version}",variant="{variant}"'
        lines.append(f"carrara_predictions_total{{{labels}}} {entities}")
        running = 0.0
        for bound, count in zip(BOUNDS, buckets, strict=True):
            running += count
            lines.append(
                f'carrara_predict_latency_seconds_bucket{{{labels},le="{bound}"}} {running}'
            )
        lines.append(f"carrara_predict_latency_seconds_count{{{labels}}} {requests}")
        lines.append(f"carrara_predict_latency_seconds_sum{{{labels}}} 0.5")
        failed, degraded = (variant_errors or {}).get(variant, (0.0, 0.0))
        lines.append(f"carrara_variant_errors_total{{{labels}}} {failed}")
        lines.append(f"carrara_variant_degraded_total{{{labels}}} {degraded}")
    lines.append(f'carrara_predict_errors_total{{model="m",code="UNAVAILABLE"}} {errors}')
    lines.append('carrara_predict_degraded_total{model="m"} 3.0')
    lines.append("carrara_predict_shed_total 2.0")
    return "\n".join(lines) + "\n"


def test_parse_metrics_reads_labels_and_skips_comments() -> None:
    series = parse_metrics('# HELP a b\na_total{x="1",y="q\\"s"} 4.5\nb 2\nbad{x="1"} notanumber\n')
    assert series == {("a_total", (("x", "1"), ("y", 'q\\"s'))): 4.5, ("b", ()): 2.0}


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = [(0.001, 0.0), (0.005, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.005)
    assert quantile(0.25, buckets) == pytest.approx(0.003)  # halfway into (0.001, 0.005]
    assert quantile(0.99, buckets) == pytest.approx(0.0099)
    assert quantile(0.5, [(0.001, 0.0), (float("inf"), 0.0)]) is None
    # Past the last finite bound: that bound is the answer.
    assert quantile(0.99, [(0.001, 0.0), (float("inf"), 10.0)]) == pytest.approx(0.001)


def test_windowed_rates_shares_and_latency(tmp_path: Path) -> None:
    now = [1000.0]
    texts = [
        _text(
            {"champion": (900.0, 90.0, [0, 90, 0, 0]), "canary": (100.0, 10.0, [0, 10, 0, 0])},
            variant_errors={"canary": (2.0, 0.0), "champion": (0.0, 5.0)},
        ),
        # 5 s later: champion +800 entities (80 calls, all in (5, 10] ms), canary +200 (20 calls).
        _text(
            {"champion": (1700.0, 170.0, [0, 90, 80, 0]), "canary": (300.0, 30.0, [0, 10, 20, 0])},
            errors=4.0,
            # the canary failed 7 more times; the champion answered 6 more entities degraded
            variant_errors={"canary": (9.0, 0.0), "champion": (0.0, 11.0)},
        ),
    ]
    scraper = GatewayScraper("http://gw", lambda: texts.pop(0), clock=lambda: now[0])
    first = scraper.figures(10.0)
    assert first.reachable and first.window_s == 0.0
    by = {v.variant: v for v in first.variants}
    assert by["champion"].entities_per_s is None and by["champion"].share is None
    # No window yet: latency since the start (all in (1, 5] ms; median halfway in).
    assert by["champion"].p50_ms == pytest.approx(3.0)
    # No window yet: the counts since the start.
    assert (by["canary"].errors, by["champion"].degraded) == (2.0, 5.0)
    now[0] = 1005.0
    second = scraper.figures(10.0)
    assert second.window_s == pytest.approx(5.0)
    by = {v.variant: v for v in second.variants}
    assert by["champion"].entities_per_s == pytest.approx(160.0)
    assert by["canary"].entities_per_s == pytest.approx(40.0)
    assert by["canary"].requests_per_s == pytest.approx(4.0)
    assert by["champion"].share == pytest.approx(0.8) and by["canary"].share == pytest.approx(0.2)
    assert by["canary"].version == 2 and by["canary"].entities_total == 300.0
    # The window's calls all fell in (5, 10] ms: p50 = 7.5 ms, p99 = 9.95 ms.
    assert by["champion"].p50_ms == pytest.approx(7.5)
    assert by["champion"].p99_ms == pytest.approx(9.95)
    assert second.errors == {"m": 4.0} and second.degraded == {"m": 0.0}
    assert (by["canary"].errors, by["canary"].errors_total) == (7.0, 9.0)
    assert (by["champion"].degraded, by["champion"].degraded_total) == (6.0, 11.0)
    assert by["champion"].errors == 0.0 and by["canary"].degraded == 0.0
    assert second.shed_total == 2.0


def test_a_window_uses_only_samples_inside_it() -> None:
    now = [0.0]
    values = iter([100.0, 200.0, 260.0])

    def fetch() -> str:
        v = next(values)
        return _text({"champion": (v, v, [0, v, 0, 0])})

    scraper = GatewayScraper("http://gw", fetch, clock=lambda: now[0])
    scraper.figures(10.0)
    now[0] = 30.0  # the first sample is outside a 10 s window
    alone = scraper.figures(10.0)
    assert alone.window_s == 0.0
    now[0] = 36.0
    paired = scraper.figures(10.0)
    assert paired.window_s == pytest.approx(6.0)
    assert paired.variants[0].entities_per_s == pytest.approx(10.0)


def test_an_unreachable_gateway_is_reported_not_raised() -> None:
    def fetch() -> str:
        raise ConnectionError("connection refused")

    figures = GatewayScraper("http://gw", fetch).figures(10.0)
    assert not figures.reachable and "refused" in figures.error and figures.variants == []


# -- several gateway replicas ---------------------------------------------------------------


def test_replicas_are_summed_each_over_its_own_window() -> None:
    """Two replicas behind one Service: rates, shares and latency are the sums of each
    replica's own increases (a replica that restarted counts from zero, it does not spike the
    sum); a replica that does not answer is named while the others' figures stand."""
    now = [100.0]
    a = [
        _text({"champion": (900.0, 90.0, [0, 90, 0, 0]), "canary": (100.0, 10.0, [0, 10, 0, 0])}),
        # +450 / +50 entities; 45 + 5 calls, all in (5, 10] ms
        _text(
            {"champion": (1350.0, 135.0, [0, 90, 45, 0]), "canary": (150.0, 15.0, [0, 10, 5, 0])}
        ),
    ]
    b = [
        _text({"champion": (5000.0, 500.0, [500, 0, 0, 0]), "canary": (0.0, 0.0, [0, 0, 0, 0])}),
        # restarted inside the window: its counters start again from 0
        _text(
            {"champion": (350.0, 35.0, [0, 35, 0, 0]), "canary": (150.0, 15.0, [0, 15, 0, 0])},
            variant_errors={"canary": (3.0, 0.0)},
        ),
    ]
    down = [False]

    def fetch_b() -> str:
        if down[0]:
            raise ConnectionError("connection refused")
        return b.pop(0)

    scraper = GatewayScraper(
        "dns+http://gateway:8080",
        targets=lambda: {"http://a": lambda: a.pop(0), "http://b": fetch_b},
        clock=lambda: now[0],
    )
    first = scraper.figures(10.0)
    assert [r.url for r in first.replicas] == ["http://a", "http://b"]
    by = {v.variant: v for v in first.variants}
    assert by["champion"].entities_total == 5900.0 and by["champion"].entities_per_s is None
    now[0] = 105.0
    second = scraper.figures(10.0)
    by = {v.variant: v for v in second.variants}
    assert second.window_s == pytest.approx(5.0)
    # champion: +450 on a, +350 on b (restarted) = 800 in 5 s; canary: +50 and +150 = 200.
    assert by["champion"].entities_per_s == pytest.approx(160.0)
    assert by["canary"].entities_per_s == pytest.approx(40.0)
    assert by["champion"].share == pytest.approx(0.8)
    assert by["canary"].errors == 3.0 and by["canary"].errors_total == 3.0
    # canary latency in the window: 5 calls in (5, 10] ms on a, 15 in (1, 5] ms on b; the
    # 10th of 20 is 10/15 into the (1, 5] ms bucket: 1 + 4 * 10 / 15 ms.
    assert by["canary"].p50_ms == pytest.approx(1 + 4 * 10 / 15, abs=1e-3)
    assert second.reachable and second.error == ""

    down[0] = True
    now[0] = 107.0
    a.append(
        _text({"champion": (1550.0, 155.0, [0, 90, 65, 0]), "canary": (150.0, 15.0, [0, 10, 5, 0])})
    )
    third = scraper.figures(10.0)
    assert third.reachable and "http://b: connection refused" in third.error
    assert [(r.url, r.reachable) for r in third.replicas] == [
        ("http://a", True),
        ("http://b", False),
    ]
    by = {v.variant: v for v in third.variants}
    # a alone over its 7 s window: +650 champion entities.
    assert by["champion"].entities_per_s == pytest.approx(650.0 / 7.0, rel=1e-3)


def test_replica_targets_resolve_dns_and_close_what_left() -> None:
    from carrara.console.gateway_metrics import ReplicaTargets
    from carrara.errors import ConfigError

    answers = [["10.0.0.7", "10.0.0.5"], ["10.0.0.5", "fd00::9"]]

    def resolve(host: str, port: int, **_: Any) -> list[Any]:
        assert (host, port) == ("gateway-headless", 8080)
        return [(None, None, None, "", (ip, port)) for ip in answers.pop(0)]

    targets = ReplicaTargets(
        ["dns+http://gateway-headless:8080", "http://other:9000/"], {}, True, resolve=resolve
    )
    first = targets()
    assert list(first) == ["http://10.0.0.5:8080", "http://10.0.0.7:8080", "http://other:9000"]
    gone = first["http://10.0.0.7:8080"]
    second = targets()
    assert list(second) == ["http://10.0.0.5:8080", "http://[fd00::9]:8080", "http://other:9000"]
    assert second["http://10.0.0.5:8080"] is first["http://10.0.0.5:8080"]  # kept, reused
    assert gone.client.is_closed  # the replica that left is closed
    targets.close()
    assert all(f.client.is_closed for f in second.values())
    for bad, match in [
        ("dns+https://g:1", "TLS"),
        ("ftp://g", "must be"),
        ("http://", "no host"),
    ]:
        with pytest.raises(ConfigError, match=match):
            ReplicaTargets([bad], {}, True)
    with pytest.raises(ConfigError, match="no gateway"):
        ReplicaTargets([" ", ""], {}, True)


def test_the_control_plane_sums_the_replicas_it_is_given(tmp_path: Path) -> None:
    """``gateway_metrics_urls`` lists the replicas: /serving/variants scrapes each over HTTP
    (with the gateway token) and answers their sums; a dead replica is named, not fatal."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tests.servers import free_port, serve_app

    seen: list[str] = []

    def replica(entities: float) -> Starlette:
        async def metrics(request: Request) -> PlainTextResponse:
            seen.append(request.headers.get("authorization", ""))
            counts = {"champion": (entities, entities / 10, [0, entities / 10, 0, 0])}
            return PlainTextResponse(_text(counts))

        return Starlette(routes=[Route("/metrics", metrics)])

    dead = f"http://127.0.0.1:{free_port()}"
    with serve_app(replica(300.0)) as one, serve_app(replica(700.0)) as two:
        settings = Settings(
            home=str(tmp_path),
            online_store_url="memory://",
            api_token=TOKEN,
            gateway_token="gw-secret",
            gateway_metrics_urls=f"{one}, {two}/,{dead}",
        )
        cp = ControlPlane(settings)
        try:
            body = call(cp.app, "GET", "/serving/variants").json()
        finally:
            cp.close()
    assert body["reachable"] is True
    assert [(r["url"], r["reachable"]) for r in body["replicas"]] == sorted(
        [(one, True), (two, True), (dead, False)]
    )
    assert dead in body["error"]
    [champion] = body["variants"]
    assert champion["entities_total"] == 1000.0 and champion["requests_total"] == 100.0
    assert seen == ["Bearer gw-secret", "Bearer gw-secret"]
