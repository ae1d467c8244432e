// Carrara console: a single-page app over the control plane's REST API (same tokens, same
// roles). Every write goes through the API the CLI and the SDK use; the pages only offer the
// buttons the token's roles may use, and the API checks them again.
"use strict";

const TOKEN_KEY = "carrara.token";
const WHO_KEY = "carrara.who";
const IMPLIED = { admin: ["reader", "publisher", "deployer", "admin"] };
const S = { timers: [], seq: 0 };

// -- helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else if (k === "testid") el.setAttribute("data-testid", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const token = () => sessionStorage.getItem(TOKEN_KEY);
const who = () => JSON.parse(sessionStorage.getItem(WHO_KEY) || "null");

function can(role) {
  const w = who();
  if (!w) return false;
  return w.roles.some((r) => r === role || (IMPLIED[r] || []).includes(role));
}

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, opts) {
  const headers = { Accept: "application/json" };
  const t = (opts && opts.token) || token();
  if (t) headers.Authorization = "Bearer " + t;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!r.ok) {
    const msg = data && data.message ? data.message : `${method} ${path}: HTTP ${r.status}`;
    throw new ApiError(r.status, data && data.error, msg);
  }
  return data;
}

const get = (path) => api("GET", path);
const enc = encodeURIComponent;

function fmt(v, digits) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    return v.toFixed(digits === undefined ? 4 : digits);
  }
  return String(v);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.abs(seconds);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function when(value) {
  // ISO strings, epoch microseconds (*_us) or milliseconds (*_ms) -> a short local time.
  if (value === null || value === undefined || value === "") return "—";
  let d;
  if (typeof value === "number") d = new Date(value > 1e14 ? value / 1000 : value > 1e11 ? value : value * 1000);
  else d = new Date(value);
  if (isNaN(d.getTime())) return String(value);
  return d.toISOString().replace("T", " ").slice(0, 19);
}

function badge(text, cls) { return h("span", { class: `badge ${cls || text}` }, text); }

function table(columns, rows, attrs) {
  // columns: [{label, num, cell: (row) => node|string}]
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, title: c.title || null }, c.label)))),
    h("tbody", {}, rows.map((row, i) => h("tr", { "data-row": row._key !== undefined ? row._key : i },
      columns.map((c) => h("td", { class: c.num ? "num" : null }, c.cell(row)))))));
}

function kv(pairs, attrs) {
  return h("dl", Object.assign({ class: "kv" }, attrs || {}),
    pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function banner(message, kind) {
  const b = document.getElementById("banner");
  if (!message) { b.hidden = true; b.textContent = ""; return; }
  b.className = kind || "";
  b.textContent = message;
  b.hidden = false;
}

function every(ms, fn) {
  const seq = S.seq;
  const run = async () => {
    if (seq !== S.seq) return;
    try { await fn(); } catch (e) { banner(e.message); }
  };
  S.timers.push(setInterval(run, ms));
}

// A confirmation dialog: resolves with the form's values (or null when cancelled).
function dialog(title, body, fields, confirmLabel) {
  return new Promise((resolve) => {
    const modal = document.getElementById("modal");
    const box = modal.querySelector(".dialog");
    const inputs = (fields || []).map((f) => {
      const input = f.multiline ? h("textarea", { rows: 3, cols: 50, name: f.name, testid: `dialog-${f.name}` })
        : h("input", { name: f.name, testid: `dialog-${f.name}`, size: 40 });
      return { f, input };
    });
    const error = h("p", { class: "error", testid: "dialog-error" });
    const close = (value) => { modal.hidden = true; box.replaceChildren(); resolve(value); };
    const ok = h("button", { class: "primary", testid: "dialog-confirm", onclick: () => {
      const values = {};
      for (const { f, input } of inputs) {
        values[f.name] = input.value.trim();
        if (f.required && !values[f.name]) { error.textContent = `${f.label} is required`; return; }
      }
      close(values);
    } }, confirmLabel || "Confirm");
    box.replaceChildren(h("h2", {}, title), body || "",
      ...inputs.map(({ f, input }) => h("label", { style: "display:block;margin-top:10px" }, f.label, h("br"), input)),
      error,
      h("div", { class: "actions" },
        h("button", { testid: "dialog-cancel", onclick: () => close(null) }, "Cancel"), ok));
    modal.hidden = false;
    (inputs[0] ? inputs[0].input : ok).focus();
  });
}

async function act(label, fn) {
  try {
    const out = await fn();
    banner(label, "info");
    return out;
  } catch (e) {
    banner(e.message);
    return null;
  }
}

// -- routing ---------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/login$/, "login", pageLogin],
  [/^#\/models$/, "models", pageModels],
  [/^#\/models\/([^/]+)$/, "model", pageModel],
  [/^#\/models\/([^/]+)\/compare\/(\d+)\/(\d+)$/, "compare", pageCompare],
  [/^#\/approvals$/, "approvals", pageApprovals],
  [/^#\/deployments$/, "deployments", pageDeployments],
  [/^#\/training$/, "training", pageTraining],
  [/^#\/training\/([^/]+)$/, "job", pageJob],
  [/^#\/features$/, "features", pageFeatures],
  [/^#\/monitoring$/, "monitoring", pageMonitoring],
];

function query() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

function go(hash) { location.hash = hash; }

function renderWho() {
  const w = who();
  const box = document.getElementById("who");
  box.replaceChildren();
  if (!w) return;
  box.append(h("span", { testid: "who" }, `${w.subject} · ${w.roles.join(", ")}`),
    h("button", { testid: "logout", onclick: () => {
      sessionStorage.removeItem(TOKEN_KEY); sessionStorage.removeItem(WHO_KEY); go("#/login");
    } }, "Log out"));
}

async function route() {
  S.timers.forEach(clearInterval);
  S.timers = [];
  const seq = ++S.seq;
  const started = performance.now();
  banner("");
  let hash = location.hash.split("?")[0] || "#/models";
  if (hash === "#/" || hash === "#") hash = "#/models";
  if (!token() && hash !== "#/login") { go("#/login"); return; }
  renderWho();
  document.getElementById("top").querySelector("nav").hidden = !token();
  for (const [re, name, page] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    document.querySelectorAll("[data-nav]").forEach((a) =>
      a.classList.toggle("active", name.startsWith(a.dataset.nav) ||
        (a.dataset.nav === "models" && (name === "model" || name === "compare")) ||
        (a.dataset.nav === "training" && name === "job")));
    const main = document.getElementById("page");
    document.body.removeAttribute("data-ready");
    try {
      const content = await page(...m.slice(1).map(decodeURIComponent));
      if (seq !== S.seq) return; // the user moved on while it loaded
      main.replaceChildren(content);
      document.title = `Carrara · ${name}`;
    } catch (e) {
      if (seq !== S.seq) return;
      main.replaceChildren(h("h1", {}, "Could not load this page"), h("p", { class: "error", testid: "page-error" }, e.message));
    }
    const ms = performance.now() - started;
    window.__carraraPage = { name, ms, total: performance.now() };
    document.body.setAttribute("data-ready", name);
    return;
  }
  document.getElementById("page").replaceChildren(h("h1", {}, "No such page"), h("a", { href: "#/models" }, "Models"));
  document.body.setAttribute("data-ready", "none");
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// -- login -----------------------------------------------------------------------------------

async function pageLogin() {
  const input = h("input", { type: "password", id: "token", testid: "token", placeholder: "bearer token", autocomplete: "off" });
  const error = h("p", { class: "error", testid: "login-error" });
  const submit = async (ev) => {
    ev.preventDefault();
    const t = input.value.trim();
    if (!t) { error.textContent = "Paste a token (carrara models token create)."; return; }
    try {
      const w = await api("GET", "/auth/whoami", undefined, { token: t });
      sessionStorage.setItem(TOKEN_KEY, t);
      sessionStorage.setItem(WHO_KEY, JSON.stringify(w));
      go("#/models");
    } catch (e) { error.textContent = e.message; }
  };
  return h("div", { class: "login card" },
    h("h1", {}, "Log in"),
    h("p", { class: "muted" }, "A Carrara bearer token (the API's tokens and roles). It is kept for this browser tab's session only."),
    h("form", { onsubmit: submit }, input, h("button", { class: "primary", type: "submit", testid: "login" }, "Log in")),
    error);
}

// -- models ----------------------------------------------------------------------------------

async function pageModels() {
  const models = await get("/models");
  const q = query().get("q") || "";
  const body = h("div", {});
  const search = h("input", { type: "search", testid: "model-search", placeholder: "Search models", value: q });
  const draw = () => {
    const needle = search.value.trim().toLowerCase();
    const shown = models.filter((m) => !needle || [m.name, m.description, m.framework, m.created_by]
      .some((s) => (s || "").toLowerCase().includes(needle)));
    body.replaceChildren(shown.length ? table([
      { label: "Model", cell: (m) => h("a", { href: `#/models/${enc(m.name)}`, testid: `model-${m.name}` }, m.name) },
      { label: "Framework", cell: (m) => m.framework },
      { label: "Latest", num: true, cell: (m) => `v${m.latest_version}` },
      { label: "Production", num: true, cell: (m) => m.production_version ? `v${m.production_version}` : "—" },
      { label: "Gates", num: true, cell: (m) => m.gates.length },
      { label: "", cell: (m) => m.high_stakes ? badge("high stakes", "warn") : "" },
      { label: "Description", cell: (m) => m.description },
    ], shown.map((m) => Object.assign({ _key: m.name }, m)), { testid: "models-table" })
      : h("p", { class: "muted", testid: "no-models" }, needle ? `No model matches “${needle}”.` : "No models registered yet."));
  };
  search.addEventListener("input", draw);
  draw();
  return h("div", {}, h("h1", {}, "Models"), h("div", { class: "row" }, search,
    h("span", { class: "muted" }, `${models.length} models`)), h("div", { style: "margin-top:12px" }, body));
}

function metricNames(versions) {
  const names = new Set();
  versions.forEach((v) => Object.keys(v.metrics || {}).forEach((k) => names.add(k)));
  return [...names].sort();
}

function latestDecision(decisions) {
  return decisions && decisions.length ? decisions[decisions.length - 1] : null;
}

async function decide(kind, model, version) {
  const approve = kind === "approve";
  const values = await dialog(`${approve ? "Approve" : "Reject"} ${model} v${version}`,
    h("p", {}, approve ? "Sign off this version for promotion to PRODUCTION." : "Record why this version must not go to PRODUCTION."),
    [{ name: "reason", label: approve ? "Comment" : "Reason", required: !approve, multiline: true }],
    approve ? "Approve" : "Reject");
  if (!values) return false;
  const path = `/models/${enc(model)}/versions/${version}/${kind}`;
  const body = approve ? { comment: values.reason } : { reason: values.reason };
  return (await act(`${approve ? "Approved" : "Rejected"} ${model} v${version}`, () => api("POST", path, body))) !== null;
}

async function promote(model, version) {
  const values = await dialog(`Promote ${model} v${version}`,
    h("p", {}, "The model's gates run first; the current PRODUCTION version is archived."), [], "Promote");
  if (!values) return false;
  try {
    const out = await api("POST", `/models/${enc(model)}/versions/${version}/promote`);
    banner(`Promoted ${model} v${version} to PRODUCTION` + (out.archived_version ? ` (v${out.archived_version} archived)` : ""), "info");
    return true;
  } catch (e) { banner(e.message); return false; }
}

function versionActions(model, v, decisions, reload) {
  const out = [];
  if (v.status === "STAGING" && can("approver")) {
    out.push(h("button", { testid: `approve-${v.version}`, onclick: async () => { if (await decide("approve", model.name, v.version)) reload(); } }, "Approve"));
    out.push(h("button", { class: "danger", testid: `reject-${v.version}`, onclick: async () => { if (await decide("reject", model.name, v.version)) reload(); } }, "Reject"));
  }
  if (v.status === "STAGING" && can("deployer")) {
    out.push(h("button", { class: "primary", testid: `promote-${v.version}`, onclick: async () => { if (await promote(model.name, v.version)) reload(); } }, "Promote"));
  }
  if (v.status !== "ARCHIVED" && can("deployer")) {
    out.push(h("button", { testid: `archive-${v.version}`, onclick: async () => {
      if (!await dialog(`Archive ${model.name} v${v.version}`, h("p", {}, "An archived version cannot be promoted or deployed again."), [], "Archive")) return;
      if (await act(`Archived v${v.version}`, () => api("POST", `/models/${enc(model.name)}/versions/${v.version}/archive`))) reload();
    } }, "Archive"));
  }
  return h("div", { class: "actions" }, out);
}

function tagJSON(v, key, fallback) {
  try { return JSON.parse((v.tags || {})[key]); } catch (e) { return fallback; }
}

async function pageModel(name) {
  const base = `/models/${enc(name)}`;
  const [model, versions, audit] = await Promise.all([get(base), get(`${base}/versions`), get(`${base}/audit`)]);
  versions.sort((a, b) => b.version - a.version);
  const extra = await Promise.all(versions.map((v) => Promise.all([
    get(`${base}/versions/${v.version}/gates`), get(`${base}/versions/${v.version}/approvals`)])));
  const gates = {}, decisions = {};
  versions.forEach((v, i) => { gates[v.version] = extra[i][0]; decisions[v.version] = extra[i][1]; });
  const reload = () => route();
  const names = metricNames(versions);
  const picked = new Set(versions.slice(0, 2).map((v) => v.version));
  const compare = h("button", { class: "primary", testid: "compare" }, "Compare selected");
  const syncCompare = () => { compare.disabled = picked.size !== 2; };
  compare.addEventListener("click", () => {
    const [a, b] = [...picked].sort((x, y) => x - y);
    go(`#/models/${enc(name)}/compare/${a}/${b}`);
  });
  syncCompare();
  const lineagePanel = h("div", { testid: "lineage" });
  const showLineage = (v) => {
    const params = tagJSON(v, "training.params", null);
    lineagePanel.replaceChildren(h("h3", {}, `Lineage of v${v.version}`), kv([
      ["Dataset snapshot", v.training_dataset_ref || "—"],
      ["Feature groups", (v.feature_store_version || []).join(", ") || "—"],
      ["Framework", `${v.framework} ${v.framework_version}`],
      ["Estimator", (v.tags || {})["training.estimator"] || "—"],
      ["Parameters", params ? JSON.stringify(params) : "—"],
      ["Training job", v.run_id ? h("a", { href: `#/training/${enc(v.run_id)}` }, v.run_id) : "—"],
      ["Epochs", (v.tags || {})["training.epochs_run"] || "—"],
      ["Artifact", v.artifact_path],
    ]));
  };
  if (versions.length) showLineage(versions[0]);
  const versionRows = versions.map((v) => Object.assign({ _key: v.version }, v));
  const versionsTable = table([
    { label: "", cell: (v) => {
      const box = h("input", { type: "checkbox", testid: `pick-${v.version}` });
      box.checked = picked.has(v.version);
      box.addEventListener("change", () => { box.checked ? picked.add(v.version) : picked.delete(v.version); syncCompare(); });
      return box;
    } },
    { label: "Version", cell: (v) => h("a", { href: "javascript:void(0)", onclick: () => showLineage(v) }, `v${v.version}`) },
    { label: "Status", cell: (v) => h("span", { testid: `status-${v.version}` }, badge(v.status)) },
    { label: "Framework", cell: (v) => v.framework },
    ...names.map((n) => ({ label: n, num: true, cell: (v) => fmt((v.metrics || {})[n]) })),
    { label: "Gates", cell: (v) => {
      const g = gates[v.version];
      if (!g.length) return h("span", { class: "muted" }, "not run");
      const passed = g.filter((x) => x.passed).length;
      return badge(`${passed}/${g.length} passed`, passed === g.length ? "ok" : "bad");
    } },
    { label: "Decision", cell: (v) => {
      const d = latestDecision(decisions[v.version]);
      return d ? h("span", { testid: `decision-${v.version}` }, badge(d.decision || "approved"), ` ${d.approver}`) : h("span", { class: "muted" }, "—");
    } },
    { label: "Created", cell: (v) => h("span", { class: "nowrap" }, when(v.created_at).slice(5, 16)) },
    { label: "", cell: (v) => versionActions(model, v, decisions[v.version], reload) },
  ], versionRows, { testid: "versions-table" });
  const gateRows = versions.flatMap((v) => gates[v.version].map((g) => Object.assign({ v: v.version }, g)));
  return h("div", {},
    h("h1", {}, model.name, " ", model.high_stakes ? badge("high stakes", "warn") : ""),
    h("p", { class: "muted" }, model.description || "", ` ${model.framework} · created ${when(model.created_at)} by ${model.created_by}`),
    h("h2", {}, "Versions"),
    versions.length ? versionsTable : h("p", { class: "muted" }, "No versions yet."),
    h("div", { class: "row", style: "margin-top:8px" }, compare, h("span", { class: "muted" }, "Pick two versions to compare metrics and learning curves.")),
    h("div", { class: "card", style: "margin-top:16px" }, lineagePanel),
    h("h2", {}, "Gates"),
    model.gates.length ? table([
      { label: "Metric", cell: (g) => g.metric }, { label: "Dataset", cell: (g) => g.dataset },
      { label: "Threshold", num: true, cell: (g) => fmt(g.threshold) },
      { label: "Max regression", num: true, cell: (g) => fmt(g.max_regression) },
      { label: "Direction", cell: (g) => g.higher_is_better ? "higher is better" : "lower is better" },
    ], model.gates) : h("p", { class: "muted" }, "No gates configured."),
    gateRows.length ? h("div", { style: "margin-top:10px" }, table([
      { label: "Version", cell: (g) => `v${g.v}` }, { label: "Gate", cell: (g) => g.gate },
      { label: "Metric", cell: (g) => `${g.metric} on ${g.dataset}` },
      { label: "Value", num: true, cell: (g) => fmt(g.value) }, { label: "Reference", num: true, cell: (g) => fmt(g.reference) },
      { label: "Result", cell: (g) => badge(g.passed ? "passed" : "failed", g.passed ? "ok" : "bad") },
      { label: "Detail", cell: (g) => g.detail },
    ], gateRows, { testid: "gate-results" })) : "",
    h("h2", {}, "Audit trail"),
    table([
      { label: "When", cell: (a) => h("span", { class: "nowrap" }, when(a.created_at)) }, { label: "Actor", cell: (a) => a.actor },
      { label: "Action", cell: (a) => h("code", {}, a.action) },
      { label: "Version", cell: (a) => a.version ? `v${a.version}` : "—" },
      { label: "Detail", cell: (a) => h("code", { class: "muted" }, JSON.stringify(a.detail).slice(0, 200)) },
    ], audit.slice().reverse().slice(0, 200), { testid: "audit" }));
}

function historyOf(list) {
  return Array.isArray(list) ? list : [];
}

function curveCharts(histories, testid) {
  // histories: [{name, history: [{epoch, metric: value}]}] -> one chart per metric.
  const metrics = new Set();
  histories.forEach((x) => x.history.forEach((e) => Object.keys(e).forEach((k) => k !== "epoch" && metrics.add(k))));
  if (!metrics.size) return h("p", { class: "muted", testid: `${testid}-none` }, "No learning curve recorded (a fit without epochs, e.g. scikit-learn).");
  return h("div", { class: "grid2", testid }, [...metrics].sort().map((m) => h("div", { class: "card" },
    h("h3", {}, m),
    lineChart(histories.map((x) => ({ name: x.name, points: x.history.filter((e) => e[m] !== undefined).map((e) => [e.epoch, e[m]]) })),
      { xLabel: "epoch", yLabel: m, testid: `curve-${m}` }))));
}

async function pageCompare(name, a, b) {
  const base = `/models/${enc(name)}/versions`;
  const [va, vb] = await Promise.all([get(`${base}/${a}`), get(`${base}/${b}`)]);
  const names = metricNames([va, vb]);
  const better = (n, x, y) => {
    if (x === undefined || y === undefined) return "";
    const lower = /loss|rmse|mae|error|mse|diff|latency/.test(n);
    if (x === y) return "=";
    return (y > x) !== lower ? `v${vb.version}` : `v${va.version}`;
  };
  const datasets = new Set([...Object.keys(va.evaluations || {}), ...Object.keys(vb.evaluations || {})]);
  const evalRows = [];
  datasets.forEach((d) => {
    const keys = new Set([...Object.keys((va.evaluations || {})[d] || {}), ...Object.keys((vb.evaluations || {})[d] || {})]);
    keys.forEach((k) => evalRows.push({ d, k, x: ((va.evaluations || {})[d] || {})[k], y: ((vb.evaluations || {})[d] || {})[k] }));
  });
  return h("div", {},
    h("p", {}, h("a", { href: `#/models/${enc(name)}` }, `← ${name}`)),
    h("h1", {}, `${name}: v${va.version} vs v${vb.version}`),
    table([
      { label: "", cell: (r) => r.label },
      { label: `v${va.version}`, cell: (r) => r.a }, { label: `v${vb.version}`, cell: (r) => r.b },
    ], [
      { label: "Status", a: badge(va.status), b: badge(vb.status) },
      { label: "Framework", a: `${va.framework} ${va.framework_version}`, b: `${vb.framework} ${vb.framework_version}` },
      { label: "Estimator", a: (va.tags || {})["training.estimator"] || "—", b: (vb.tags || {})["training.estimator"] || "—" },
      { label: "Created", a: when(va.created_at), b: when(vb.created_at) },
    ]),
    h("h2", {}, "Metrics"),
    table([
      { label: "Metric", cell: (r) => r.n },
      { label: `v${va.version}`, num: true, cell: (r) => fmt(r.x) },
      { label: `v${vb.version}`, num: true, cell: (r) => fmt(r.y) },
      { label: "Δ", num: true, cell: (r) => (r.x === undefined || r.y === undefined) ? "—" : fmt(r.y - r.x) },
      { label: "Better", cell: (r) => better(r.n, r.x, r.y) },
    ], names.map((n) => ({ _key: n, n, x: va.metrics[n], y: vb.metrics[n] })), { testid: "compare-metrics" }),
    evalRows.length ? h("div", {}, h("h2", {}, "Evaluations"), table([
      { label: "Dataset", cell: (r) => r.d }, { label: "Metric", cell: (r) => r.k },
      { label: `v${va.version}`, num: true, cell: (r) => fmt(r.x) }, { label: `v${vb.version}`, num: true, cell: (r) => fmt(r.y) },
    ], evalRows)) : "",
    h("h2", {}, "Learning curves"),
    curveCharts([
      { name: `v${va.version}`, history: historyOf(tagJSON(va, "training.history", [])) },
      { name: `v${vb.version}`, history: historyOf(tagJSON(vb, "training.history", [])) },
    ], "compare-curves"));
}

// -- approvals -------------------------------------------------------------------------------

async function pageApprovals() {
  const [pending, models] = await Promise.all([get("/approvals/pending"), get("/models")]);
  const reload = () => route();
  // Versions waiting for a deployer: STAGING and (for high-stakes models) approved last.
  const staged = await Promise.all(models.map((m) => get(`/models/${enc(m.name)}/versions?status=STAGING`)));
  const candidates = [];
  await Promise.all(models.map(async (m, i) => {
    for (const v of staged[i]) {
      const decisions = m.high_stakes ? await get(`/models/${enc(m.name)}/versions/${v.version}/approvals`) : [];
      const d = latestDecision(decisions);
      if (!m.high_stakes || (d && (d.decision || "approved") === "approved")) {
        candidates.push({ _key: `${m.name}-${v.version}`, model: m, v, d });
      }
    }
  }));
  candidates.sort((x, y) => x.model.name.localeCompare(y.model.name) || y.v.version - x.v.version);
  return h("div", {},
    h("h1", {}, "Approvals and promotion"),
    h("h2", {}, "Waiting for approval"),
    pending.length ? table([
      { label: "Model", cell: (p) => h("a", { href: `#/models/${enc(p.model)}` }, p.model) },
      { label: "Version", cell: (p) => `v${p.version}` },
      { label: "Registered", cell: (p) => `${when(p.created_at)} · ${p.created_by}` },
      { label: "Metrics", cell: (p) => Object.entries(p.metrics || {}).slice(0, 4).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") },
      { label: "Decisions", cell: (p) => (p.decisions || []).map((d) => h("div", {}, badge(d.decision || "approved"), ` ${d.approver}: ${d.comment}`)) },
      { label: "", cell: (p) => can("approver") ? h("div", { class: "actions" },
        h("button", { class: "primary", testid: `approve-${p.model}-${p.version}`, onclick: async () => { if (await decide("approve", p.model, p.version)) reload(); } }, "Approve"),
        h("button", { class: "danger", testid: `reject-${p.model}-${p.version}`, onclick: async () => { if (await decide("reject", p.model, p.version)) reload(); } }, "Reject"))
        : h("span", { class: "muted" }, "an approver decides") },
    ], pending.map((p) => Object.assign({ _key: `${p.model}-${p.version}` }, p)), { testid: "pending" })
      : h("p", { class: "muted", testid: "pending-empty" }, "Nothing waits for approval."),
    h("h2", {}, "Ready to promote"),
    candidates.length ? table([
      { label: "Model", cell: (c) => h("a", { href: `#/models/${enc(c.model.name)}` }, c.model.name) },
      { label: "Version", cell: (c) => `v${c.v.version}` },
      { label: "Approval", cell: (c) => c.d ? `${c.d.approver} ${when(c.d.created_at)}` : "not required" },
      { label: "Production now", cell: (c) => c.model.production_version ? `v${c.model.production_version}` : "—" },
      { label: "", cell: (c) => can("deployer")
        ? h("button", { class: "primary", testid: `promote-${c.model.name}-${c.v.version}`, onclick: async () => { if (await promote(c.model.name, c.v.version)) reload(); } }, "Promote")
        : h("span", { class: "muted" }, "a deployer promotes") },
    ], candidates, { testid: "ready" }) : h("p", { class: "muted", testid: "ready-empty" }, "No STAGING version is ready."));
}

// -- deployments -----------------------------------------------------------------------------

function splitBar(variants) {
  return h("div", { class: "split", testid: "split-bar" }, variants.filter((v) => v.weight_bp > 0).map((v, i) =>
    h("span", { style: `width:${v.weight_bp / 100}%;background:${CHART_COLORS[i % CHART_COLORS.length]}` },
      `${v.name} ${v.weight_bp / 100}%`)));
}

function replicaText(f) {
  const replicas = f.replicas || [];
  if (replicas.length <= 1) return `From ${(replicas[0] || {}).url || f.gateway_url}/metrics`;
  const up = replicas.filter((r) => r.reachable).length;
  return `Summed over ${up} of ${replicas.length} gateway replicas (${f.gateway_url})`;
}

async function pageDeployments() {
  const models = await get("/models");
  const chosen = query().get("model") || (models.find((m) => m.production_version) || models[0] || {}).name;
  const select = h("select", { testid: "deploy-model", onchange: () => go(`#/deployments?model=${enc(select.value)}`) },
    models.map((m) => h("option", { value: m.name, selected: m.name === chosen }, m.name)));
  if (!chosen) return h("div", {}, h("h1", {}, "Deployments"), h("p", { class: "muted" }, "No models yet."));
  const history = await get(`/models/${enc(chosen)}/deployments`);
  history.sort((a, b) => b.deployment_id - a.deployment_id);
  const active = history.find((d) => d.is_active);
  const live = h("div", { testid: "live" }, h("p", { class: "muted" }, "Reading the gateway…"));
  const routed = active ? active.traffic_split.variants : [];
  const drawLive = async () => {
    const f = await get("/serving/variants?window_s=10");
    if (!f.reachable) { live.replaceChildren(h("p", { class: "error" }, `Gateway unreachable: ${f.error}`)); return; }
    const rows = f.variants.filter((v) => v.model === chosen).map((v) => {
      const conf = routed.find((r) => r.name === v.variant);
      return Object.assign({ _key: v.variant, configured: conf ? conf.weight_bp / 100 : null }, v);
    });
    live.replaceChildren(
      h("p", { class: "muted", testid: "live-source" }, `${replicaText(f)}, over the last ${f.window_s ? f.window_s.toFixed(1) + " s" : "— (one scrape so far)"}; refreshes every 2 s.`),
      f.error ? h("p", { class: "error", testid: "live-replica-errors" }, `Not answering: ${f.error}`) : null,
      rows.length ? table([
        { label: "Variant", cell: (v) => v.variant }, { label: "Version", cell: (v) => `v${v.version}` },
        { label: "Configured", num: true, cell: (v) => v.configured === null ? "—" : `${v.configured}%` },
        { label: "Observed", num: true, cell: (v) => h("span", { testid: `observed-${v.variant}` }, v.share === null ? "—" : `${(v.share * 100).toFixed(1)}%`) },
        { label: "Entities/s", num: true, cell: (v) => fmt(v.entities_per_s, 1) },
        { label: "Requests/s", num: true, cell: (v) => fmt(v.requests_per_s, 1) },
        { label: "p50 ms", num: true, cell: (v) => fmt(v.p50_ms, 2) },
        { label: "p99 ms", num: true, cell: (v) => fmt(v.p99_ms, 2) },
        { label: "Errors", num: true, title: "Times the variant failed to answer (backend error, timeout, open breaker); a fallback may have answered for it", cell: (v) => h("span", { testid: `errors-${v.variant}`, class: v.errors > 0 ? "bad" : null }, fmt(v.errors)) },
        { label: "Degraded", num: true, title: "Entities the variant answered degraded (defaults, store down, or as the fallback)", cell: (v) => h("span", { testid: `degraded-${v.variant}` }, fmt(v.degraded)) },
        { label: "Total entities", num: true, cell: (v) => fmt(v.entities_total) },
      ], rows, { testid: "live-table" }) : h("p", { class: "muted" }, "The gateway has served no request for this model yet."),
      h("p", { testid: "live-errors" }, `Model: failed calls ${fmt((f.errors || {})[chosen] || 0)} · degraded entities ${fmt((f.degraded || {})[chosen] || 0)} · shed (all models): ${fmt(f.shed_total)}`));
  };
  const form = h("div", {});
  if (active && can("deployer")) {
    const inputs = routed.map((v) => h("input", { type: "number", min: 0, max: 100, step: 0.01, value: v.weight_bp / 100, testid: `weight-${v.name}`, style: "width:90px" }));
    form.append(h("h3", {}, "Change the split"),
      h("div", { class: "row" }, routed.map((v, i) => h("label", {}, `${v.name} (v${v.version}${v.canary ? ", canary" : ""}) `, inputs[i], " %"))),
      h("div", { class: "row", style: "margin-top:10px" }, h("button", { class: "primary", testid: "apply-split", onclick: async () => {
        const weights = inputs.map((x) => Math.round(parseFloat(x.value) * 100));
        if (weights.some((w) => !isFinite(w) || w < 0)) { banner("Weights must be numbers ≥ 0"); return; }
        const sum = weights.reduce((a, b) => a + b, 0);
        if (sum !== 10000) { banner(`Weights add up to ${sum / 100}%, not 100%`); return; }
        const changes = routed.map((v, i) => ({ v, w: weights[i] })).filter((c) => c.w !== c.v.weight_bp);
        if (!changes.length) { banner("The split is unchanged", "info"); return; }
        const ok = await dialog(`Change the traffic split of ${chosen}`,
          h("ul", { testid: "split-changes" }, changes.map((c) => h("li", {}, `${c.v.name} (v${c.v.version}${c.v.canary ? ", canary" : ""}): ${c.v.weight_bp / 100}% → ${c.w / 100}%`))),
          [], "Apply split");
        if (!ok) return;
        const split = Object.assign({}, active.traffic_split, { variants: routed.map((v, i) => Object.assign({}, v, { weight_bp: weights[i] })) });
        if (await act("Split applied: the gateway follows within seconds", () =>
          api("POST", `/models/${enc(chosen)}/versions/${active.version}/deploy`, { traffic_split: split, serving_endpoint: active.serving_endpoint }))) route();
      } }, "Apply…"),
      history.length > 1 ? h("button", { class: "danger", testid: "rollback", onclick: async () => {
        if (!await dialog(`Roll back ${chosen}`, h("p", {}, "Make the previous deployment active again."), [], "Roll back")) return;
        if (await act("Rolled back", () => api("POST", `/models/${enc(chosen)}/deployments/rollback`))) route();
      } }, "Roll back…") : ""));
  }
  const page = h("div", {},
    h("h1", {}, "Deployments"),
    h("div", { class: "row" }, h("label", {}, "Model ", select)),
    h("h2", {}, "Live traffic split"),
    active ? h("div", { class: "card", testid: "active" },
      h("p", {}, `Deployment #${active.deployment_id}, ${when(active.created_at)} by ${active.created_by}`),
      splitBar(routed),
      table([
        { label: "Variant", cell: (v) => v.name }, { label: "Version", cell: (v) => `v${v.version}` },
        { label: "Role", cell: (v) => v.role }, { label: "Weight", num: true, cell: (v) => h("span", { testid: `configured-${v.name}` }, `${v.weight_bp / 100}%`) },
        { label: "Canary", cell: (v) => v.canary ? badge("canary", "warn") : "" },
      ], active.variants.map((v) => Object.assign({ _key: v.name }, v)), { testid: "variants" }),
      form) : h("p", { class: "muted" }, "No active deployment."),
    h("h2", {}, "Gateway, per variant"),
    live,
    h("h2", {}, "History"),
    table([
      { label: "#", cell: (d) => d.deployment_id }, { label: "When", cell: (d) => `${when(d.created_at)} · ${d.created_by}` },
      { label: "Version", cell: (d) => `v${d.version}` },
      { label: "Split", cell: (d) => d.traffic_split.variants.map((v) => `${v.name} ${v.weight_bp / 100}%`).join(" / ") },
      { label: "", cell: (d) => [d.is_active ? badge("active", "ok") : "", d.rollback_of ? ` rollback of #${d.rollback_of}` : ""] },
    ], history.map((d) => Object.assign({ _key: d.deployment_id }, d)), { testid: "deploy-history" }));
  await drawLive().catch((e) => banner(e.message));
  every(2000, drawLive);
  return page;
}

// -- training --------------------------------------------------------------------------------

const us = (v) => (v ? v / 1000 : null);

async function pageTraining() {
  const [jobs, triggers] = await Promise.all([get("/training-jobs?limit=100"), get("/training-triggers")]);
  const reload = () => route();
  const page = h("div", {},
    h("h1", {}, "Training"),
    h("h2", {}, "Jobs"),
    jobs.jobs.length ? table([
      { label: "Job", cell: (j) => h("a", { href: `#/training/${enc(j.job_id)}`, testid: `job-${j.job_id}` }, j.job_id) },
      { label: "Model", cell: (j) => j.model_name },
      { label: "Framework", cell: (j) => `${j.spec.model.framework}/${j.spec.model.estimator}` },
      { label: "State", cell: (j) => badge(j.state) },
      { label: "Attempts", num: true, cell: (j) => j.attempts },
      { label: "Version", cell: (j) => j.result && j.result.version ? `v${j.result.version}` : "—" },
      { label: "Submitted", cell: (j) => `${when(us(j.submitted_at_us))} · ${j.submitted_by}` },
      { label: "Took", num: true, cell: (j) => j.finished_at_us && j.started_at_us ? ago((j.finished_at_us - j.started_at_us) / 1e6) : "—" },
      { label: "Trigger", cell: (j) => j.trigger || "—" },
    ], jobs.jobs.map((j) => Object.assign({ _key: j.job_id }, j)), { testid: "jobs" }) : h("p", { class: "muted" }, "No jobs yet."),
    h("h2", {}, "Triggers"),
    triggers.triggers.length ? table([
      { label: "Name", cell: (t) => t.name }, { label: "Kind", cell: (t) => t.kind },
      { label: "Model", cell: (t) => t.model || t.spec.model_name },
      { label: "Schedule", cell: (t) => t.schedule || "—" },
      { label: "Last run", cell: (t) => t.last_job_id ? h("span", {}, when(us(t.last_fired_at_us)), " ", h("a", { href: `#/training/${enc(t.last_job_id)}` }, t.last_job_id)) : "never" },
      { label: "", cell: (t) => [t.pending ? badge("run owed", "warn") : "", t.last_error ? h("span", { class: "error" }, t.last_error) : ""] },
      { label: "", cell: (t) => can("publisher") ? h("button", { testid: `fire-${t.name}`, onclick: async () => {
        if (await act(`Fired ${t.name}`, () => api("POST", `/training-triggers/${enc(t.name)}/run`))) reload();
      } }, "Run now") : "" },
    ], triggers.triggers.map((t) => Object.assign({ _key: t.name }, t)), { testid: "triggers" }) : h("p", { class: "muted" }, "No triggers."));
  every(3000, async () => {
    const fresh = await get("/training-jobs?limit=100");
    const changed = fresh.jobs.length !== jobs.jobs.length || fresh.jobs.some((j, i) => j.state !== jobs.jobs[i].state);
    if (changed) route();
  });
  return page;
}

async function pageJob(id) {
  const path = `/training-jobs/${enc(id)}`;
  let job = await get(path);
  const logs = h("pre", { class: "logs", testid: "logs" });
  let after = 0;
  const tail = async () => {
    const out = await get(`${path}/logs?after=${after}`);
    for (const line of out.lines) {
      logs.append(`${when(us(line.ts_us)).slice(11)} ${line.level.padEnd(7)} ${line.message}\n`);
      after = line.seq;
    }
    if (out.lines.length) logs.scrollTop = logs.scrollHeight;
  };
  await tail();
  const live = () => job.state === "QUEUED" || job.state === "RUNNING";
  const summary = h("div", {});
  const drawSummary = () => {
    const r = job.result || {};
    summary.replaceChildren(kv([
      ["State", h("span", { testid: "job-state" }, badge(job.state))],
      ["Model", job.model_name],
      ["Framework", `${job.spec.model.framework}/${job.spec.model.estimator}`],
      ["Attempts", String(job.attempts)],
      ["Worker", job.worker ? `${job.worker}${job.node ? " on " + job.node : ""}` : "—"],
      ["Submitted", `${when(us(job.submitted_at_us))} by ${job.submitted_by}`],
      ["Started / finished", `${when(us(job.started_at_us))} / ${when(us(job.finished_at_us))}`],
      ["Registered", r.version ? h("a", { href: `#/models/${enc(job.model_name)}` }, `${job.model_name} v${r.version}`) : "—"],
      ["Epochs", r.epochs_run !== undefined ? `${r.epochs_run} (best ${r.best_epoch})` : "—"],
      ["Error", job.error ? h("span", { class: "error" }, job.error) : "—"],
    ]));
  };
  drawSummary();
  const r = job.result || {};
  const metrics = r.metrics || {};
  const trials = (r.search && r.search.trials) || [];
  const trialBox = h("div", { testid: "trials" });
  if (trials.length) {
    const params = [...new Set(trials.flatMap((t) => Object.keys(t.params || {})))].sort();
    const pick = h("select", { testid: "trial-param" }, params.map((p) => h("option", { value: p }, p)));
    const space = (job.spec.search && job.spec.search.space) || {};
    const draw = () => {
      const p = pick.value;
      const log = Boolean(space[p] && space[p].log);  // a log-scale range: plot log10(value)
      const done = trials.filter((t) => t.value !== null && typeof (t.params || {})[p] === "number" && (!log || t.params[p] > 0));
      const x = (v) => (log ? Math.log10(v) : v);
      trialBox.querySelector(".plot").replaceChildren(lineChart([{ name: `${r.search.metric} (${r.search.direction})`, points: done.map((t) => [x(t.params[p]), t.value]) }],
        { xLabel: log ? `${p} (log scale)` : p, yLabel: r.search.metric, dotsOnly: true, testid: "trial-scatter",
          xFormat: log ? (v) => String(+Math.pow(10, v).toPrecision(3)) : undefined }));
    };
    pick.addEventListener("change", draw);
    trialBox.append(h("h2", {}, `Search: ${trials.length} trials, best #${r.search.best_trial} = ${fmt(r.search.best_value)}`),
      h("div", { class: "row" }, h("label", {}, "Parameter ", pick)), h("div", { class: "plot" }),
      table([
        { label: "#", cell: (t) => t.number }, { label: "State", cell: (t) => badge(t.state, t.state === "COMPLETE" ? "ok" : "warn") },
        { label: r.search.metric, num: true, cell: (t) => fmt(t.value) },
        { label: "Params", cell: (t) => h("code", {}, JSON.stringify(t.params)) },
      ], trials));
    draw();
  }
  const cancel = live() && can("publisher") ? h("button", { class: "danger", testid: "cancel-job", onclick: async () => {
    if (!await dialog(`Cancel ${id}`, h("p", {}, "A running job stops at its next heartbeat."), [], "Cancel job")) return;
    if (await act("Cancel requested", () => api("POST", `${path}/cancel`))) route();
  } }, "Cancel job") : "";
  if (live()) {
    every(1000, tail);
    every(2000, async () => {
      job = await get(path);
      drawSummary();
      if (!live()) route(); // finished: redraw with its curves
    });
  }
  return h("div", {},
    h("p", {}, h("a", { href: "#/training" }, "← Training")),
    h("h1", {}, `Job ${id}`),
    h("div", { class: "row" }, cancel),
    h("div", { class: "card" }, summary),
    Object.keys(metrics).length ? h("div", {}, h("h2", {}, "Metrics"), table([
      { label: "Metric", cell: (m) => m.k }, { label: "Value", num: true, cell: (m) => fmt(m.v) },
    ], Object.entries(metrics).map(([k, v]) => ({ _key: k, k, v })), { testid: "job-metrics" })) : "",
    h("h2", {}, "Learning curves"),
    curveCharts([{ name: job.job_id, history: historyOf(r.history) }], "job-curves"),
    trialBox,
    h("h2", {}, "Log"),
    logs);
}

// -- features --------------------------------------------------------------------------------

async function pageFeatures() {
  const [groups, fresh] = await Promise.all([get("/features/groups"), get("/features/freshness")]);
  const freshness = Array.isArray(fresh) ? fresh : (fresh.groups || []);
  const groupSel = h("select", { testid: "lookup-group" }, groups.map((g) => h("option", { value: g.name }, g.name)));
  const entity = h("input", { testid: "lookup-entity", placeholder: "entity id" });
  const out = h("div", { testid: "lookup-result" });
  const lookup = async (ev) => {
    ev.preventDefault();
    const id = entity.value.trim();
    if (!id) { out.replaceChildren(h("p", { class: "error" }, "Type an entity id.")); return; }
    try {
      const r = await api("POST", `/features/groups/${enc(groupSel.value)}/get-online`, { entity_ids: [id] });
      const e = r.results[0];
      out.replaceChildren(e.found ? table([
        { label: "Feature", cell: (x) => x.f }, { label: "Value", num: true, cell: (x) => h("span", { testid: `value-${x.f}` }, fmt(x.v)) },
      ], r.features.map((f, i) => ({ _key: f, f, v: e.values[i] })))
        : h("p", { class: "muted", testid: "lookup-missing" }, `No online values for ${id} in ${r.group} v${r.version} (unknown or expired).`));
    } catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
  };
  return h("div", {},
    h("h1", {}, "Features"),
    h("h2", {}, "Catalog"),
    table([
      { label: "Group", cell: (g) => g.name }, { label: "Version", num: true, cell: (g) => `v${g.version}` },
      { label: "Entity", cell: (g) => g.entity },
      { label: "Features", cell: (g) => (g.feature_specs || []).length
        ? g.feature_specs.map((f) => `${f.name}: ${f.dtype}`).join(", ") : (g.features || []).join(", ") },
      { label: "TTL", num: true, cell: (g) => g.ttl_days ? `${g.ttl_days} d` : "none" },
      { label: "Owner", cell: (g) => g.owner_team || "—" },
      { label: "Stores", cell: (g) => [g.online ? "online" : "", g.offline ? "offline" : ""].filter(Boolean).join(" + ") },
      { label: "Description", cell: (g) => g.description || "" },
    ], groups.map((g) => Object.assign({ _key: g.name }, g)), { testid: "catalog" }),
    h("h2", {}, "Online store freshness"),
    table([
      { label: "Group", cell: (f) => `${f.group} v${f.version}` },
      { label: "Last write", cell: (f) => when(f.last_write_at) },
      { label: "Newest event", cell: (f) => when(f.newest_event_ts) },
      { label: "Age", num: true, cell: (f) => ago(f.age_s) },
      { label: "Rows (last write)", num: true, cell: (f) => fmt(f.rows_last_write) },
      { label: "", cell: (f) => !f.online ? badge("offline only", "ARCHIVED") : f.stale ? badge("stale", "bad") : badge("fresh", "ok") },
    ], freshness.map((f) => Object.assign({ _key: f.group }, f)), { testid: "freshness" }),
    h("h2", {}, "Lookup"),
    h("form", { class: "row", onsubmit: lookup }, groupSel, entity, h("button", { class: "primary", type: "submit", testid: "lookup" }, "Look up")),
    h("div", { style: "margin-top:10px" }, out));
}

// -- monitoring ------------------------------------------------------------------------------

function alertKey(a) { return a.alert_key || a.key || `${a.model}:v${a.version}:${a.kind}:${a.subject}`; }

async function pageMonitoring() {
  const models = (await get("/monitoring/models")).models;
  const q = query();
  const chosen = q.get("model") || (models[0] || {}).model;
  if (!chosen) return h("div", {}, h("h1", {}, "Monitoring"), h("p", { class: "muted" }, "No model is monitored yet."));
  const entry = models.find((m) => m.model === chosen) || { versions: [] };
  const version = q.get("version") || (entry.versions.length ? String(Math.max(...entry.versions)) : "");
  const vq = version ? `?version=${enc(version)}` : "";
  const base = `/monitoring/models/${enc(chosen)}`;
  const [alerts, drift, dists, perf] = await Promise.all([
    get(`/monitoring/alerts?model=${enc(chosen)}`), get(`${base}/drift${vq}`),
    get(`${base}/distributions${vq}`).catch(() => null), get(`${base}/performance${vq}`)]);
  const stat = q.get("stat") || "psi";
  const nav = (m, v, s) => go(`#/monitoring?model=${enc(m)}${v ? "&version=" + enc(v) : ""}&stat=${s}`);
  const modelSel = h("select", { testid: "mon-model", onchange: () => nav(modelSel.value, "", stat) },
    models.map((m) => h("option", { value: m.model, selected: m.model === chosen }, `${m.model}${m.active_alerts ? ` (${m.active_alerts} alerts)` : ""}`)));
  const versionSel = h("select", { testid: "mon-version", onchange: () => nav(chosen, versionSel.value, stat) },
    entry.versions.slice().sort((a, b) => b - a).map((v) => h("option", { value: v, selected: String(v) === String(drift.version) }, `v${v}`)));
  const statSel = h("select", { testid: "mon-stat", onchange: () => nav(chosen, version, statSel.value) },
    [["psi", "PSI"], ["ks", "KS D"], ["js", "JS distance"]].map(([k, l]) => h("option", { value: k, selected: k === stat }, l)));
  const windows = drift.windows || [];
  const spanMs = windows.length ? windows[windows.length - 1].window_start - windows[0].window_start : 0;
  const timeOf = (x) => (spanMs < 86400000 ? when(x).slice(11, 19) : when(x).slice(5, 16));
  const features = [...new Set(windows.flatMap((w) => Object.keys(w.features || {})))].sort();
  const th = drift.thresholds || {};
  const hlines = stat === "psi" ? [{ y: th.psi_warn, label: "warn", color: "#b7791f" }, { y: th.psi_alert, label: "alert", color: "#c62828" }] : [];
  const driftChart = windows.length ? lineChart(features.map((f) => ({ name: f,
    points: windows.map((w) => [w.window_start, ((w.features || {})[f] || {})[stat] ?? null]) })),
  { xLabel: "window start (UTC)", yLabel: stat.toUpperCase(), hlines, dots: true, width: 880, height: 280,
    xFormat: timeOf, testid: "drift-chart" }) : h("p", { class: "muted" }, "No judged window yet.");
  const latest = windows.length ? windows[windows.length - 1] : null;
  const reload = () => route();
  return h("div", {},
    h("h1", {}, "Monitoring"),
    h("div", { class: "row" }, h("label", {}, "Model ", modelSel), h("label", {}, "Version ", versionSel), h("label", {}, "Statistic ", statSel),
      h("a", { href: `${base}/report${vq}`, target: "_blank" }, "HTML report")),
    h("h2", {}, "Active alerts"),
    alerts.alerts.length ? table([
      { label: "Kind", cell: (a) => a.kind }, { label: "Subject", cell: (a) => h("b", {}, a.subject) },
      { label: "Version", cell: (a) => `v${a.version}` },
      { label: "Value", num: true, cell: (a) => `${a.statistic} ${fmt(a.latest_value ?? a.value)} (≥ ${fmt(a.threshold)})` },
      { label: "Since", cell: (a) => when(a.started_ms) },
      { label: "Message", cell: (a) => a.latest_message || a.message },
      { label: "", cell: (a) => a.acknowledged_by
        ? h("span", { testid: `acked-${a.subject}` }, badge("acknowledged", "ok"), ` ${a.acknowledged_by}${a.ack_comment ? ": " + a.ack_comment : ""}`)
        : can("deployer") ? h("button", { testid: `ack-${a.subject}`, onclick: async () => {
          const v = await dialog(`Acknowledge ${a.kind} on ${a.subject}`, h("p", {}, a.latest_message || a.message), [{ name: "comment", label: "Comment" }], "Acknowledge");
          if (!v) return;
          if (await act("Acknowledged", () => api("POST", "/monitoring/alerts/acknowledge", { key: alertKey(a), comment: v.comment }))) reload();
        } }, "Acknowledge") : badge("firing") },
    ], alerts.alerts.map((a) => Object.assign({ _key: alertKey(a) }, a)), { testid: "alerts" }) : h("p", { class: "muted", testid: "no-alerts" }, "No active alert."),
    h("h2", {}, `Drift over time (${stat.toUpperCase()} per feature)`),
    driftChart,
    latest ? h("div", {}, h("h3", {}, `Newest window ${when(latest.window_start)} (${fmt(latest.n)} predictions)`), table([
      { label: "Feature", cell: (r) => r.f }, { label: "PSI", num: true, cell: (r) => fmt(r.x.psi) },
      { label: "KS D", num: true, cell: (r) => fmt(r.x.ks) }, { label: "JS", num: true, cell: (r) => fmt(r.x.js) },
      { label: "Status", cell: (r) => h("span", { testid: `drift-status-${r.f}` }, badge(r.x.status || "ok", r.x.status || "ok")) },
    ], Object.entries(latest.features || {}).map(([f, x]) => ({ _key: f, f, x })), { testid: "drift-latest" })) : "",
    h("h2", {}, "Reference vs current"),
    dists && dists.features && dists.features.length ? h("div", { class: "grid2", testid: "distributions" }, dists.features.map((f) =>
      h("div", { class: "card" }, h("h3", {}, f.feature), barChart(f.bins.map((b, i) => ({ label: b, values: [f.reference[i], f.current[i]] })), ["reference", "current"], { testid: `dist-${f.feature}` }))))
      : h("p", { class: "muted" }, "No distributions yet."),
    h("h2", {}, "Performance (delayed labels) vs baseline"),
    (perf.metrics || []).length ? h("div", { class: "grid2", testid: "performance" }, perf.metrics.map((m) => h("div", { class: "card" },
      h("h3", {}, m.metric),
      lineChart([{ name: m.metric, points: m.windows.map((w) => [w.window_start, w.value]) }],
        { hlines: [{ y: m.baseline, label: "baseline", color: "#6b7280" }, { y: m.threshold, label: "alert", color: "#c62828" }], dots: true, xFormat: (x) => when(x).slice(5, 19), testid: `perf-${m.metric}` }))))
      : h("p", { class: "muted" }, "No labelled window yet."));
}
