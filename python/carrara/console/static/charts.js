// Carrara console: small SVG charts (line, scatter, grouped bars) with no dependencies.
"use strict";

const CHART_COLORS = ["#2f5bd3", "#e0712b", "#1a9c6b", "#b03fbf", "#c62828", "#6b7280",
  "#0f8fb3", "#a16207", "#4338ca", "#be185d"];

function svgEl(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  if (!isFinite(lo) || !isFinite(hi)) return [];
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

function legend(names) {
  const box = document.createElement("div");
  box.className = "legend";
  names.forEach((name, i) => {
    const item = document.createElement("span");
    const sw = document.createElement("i");
    sw.style.background = CHART_COLORS[i % CHART_COLORS.length];
    item.append(sw, document.createTextNode(name));
    box.append(item);
  });
  return box;
}

// series: [{name, points: [[x, y], ...]}]; opts: {width, height, xLabel, yLabel, hlines:
// [{y, label, color}], xFormat, dots, testid}. Returns a <div> (svg + legend).
function lineChart(series, opts) {
  opts = opts || {};
  const W = opts.width || 520, H = opts.height || 240, L = 56, R = 14, T = 14, B = 38;
  const pts = series.flatMap((s) => s.points).filter((p) => p[1] !== null && isFinite(p[1]));
  const hl = (opts.hlines || []).filter((h) => h.y !== null && isFinite(h.y));
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]).concat(hl.map((h) => h.y));
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (!pts.length) { x0 = 0; x1 = 1; y0 = 0; y1 = 1; }
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const svg = svgEl("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  if (opts.testid) svg.setAttribute("data-testid", opts.testid);
  for (const t of niceTicks(y0, y1, 5)) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eef1f5" }));
    svg.append(svgEl("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, fmtTick(t)));
  }
  const xf = opts.xFormat || fmtTick;
  for (const t of niceTicks(x0, x1, 6)) {
    svg.append(svgEl("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, xf(t)));
  }
  svg.append(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, stroke: "#9aa3b2" }));
  svg.append(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3b2" }));
  if (opts.xLabel) svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel));
  if (opts.yLabel) {
    svg.append(svgEl("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${(T + H - B) / 2})` }, opts.yLabel));
  }
  for (const h of hl) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: sy(h.y), y2: sy(h.y), stroke: h.color || "#c62828",
      "stroke-dasharray": "5 4" }));
    svg.append(svgEl("text", { x: W - R - 4, y: sy(h.y) - 4, "text-anchor": "end" }, h.label || ""));
  }
  series.forEach((s, i) => {
    const color = CHART_COLORS[i % CHART_COLORS.length];
    const good = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
    if (good.length > 1 && !opts.dotsOnly) {
      const d = good.map((p, k) => `${k ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      svg.append(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 2,
        "data-series": s.name }));
    }
    if (opts.dots || opts.dotsOnly || good.length === 1) {
      for (const p of good) {
        const c = svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3.5, fill: color, "data-series": s.name });
        c.append(svgEl("title", {}, `${s.name}: (${xf(p[0])}, ${fmtTick(p[1])})`));
        svg.append(c);
      }
    }
  });
  const box = document.createElement("div");
  box.append(svg, legend(series.map((s) => s.name)));
  return box;
}

// groups: [{label, values: [number per series]}]; names: series names. Grouped bars.
function barChart(groups, names, opts) {
  opts = opts || {};
  const W = opts.width || 420, H = opts.height || 200, L = 44, R = 10, T = 12, B = 46;
  const vmax = Math.max(1e-9, ...groups.flatMap((g) => g.values.filter((v) => v !== null)));
  const svg = svgEl("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  if (opts.testid) svg.setAttribute("data-testid", opts.testid);
  const sy = (v) => H - B - (v / vmax) * (H - T - B);
  for (const t of niceTicks(0, vmax, 4)) {
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), stroke: "#eef1f5" }));
    svg.append(svgEl("text", { x: L - 5, y: sy(t) + 4, "text-anchor": "end" }, fmtTick(t)));
  }
  const gw = (W - L - R) / Math.max(1, groups.length);
  const bw = Math.max(2, (gw * 0.8) / Math.max(1, names.length));
  groups.forEach((g, gi) => {
    g.values.forEach((v, si) => {
      if (v === null) return;
      const x = L + gi * gw + gw * 0.1 + si * bw;
      const r = svgEl("rect", { x, y: sy(v), width: bw - 1, height: H - B - sy(v),
        fill: CHART_COLORS[si % CHART_COLORS.length] });
      r.append(svgEl("title", {}, `${g.label} ${names[si]}: ${fmtTick(v)}`));
      svg.append(r);
    });
    if (groups.length <= 16) {
      const label = g.label.length > 10 ? g.label.slice(0, 9) + "…" : g.label;
      const x = L + gi * gw + gw / 2, y = H - B + 12;
      svg.append(svgEl("text", { x, y, "text-anchor": "end", transform: `rotate(-35 ${x} ${y})` }, label));
    }
  });
  svg.append(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "#9aa3b2" }));
  const box = document.createElement("div");
  box.append(svg, legend(names));
  return box;
}
