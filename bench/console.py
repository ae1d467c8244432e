"""Web console page loads: each page loaded cold in headless Chromium until its data is drawn.

Run ``python -m bench.console [--entities 20000] [-n 20] [--backend postgres,redis]``: it runs
``carrara demo --keep`` at that size, starts ``carrara up`` on what the demo left, logs in with
the demo's console token and loads every page ``n`` times from ``about:blank``. A load's time
is the page's own ``performance.now()`` when it marks itself ready (``body[data-ready]``,
set once its API calls returned and the page is drawn): navigation start → data on screen,
the HTML, script, style and API round trips included. Reports median, p99 and max per page.

``measure`` is what ``tests/e2e/test_console.py`` times its pages with (the 300 ms budget).
Needs Debian's ``chromium`` and the ``playwright`` Python package (no browser download).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
from collections.abc import Mapping
from typing import Any

import msgspec

CHROMIUM = "/usr/bin/chromium"

__all__ = ["CHROMIUM", "PageTiming", "console_pages", "login", "main", "measure"]


class PageTiming(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    n: int
    median_ms: float
    p99_ms: float
    max_ms: float


def console_pages(model: str, job_id: str, monitored_version: int | None) -> dict[str, str]:
    """Every page of the console (name -> hash route) for one model and one training job."""
    monitoring = f"#/monitoring?model={model}"
    if monitored_version is not None:
        monitoring += f"&version={monitored_version}"
    return {
        "models": "#/models",
        "model": f"#/models/{model}",
        "compare": f"#/models/{model}/compare/1/2",
        "approvals": "#/approvals",
        "deployments": f"#/deployments?model={model}",
        "training": "#/training",
        "job": f"#/training/{job_id}",
        "features": "#/features",
        "monitoring": monitoring,
    }


def login(page: Any, api_url: str, token: str) -> None:
    """Log ``page`` in through the console's login form."""
    page.goto(f"{api_url}/console#/login")
    page.wait_for_selector("body[data-ready='login']", timeout=15_000)
    page.get_by_test_id("token").fill(token)
    page.get_by_test_id("login").click()
    page.wait_for_selector("body[data-ready='models']", timeout=15_000)


def measure(page: Any, api_url: str, pages: Mapping[str, str], n: int) -> list[PageTiming]:
    """Load each page ``n`` times cold (from ``about:blank``) in a logged-in ``page``."""
    out: list[PageTiming] = []
    for name, route in pages.items():
        runs: list[float] = []
        for _ in range(n):
            page.goto("about:blank")
            page.goto(f"{api_url}/console{route}")
            page.wait_for_selector(f"body[data-ready='{name}']", timeout=15_000)
            runs.append(float(page.evaluate("window.__carraraPage.total")))
        runs.sort()
        out.append(
            PageTiming(
                name=name,
                n=n,
                median_ms=round(statistics.median(runs), 1),
                p99_ms=round(runs[min(len(runs) - 1, round(0.99 * (len(runs) - 1)))], 1),
                max_ms=round(runs[-1], 1),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright
    from rich.console import Console

    from carrara.demo import MODEL, _drop_redis_prefix, _drop_schema, demo_report
    from carrara.up import Services, UpConfig, load_up_config

    parser = argparse.ArgumentParser(prog="python -m bench.console")
    parser.add_argument("--entities", type=int, default=20_000)
    parser.add_argument("-n", type=int, default=20, help="loads per page")
    parser.add_argument("--backend", default="postgres,redis")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", help="write the timings here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carrara-console-bench-") as tmp:
        report = demo_report(
            args.entities,
            path=tmp,
            backend=args.backend,
            pg_url=args.pg_url,
            redis_url=args.redis_url,
            keep=True,
            console=Console(file=io.StringIO()),
        )
        try:
            if not report.ok:
                raise SystemExit("the demo failed; run `carrara demo` to see why")
            settings, _ = load_up_config(report.settings_file)
            up = UpConfig(
                api_port=0, gateway_http_port=0, gateway_grpc_port=0, run_dir=tmp + "/run"
            )
            with Services(settings, up) as services, sync_playwright() as pw:
                import httpx

                jobs = httpx.get(f"{services.api_url}/training-jobs").json()["jobs"]
                job = next(j for j in jobs if j["spec"]["model"]["framework"] == "pytorch")
                monitored = httpx.get(f"{services.api_url}/monitoring/models").json()["models"]
                versions = next((m["versions"] for m in monitored if m["model"] == MODEL), [])
                browser = pw.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                login(page, services.api_url, report.console_token)
                pages = console_pages(MODEL, job["job_id"], max(versions) if versions else None)
                timings = measure(page, services.api_url, pages, args.n)
                browser.close()
        finally:
            if report.isolation:
                _drop_schema(args.pg_url, report.isolation)
                _drop_redis_prefix(args.redis_url, report.isolation)
    print(f"console page loads, {args.entities:,} riders, {args.n} cold loads per page")
    print(f"{'page':<12} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for t in timings:
        print(f"{t.name:<12} {t.median_ms:>10.1f} {t.p99_ms:>8.1f} {t.max_ms:>8.1f}")
    if args.json:
        with open(args.json, "wb") as f:
            f.write(msgspec.json.encode(timings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
