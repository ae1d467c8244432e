"""Reports of a load test: a text table for the terminal, JSON, and a self-contained HTML page
with SVG plots (the latency percentile spectrum of each stage and, for a ramp, latency against
offered rate). SVG written by hand: no plotting library on the serving machines."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import msgspec

from carrara.loadgen.histogram import LatencyHistogram
from carrara.loadgen.runner import LoadTestResult, StageResult

__all__ = ["format_table", "write_html", "write_json"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _stage_label(s: StageResult) -> str:
    if s.mode == "open":
        return f"open {s.offered_rate:g}/s"
    return f"closed x{s.concurrency}"


def format_table(result: LoadTestResult) -> str:
    """One line per stage: offered/achieved rate, percentiles, errors, verdict."""
    head = (
        f"{'stage':>16} {'achieved/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'max ms':>8} {'errors':>7} {'shed':>5} {'lag p99':>8}  verdict"
    )
    lines = [f"target: {result.target}", head]
    for s in result.stages:
        lat = s.latency
        verdict = s.verdict.describe() if s.verdict is not None else "-"
        if s.generator_saturated:
            verdict += " (generator lagging: see send_lag)"
        lines.append(
            f"{_stage_label(s):>16} {s.achieved_rate:>10.1f} {lat.p50_ms:>8.3f} "
            f"{lat.p90_ms:>8.3f} {lat.p99_ms:>8.3f} {lat.p999_ms:>9.3f} {lat.max_ms:>8.3f} "
            f"{sum(s.errors.values()):>7} {s.shed:>5} {s.send_lag.p99_ms:>8.3f}  {verdict}"
        )
    if result.max_passing_rate is not None or result.first_failing_rate is not None:
        lines.append(
            f"highest rate meeting the SLO: {result.max_passing_rate}; "
            f"first failing: {result.first_failing_rate}"
        )
    if result.passed is not None:
        lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)


def write_json(result: LoadTestResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))


def _svg_plot(
    series: Sequence[tuple[str, list[tuple[float, float]]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlog_nines: bool,
    hline: float | None = None,
) -> str:
    """A line plot. ``xlog_nines``: x is a quantile drawn on the 'number of nines' axis."""
    w, h, ml, mr, mt, mb = 720, 380, 70, 160, 30, 50
    pts = [
        (-math.log10(max(1 - x, 1e-6)) if xlog_nines else x, y)
        for _, data in series
        for x, y in data
    ]
    if not pts:
        return "<p>no data</p>"
    xmax = max(p[0] for p in pts) or 1.0
    xmin = 0.0 if xlog_nines else min(p[0] for p in pts)
    ymax = max([p[1] for p in pts] + ([hline] if hline else [])) * 1.1 or 1.0
    span = (xmax - xmin) or 1.0

    def sx(x: float) -> float:
        return ml + (x - xmin) / span * (w - ml - mr)

    def sy(y: float) -> float:
        return h - mb - y / ymax * (h - mt - mb)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
        f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>',
        f'<text x="{(ml + w - mr) / 2}" y="{h - 10}" text-anchor="middle">{html.escape(xlabel)}'
        "</text>",
        f'<text x="15" y="{(mt + h - mb) / 2}" transform="rotate(-90 15 {(mt + h - mb) / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
    ]
    for k in range(6):
        y = ymax * k / 5
        out.append(f'<text x="{ml - 5}" y="{sy(y) + 4}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<line x1="{ml}" y1="{sy(y)}" x2="{w - mr}" y2="{sy(y)}" stroke="#eee"/>')
    ticks: list[tuple[float, str]]
    if xlog_nines:
        ticks = [
            (float(n), f"{100 * (1 - 10**-n):.{max(n - 2, 0)}f}%") for n in range(int(xmax) + 1)
        ]
    else:
        ticks = [(xmin + span * k / 5, f"{xmin + span * k / 5:.4g}") for k in range(6)]
    for x, label in ticks:
        out.append(f'<text x="{sx(x)}" y="{h - mb + 15}" text-anchor="middle">{label}</text>')
    if hline is not None:
        out.append(
            f'<line x1="{ml}" y1="{sy(hline)}" x2="{w - mr}" y2="{sy(hline)}" '
            'stroke="black" stroke-dasharray="4 3"/>'
        )
        out.append(f'<text x="{w - mr + 4}" y="{sy(hline) + 4}">SLO {hline:g} ms</text>')
    for i, (name, data) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(
            f"{sx(-math.log10(max(1 - x, 1e-6)) if xlog_nines else x):.1f},{sy(y):.1f}"
            for x, y in data
        )
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        ly = mt + 14 * i + 10
        out.append(
            f'<line x1="{w - mr + 8}" y1="{ly}" x2="{w - mr + 28}" y2="{ly}" stroke="{color}"/>'
        )
        out.append(f'<text x="{w - mr + 32}" y="{ly + 4}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_html(result: LoadTestResult, path: Path) -> None:
    """The percentile spectrum per stage (and p50/p99 against offered rate for a ramp)."""
    slo_p99 = result.slo.latency_ms.get("p99") if result.slo is not None else None
    spectra = [
        (_stage_label(s), LatencyHistogram.from_data(s.histogram).spectrum()) for s in result.stages
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>carrara loadtest</title>",
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f6f6f6;padding:1em}"
        "</style></head><body>",
        f"<h1>carrara loadtest {html.escape(result.label)}</h1>",
        f"<p>{html.escape(result.target)}<br>{html.escape(result.machine)}<br>"
        f"{html.escape(result.started_at)}</p>",
        f"<pre>{html.escape(format_table(result))}</pre>",
        _svg_plot(
            spectra,
            title="latency by percentile (from intended send time)",
            xlabel="percentile",
            ylabel="latency (ms)",
            xlog_nines=True,
            hline=slo_p99,
        ),
    ]
    open_stages = [s for s in result.stages if s.offered_rate is not None]
    if len(open_stages) > 1:
        by_rate = sorted(open_stages, key=lambda s: s.offered_rate or 0.0)
        parts.append(
            _svg_plot(
                [
                    ("p50", [(s.offered_rate or 0.0, s.latency.p50_ms) for s in by_rate]),
                    ("p99", [(s.offered_rate or 0.0, s.latency.p99_ms) for s in by_rate]),
                ],
                title="latency against offered rate",
                xlabel="offered requests/s",
                ylabel="latency (ms)",
                xlog_nines=False,
                hline=slo_p99,
            )
        )
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
