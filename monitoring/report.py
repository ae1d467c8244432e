"""The monitoring report: one self-contained HTML file (inline SVG, no server, no network)
with, for one model version, drift scores over time, reference vs current distributions of
every feature and of the prediction, the performance metric over time, and active alerts.

A few lines of inline script count the plots the browser actually laid out (non-empty SVG
bounding boxes) into ``body[data-rendered-plots]``, so a headless browser can check that the
report renders, not only that the markup exists.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from carrara.errors import NotFoundError
from carrara.sql import Database

from .alerts import active_alerts
from .config import ModelMonitorConfig
from .drift import FeatureDrift
from .profiles import ReferenceProfile, list_profiles, load_profile
from .store import drift_history, model_config, performance_history, window_sizes, window_state
from .views import feature_bins, format_number

__all__ = ["render_report", "write_report"]

_fmt = format_number

_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 640, 260, 56, 150, 28, 36


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _alert_figure(
    statistic: str, value: float | None, threshold: float | None, samples: int | None
) -> str:
    """``"KS D 0.1500 (threshold 0.1) on 3,000 rows"``: a value with its own threshold."""
    text = f"{statistic or 'value'} {_fmt(value, 4)}"
    if threshold is not None:
        text += f" (threshold {threshold:g})"
    if samples is not None:
        text += f" on {samples:,} rows"
    return text


def _time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def _svg_open(plot_id: str, title: str) -> list[str]:
    return [
        f'<svg class="plot" id="{_e(plot_id)}" role="img" aria-label="{_e(title)}"'
        f' xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}"'
        f' viewBox="0 0 {_W} {_H}">',
        f"<title>{_e(title)}</title>",
        f'<text x="{_W / 2}" y="16" text-anchor="middle" font-size="13"'
        f' font-weight="bold">{_e(title)}</text>',
    ]


def line_chart(
    plot_id: str,
    title: str,
    series: dict[str, list[tuple[float, float]]],
    *,
    hlines: Sequence[tuple[str, float, str]] = (),
    x_is_time: bool = True,
) -> str:
    """Lines (with point markers) per series; ``hlines`` are (label, y, color) thresholds."""
    out = _svg_open(plot_id, title)
    points = [p for s in series.values() for p in s]
    ys = [y for _, y in points] + [y for _, y, _ in hlines]
    if not points:
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data yet</text>')
        return "\n".join([*out, "</svg>"])
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(0.0, *ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    y1 += (y1 - y0) * 0.05
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B

    def sx(x: float) -> float:
        return _PAD_L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return _PAD_T + ph - (y - y0) / (y1 - y0) * ph

    out.append(
        f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>'
    )
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        out.append(
            f'<text x="{_PAD_L - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end"'
            f' font-size="10">{_e(_fmt(yv, 2))}</text>'
        )
    for xv, anchor in ((x0, "start"), (x1, "end")):
        label = _time(int(xv)) if x_is_time else _fmt(xv, 0)
        out.append(
            f'<text x="{sx(xv):.1f}" y="{_H - 8}" text-anchor="{anchor}"'
            f' font-size="10">{_e(label)}</text>'
        )
    for label, yv, color in hlines:
        out.append(
            f'<line class="threshold" x1="{_PAD_L}" x2="{_PAD_L + pw}" y1="{sy(yv):.1f}"'
            f' y2="{sy(yv):.1f}" stroke="{color}" stroke-dasharray="5,4"/>'
            f'<text x="{_PAD_L + pw + 4}" y="{sy(yv) + 4:.1f}" font-size="10"'
            f' fill="{color}">{_e(label)}</text>'
        )
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = sorted(pts)
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(
                f'<polyline class="series" data-series="{_e(name)}" points="{path}"'
                f' fill="none" stroke="{color}" stroke-width="1.5"/>'
            )
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{color}"/>')
        ly = _PAD_T + 14 * (i + 1) + 6 * len(hlines) + 10
        out.append(
            f'<rect x="{_W - _PAD_R + 40}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{_W - _PAD_R + 54}" y="{ly}" font-size="11">{_e(name)}</text>'
        )
    return "\n".join([*out, "</svg>"])


def bar_chart(
    plot_id: str,
    title: str,
    labels: Sequence[str],
    reference: Sequence[float],
    current: Sequence[float] | None,
) -> str:
    """Side-by-side bars of reference and current shares per bin."""
    out = _svg_open(plot_id, title)
    n = max(1, len(labels))
    top = max([*reference, *(current or []), 1e-9])
    pw, ph = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B
    slot = pw / n
    out.append(
        f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>'
    )
    for k in range(3):
        yv = top * k / 2
        out.append(
            f'<text x="{_PAD_L - 4}" y="{_PAD_T + ph - ph * k / 2 + 4:.1f}" text-anchor="end"'
            f' font-size="10">{yv:.0%}</text>'
        )
    sides: list[tuple[str, Sequence[float], str]] = [("reference", reference, "#1f77b4")]
    if current is not None:
        sides.append(("current", current, "#ff7f0e"))
    bw = slot / (len(sides) + 0.5)
    for s, (name, values, color) in enumerate(sides):
        for i, v in enumerate(values):
            h = ph * v / top
            out.append(
                f'<rect class="bar {name}" x="{_PAD_L + i * slot + s * bw + bw / 4:.1f}"'
                f' y="{_PAD_T + ph - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{color}">'
                f"<title>{_e(labels[i] if i < len(labels) else '')}: {v:.1%}</title></rect>"
            )
        ly = _PAD_T + 14 * (s + 1)
        out.append(
            f'<rect x="{_W - _PAD_R + 40}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{_W - _PAD_R + 54}" y="{ly}" font-size="11">{name}</text>'
        )
    step = max(1, n // 8)
    for i in range(0, len(labels), step):
        out.append(
            f'<text x="{_PAD_L + (i + 0.5) * slot:.1f}" y="{_H - 8}" text-anchor="middle"'
            f' font-size="9">{_e(labels[i])}</text>'
        )
    return "\n".join([*out, "</svg>"])


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.alert { background: #fde0dc; } .warn { background: #fff4ce; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
svg.plot { background: #fff; border: 1px solid #eee; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var n = 0;
  document.querySelectorAll('svg.plot').forEach(function (s) {
    var b = s.getBBox();
    if (b.width > 0 && b.height > 0 && s.querySelectorAll('rect,polyline,circle').length > 1) n++;
  });
  document.body.setAttribute('data-rendered-plots', String(n));
});
"""


def render_report(db: Database, model: str, version: int | None = None) -> str:
    """The report of ``model`` at ``version`` (newest profiled version when None), as HTML."""
    versions = [v for m, v in list_profiles(db, model)]
    if not versions:
        known = sorted({m for m, _ in list_profiles(db)})
        raise NotFoundError(f"no monitored model {model!r}; monitored: {known or 'none'}")
    profile: ReferenceProfile = load_profile(db, model, version)
    v = profile.version
    history = drift_history(db, model, v)
    windows = window_sizes(db, model, v)
    perf = performance_history(db, model, v)
    alerts = active_alerts(db, model)
    drift_config = model_config(db, model, ModelMonitorConfig()).drift
    latest_start = max((s for s, _ in history), default=None)
    latest: dict[str, FeatureDrift] = {r.feature: r for s, r in history if s == latest_start}
    latest_counts = None if latest_start is None else window_state(db, model, v, latest_start)

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Carrara monitoring: {_e(model)} v{v}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Monitoring report: {_e(model)} v{v}</h1>",
        f"<p>Generated {_e(_time(time.time_ns() // 1_000_000))} UTC. Versions profiled:"
        f" {_e(', '.join(map(str, versions)))}. Reference rows: {profile.rows}."
        f" Windows judged: {len({s for s, _ in history})}; stored: {len(windows)};"
        f" predictions in windows: {sum(n for _, n in windows.values())}.</p>",
        "<h2>Active alerts</h2>",
    ]
    if alerts:
        parts.append(
            "<table><tr><th>alert</th><th>since</th><th>when it fired</th><th>now</th>"
            "<th>message</th></tr>"
        )
        for a in alerts:
            now = (
                _alert_figure(a.statistic, a.latest_value, a.threshold, a.latest_samples)
                + f" ({_time(a.latest_ms)})"
                if a.latest_ms is not None
                else "unchanged since it fired"
            )
            parts.append(
                f'<tr class="alert"><td>{_e(a.key)}</td><td>{_e(_time(a.started_ms))}</td>'
                f"<td>{_e(_alert_figure(a.statistic, a.value, a.threshold, a.samples))}</td>"
                f"<td>{_e(now)}</td><td>{_e(a.latest_message or a.message)}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")

    parts.append("<h2>Drift scores over time (PSI per window)</h2>")
    series: dict[str, list[tuple[float, float]]] = {}
    for start, res in history:
        if res.psi is not None:
            series.setdefault(res.feature, []).append((float(start), res.psi))
    thresholds = [
        ("alert", drift_config.psi_alert, "#d62728"),
        ("warn", drift_config.psi_warn, "#ff7f0e"),
    ]
    parts.append(
        line_chart("drift-over-time", f"PSI per window, {model} v{v}", series, hlines=thresholds)
    )

    parts.append(
        "<h2>Latest window"
        + (f" ({_e(_time(latest_start))})" if latest_start is not None else "")
        + "</h2>"
    )
    parts.append(
        "<table><tr><th>feature</th><th>kind</th><th>n</th><th>missing</th><th>PSI</th>"
        "<th>KS D (±bound)</th><th>KS p</th><th>chi² p</th><th>JS</th><th>status</th></tr>"
    )
    for f in profile.checked():
        found = latest.get(f.name)
        if found is None:
            parts.append(
                f"<tr><td>{_e(f.name)}</td><td>{f.kind}</td>"
                + "<td>-</td>" * 7
                + "<td>not judged</td></tr>"
            )
            continue
        r = found
        ks = (
            "-"
            if r.ks_statistic is None
            else (f"{_fmt(r.ks_statistic)} (±{_fmt(r.ks_error_bound)})")
        )
        parts.append(
            f'<tr class="{r.status}"><td>{_e(f.name)}</td><td>{r.kind}</td><td>{r.n}</td>'
            f"<td>{r.missing_rate:.1%}</td><td>{_fmt(r.psi)}</td><td>{ks}</td>"
            f"<td>{_fmt(r.ks_pvalue)}</td><td>{_fmt(r.chi2_pvalue)}</td><td>{_fmt(r.js)}</td>"
            f"<td>{_e(r.status)}</td></tr>"
        )
    parts.append("</table>")

    parts.append("<h2>Distributions: reference vs latest window</h2><div class='grid'>")
    for i, f in enumerate(profile.checked()):
        counts = None
        if latest_counts is not None and f.name in latest_counts.counts:
            counts = np.asarray(latest_counts.counts[f.name], dtype=np.int64)
        labels, ref, cur = feature_bins(f, counts)
        parts.append(bar_chart(f"dist-{i}", f"{f.name}: reference vs current", labels, ref, cur))
    parts.append("</div>")

    parts.append("<h2>Performance over time (labelled predictions per window)</h2>")
    metrics = sorted({m for _, m, _, _ in perf} | set(profile.baseline))
    if not metrics:
        metrics = ["auc"]
    for metric in metrics:
        pts = [(float(s), val) for s, m, val, _ in perf if m == metric]
        base = profile.baseline.get(metric)
        hl = [] if base is None else [("baseline", base, "#2ca02c")]
        parts.append(
            line_chart(
                f"metric-{metric}", f"{metric} per window, {model} v{v}", {metric: pts}, hlines=hl
            )
        )
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_report(db: Database, model: str, path: str | Path, version: int | None = None) -> Path:
    """Write the report to ``path``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(db, model, version), encoding="utf-8")
    return out
