// fedcompute dashboard: tasks table, metric and operations charts as inline SVG.
// No dependencies and no network beyond this server's /api. Every drawn point carries
// data-* attributes with the value it shows, so tests can compare the page to the store.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const ACTIVE = new Set(["CREATED", "OPEN"]);
const FAST_REFRESH_MS = 3000;
const SLOW_REFRESH_MS = 15000;
const W = 360, H = 220, M = { left: 52, right: 12, top: 24, bottom: 36 };

const params = new URLSearchParams(window.location.search);
let selected = params.get("population") && params.get("task")
  ? { population: params.get("population"), task_id: Number(params.get("task")) } : null;
let refreshes = 0;

// The deployed dashboard's /api needs the operator API key (x-api-key). Open the page as
// .../#key=<FEDCOMPUTE_API_KEY> or type the key into the form: it is kept in this tab's
// sessionStorage only, and the fragment never reaches a server or its logs.
const KEY_STORAGE = "fedcompute.apiKey";

function takeKeyFromFragment() {
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  if (fragment.get("key")) {
    sessionStorage.setItem(KEY_STORAGE, fragment.get("key"));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

class NeedsKey extends Error {}

async function getJson(url) {
  const key = apiKey();
  const response = await fetch(url, { cache: "no-store", headers: key ? { "x-api-key": key } : {} });
  const body = await response.json();
  if (response.status === 401) {
    throw new NeedsKey(key ? "the API key was refused: enter the current FEDCOMPUTE_API_KEY"
                           : "this dashboard needs the API key (FEDCOMPUTE_API_KEY): enter it below");
  }
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function setUpKeyForm() {
  const form = document.getElementById("key-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, document.getElementById("key-input").value);
    form.hidden = true;
    refresh();
  });
}

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

// The aggregator stores -1 when epsilon is infinite (no DP noise).
function fmtEpsilon(e) {
  return e < 0 ? "∞ (no DP)" : fmt(e);
}

function fmtTime(seconds) {
  return new Date(seconds * 1000).toISOString().substring(11, 19);
}

function ticks(lo, hi, n) {
  if (hi === lo) return [lo];
  const step = (hi - lo) / n;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

// A chart frame with axes; returns {svg, sx, sy} where sx/sy map data to pixels.
function frame(title, xs, ys, opts) {
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  if (opts.yFromData) y0 = Math.min(...ys);
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.08; y1 += pad; if (opts.yFromData) y0 -= pad;
  const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
  const sy = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const svg = el("svg:svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.appendChild(el("svg:text", { x: M.left, y: 15, class: "title" }, title));
  for (const t of ticks(y0, y1, 4)) {
    svg.appendChild(el("svg:line", { x1: M.left, x2: W - M.right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.appendChild(el("svg:text", { x: M.left - 4, y: sy(t) + 3, "text-anchor": "end", class: "tick" }, fmt(t)));
  }
  const xt = opts.xTicks || ticks(x0, x1, 4);
  for (const t of xt) {
    svg.appendChild(el("svg:text", { x: sx(t), y: H - M.bottom + 14, "text-anchor": "middle", class: "tick" },
      opts.time ? fmtTime(t) : fmt(t)));
  }
  svg.appendChild(el("svg:line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom, class: "axis" }));
  svg.appendChild(el("svg:line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }));
  svg.appendChild(el("svg:text", { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle", class: "tick" },
    opts.xLabel || ""));
  return { svg, sx, sy };
}

function chartBox(container, svg, attrs) {
  const box = el("div", { class: "chart", ...attrs });
  box.appendChild(svg);
  container.appendChild(box);
  return box;
}

function integerTicks(xs) {
  const lo = Math.min(...xs), hi = Math.max(...xs);
  const step = Math.max(1, Math.ceil((hi - lo) / 6));
  const out = [];
  for (let x = lo; x <= hi; x += step) out.push(x);
  return out;
}

// One line chart of a metric: x = round, y = value; one <circle class="pt"> per round.
function metricChart(container, name, rounds, values) {
  const pts = rounds.map((r, i) => [r, values[i]]).filter(([, v]) => v !== null && v !== undefined);
  const box = { "data-metric": name, "data-points": String(pts.length) };
  if (!pts.length) {
    chartBox(container, el("svg:svg", { width: W, height: 40 }), box).appendChild(el("div", { class: "muted" }, `${name}: no values`));
    return;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const { svg, sx, sy } = frame(name.replace(/^server\//, ""), xs, ys,
    { xLabel: "round", yFromData: true, xTicks: integerTicks(xs) });
  svg.appendChild(el("svg:polyline", { class: "line", points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }));
  for (const [x, y] of pts) {
    const c = el("svg:circle", { class: "pt", cx: sx(x), cy: sy(y), r: 3.5, "data-metric": name,
      "data-round": String(x), "data-value": String(y) });
    c.appendChild(el("svg:title", {}, `round ${x}: ${y}`));
    svg.appendChild(c);
  }
  chartBox(container, svg, box);
}

function renderMetrics(run) {
  const model = document.getElementById("model-charts");
  const evaluation = document.getElementById("eval-charts");
  model.replaceChildren(); evaluation.replaceChildren();
  const names = Object.keys(run.series);
  const evalNames = names.filter((n) => n.startsWith("server/client_work/eval/"));
  // Training metrics first, then the finalizer, privacy and aggregator counters.
  const order = (n) => ["server/client_work/", "server/finalizer/", "server/privacy/"].findIndex((p) => n.startsWith(p));
  const rank = (n) => (order(n) < 0 ? 9 : order(n));
  const modelNames = names.filter((n) => !evalNames.includes(n)).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  for (const n of modelNames) metricChart(model, n, run.rounds, run.series[n]);
  for (const n of evalNames) metricChart(evaluation, n, run.rounds, run.series[n]);
  if (!modelNames.length) model.appendChild(el("p", { class: "muted" }, "no completed round yet"));
  if (!evalNames.length) evaluation.appendChild(el("p", { class: "muted" }, "no evaluation metrics for this task"));
  document.getElementById("selected-config").textContent =
    `${run.label} · ${run.rounds.length} rounds with metrics · ` +
    Object.entries(run.config).map(([k, v]) => `${k}=${v}`).join(", ");
}

function barChart(container, title, items, opts) {
  const attrs = { "data-chart": opts.id, "data-points": String(items.length) };
  if (!items.length) {
    const box = chartBox(container, el("svg:svg", { width: W, height: 24 }), attrs);
    box.insertBefore(el("div", { class: "muted" }, `${title}: no data yet`), box.firstChild);
    return;
  }
  const xs = items.map((d) => d.x);
  const tops = items.map((d) => d.parts.reduce((a, b) => a + (b || 0), 0));
  const spanX = [Math.min(...xs) - opts.width / 2, Math.max(...xs) + opts.width / 2];
  const { svg, sx, sy } = frame(title, spanX, tops, { xLabel: opts.xLabel, time: opts.time,
    xTicks: opts.time ? undefined : integerTicks(xs) });
  for (const d of items) {
    let base = 0;
    d.parts.forEach((v, k) => {
      const value = v || 0;
      const rect = el("svg:rect", { class: k ? "bar2" : "bar", x: sx(d.x - opts.width / 2) + 1,
        width: Math.max(1, sx(d.x + opts.width / 2) - sx(d.x - opts.width / 2) - 2),
        y: sy(base + value), height: Math.max(0, sy(base) - sy(base + value)), ...d.attrs });
      rect.appendChild(el("svg:title", {}, d.tip));
      svg.appendChild(rect);
      base += value;
    });
  }
  chartBox(container, svg, attrs);
}

function renderOps(ops) {
  const box = document.getElementById("ops-charts");
  box.replaceChildren();
  barChart(box, "Assignments per minute", ops.assignments_per_minute.map((d) => ({
    x: d.minute + 30, parts: [d.count], tip: `${fmtTime(d.minute)}: ${d.count}`,
    attrs: { "data-minute": String(d.minute), "data-count": String(d.count) } })),
    { id: "assignments_per_minute", width: 54, xLabel: "time (UTC)", time: true });
  const timed = ops.rounds.filter((r) => r.collecting_s !== null);
  barChart(box, "Iteration processing time (s)", timed.map((r) => ({
    x: r.round_number, parts: [r.collecting_s, r.aggregating_s],
    tip: `round ${r.round_number}: collecting ${fmt(r.collecting_s)} s, aggregating ${fmt(r.aggregating_s)} s`,
    attrs: { "data-round": String(r.round_number), "data-collecting": String(r.collecting_s),
      "data-aggregating": String(r.aggregating_s) } })),
    { id: "iteration_processing_time", width: 0.7, xLabel: "round (blue: collecting, orange: aggregating)" });
  const over = ops.iterations_over_time;
  const attrs = { "data-chart": "iterations_over_time", "data-points": String(over.length) };
  if (!over.length) {
    const empty = chartBox(box, el("svg:svg", { width: W, height: 24 }), attrs);
    empty.insertBefore(el("div", { class: "muted" }, "Iterations over time: no completed round yet"), empty.firstChild);
  } else {
    const start = ops.task.started_time || over[0].time;
    const xs = [start, ...over.map((d) => d.time)], ys = [0, ...over.map((d) => d.completed)];
    const { svg, sx, sy } = frame("Iterations over time", xs, ys, { xLabel: "time (UTC)", time: true });
    let path = `M${sx(xs[0])},${sy(0)}`;
    for (let i = 1; i < xs.length; i++) path += ` H${sx(xs[i])} V${sy(ys[i])}`;
    svg.appendChild(el("svg:path", { class: "line", d: path }));
    for (const d of over) {
      const c = el("svg:circle", { class: "pt", cx: sx(d.time), cy: sy(d.completed), r: 3,
        "data-time": String(d.time), "data-completed": String(d.completed) });
      c.appendChild(el("svg:title", {}, `${fmtTime(d.time)}: ${d.completed} rounds`));
      svg.appendChild(c);
    }
    chartBox(box, svg, attrs);
  }
  renderCounts(ops.rounds);
}

const COUNT_COLUMNS = ["assigned", "in_progress", "completed", "failed", "not_eligible", "timed_out", "rejected_uploads"];

function renderCounts(rounds) {
  const table = document.getElementById("round-counts");
  const head = el("tr");
  for (const h of ["round", "status", ...COUNT_COLUMNS, "collecting s", "aggregating s"]) head.appendChild(el("th", {}, h));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const r of rounds) {
    const attrs = { "data-round": String(r.round_number), "data-status": r.status };
    for (const c of COUNT_COLUMNS) attrs[`data-${c.replace(/_/g, "-")}`] = String(r[c]);
    const tr = el("tr", attrs);
    tr.appendChild(el("td", { class: "num" }, String(r.round_number)));
    tr.appendChild(el("td", { class: `status status-${r.status}` }, r.status));
    for (const c of COUNT_COLUMNS) tr.appendChild(el("td", { class: "num" }, String(r[c])));
    tr.appendChild(el("td", { class: "num" }, fmt(r.collecting_s)));
    tr.appendChild(el("td", { class: "num" }, fmt(r.aggregating_s)));
    body.appendChild(tr);
  }
}

// The privacy ledger: epsilon after each round and spent in it (null: infinite, no noise).
function renderLedger(ledger, delta) {
  const table = document.getElementById("privacy-ledger");
  const note = document.getElementById("ledger-note");
  table.tBodies[0].replaceChildren();
  if (!ledger || !ledger.length) {
    note.textContent = "no DP for this task: no privacy ledger";
    return;
  }
  note.textContent = `client-level epsilon at delta ${fmt(delta)}, accounted after every round`;
  for (const row of ledger) {
    const tr = el("tr", { "data-round": String(row.round), "data-epsilon": String(row.epsilon),
      "data-spent": String(row.spent) });
    tr.appendChild(el("td", { class: "num" }, String(row.round)));
    tr.appendChild(el("td", { class: "num" }, row.epsilon === null ? "∞" : fmt(row.epsilon)));
    tr.appendChild(el("td", { class: "num" }, row.spent === null ? "∞" : fmt(row.spent)));
    table.tBodies[0].appendChild(tr);
  }
}

function renderTasks(tasks) {
  const body = document.querySelector("#tasks tbody");
  body.replaceChildren();
  if (!tasks.length) body.appendChild(el("tr", {}, "")).appendChild(el("td", { colspan: 10, class: "muted" }, "no tasks yet"));
  for (const t of tasks) {
    const isSel = selected && selected.population === t.population && selected.task_id === t.task_id;
    const tr = el("tr", { "data-run": t.run, "data-population": t.population, "data-task": String(t.task_id),
      "data-status": t.status, "data-current-round": String(t.current_round), "data-epsilon": String(t.epsilon_spent),
      class: isSel ? "selected" : "" });
    const cells = [t.population, String(t.task_id), t.kind, t.status, `${t.current_round}/${t.total_rounds}`,
      fmtEpsilon(t.epsilon_spent), String(t.totals.assigned), String(t.totals.completed),
      String(t.totals.failed + t.totals.not_eligible + t.totals.timed_out), t.status_reason];
    cells.forEach((text, i) => tr.appendChild(el("td", { class: i === 3 ? `status status-${t.status}` : (i >= 4 && i <= 8 ? "num" : "") }, text)));
    tr.addEventListener("click", () => {
      selected = { population: t.population, task_id: t.task_id };
      history.replaceState(null, "", `?population=${encodeURIComponent(t.population)}&task=${t.task_id}`);
      refresh();
    });
    body.appendChild(tr);
  }
}

function pickDefault(tasks) {
  if (selected && tasks.some((t) => t.population === selected.population && t.task_id === selected.task_id)) return selected;
  const active = tasks.filter((t) => ACTIVE.has(t.status));
  const pool = active.length ? active : tasks;
  if (!pool.length) return null;
  const latest = pool.reduce((a, b) => (b.created_time > a.created_time ? b : a));
  return { population: latest.population, task_id: latest.task_id };
}

let timer = null;
async function refresh() {
  clearTimeout(timer);
  let delay = SLOW_REFRESH_MS;
  const errorBox = document.getElementById("error");
  try {
    const { tasks } = await getJson("/api/tasks");
    selected = pickDefault(tasks);
    renderTasks(tasks);
    const section = document.getElementById("selected");
    if (selected) {
      const q = `population=${encodeURIComponent(selected.population)}&task=${selected.task_id}`;
      const [run, ops] = await Promise.all([getJson(`/api/metrics?${q}`), getJson(`/api/ops?${q}`)]);
      section.hidden = false;
      document.getElementById("selected-title").textContent =
        `${ops.task.run} — ${ops.task.status}, round ${ops.task.current_round}/${ops.task.total_rounds}, ε spent ${fmtEpsilon(ops.task.epsilon_spent)}`;
      renderMetrics(run);
      renderLedger(run.ledger, run.config.delta);
      renderOps(ops);
      section.dataset.run = ops.task.run;
      section.dataset.rounds = String(run.rounds.length);
      if (ACTIVE.has(ops.task.status)) delay = FAST_REFRESH_MS;
    } else {
      section.hidden = true;
    }
    errorBox.hidden = true;
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    document.body.dataset.state = "ready";
    document.getElementById("refresh").textContent =
      `updated ${new Date().toISOString().substring(11, 19)} UTC · next in ${delay / 1000} s`;
  } catch (err) {
    errorBox.textContent = `could not load: ${err.message}`;
    errorBox.hidden = false;
    if (err instanceof NeedsKey) {
      document.getElementById("key-form").hidden = false;
      document.body.dataset.state = "needs-key";
      return;  // no polling until a key is entered
    }
    document.body.dataset.state = "error";
    delay = FAST_REFRESH_MS;
  }
  timer = setTimeout(refresh, delay);
}

takeKeyFromFragment();
setUpKeyForm();
refresh();
