// Gatehouse's dashboard: charts and tables of a tenant's activity, read from the JSON API on
// this port (/api/...) with the API key the person typed (kept in this tab's sessionStorage).
// Data is only ever written into the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const DAY = 86400000;
const COLORS = ["#2f6fde", "#1b7f3b", "#b3261e", "#c77700", "#7a3fc4", "#0f8a8a", "#8a5a2b", "#5f6b7a"];

// What the page shows, kept for tests and for people poking at it in devtools.
const dashboard = { charts: {}, loads: 0, signIns: [], risky: [], summary: null };
window.dashboard = dashboard;

function session() {
  return { key: sessionStorage.getItem("gatehouse.key"), tenant: sessionStorage.getItem("gatehouse.tenant") || "" };
}

async function api(path, params) {
  const { key, tenant } = session();
  const query = new URLSearchParams({ tenant_id: tenant, ...params });
  const response = await fetch(`${path}?${query}`, { headers: { Authorization: `Bearer ${key}` } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function period() {
  const days = Number($("period").value);
  const to = new Date(Math.ceil(Date.now() / 3600000) * 3600000);
  const from = new Date(to.getTime() - days * DAY);
  return { from: from.toISOString(), to: to.toISOString(), days };
}

function chart(id, type, labels, datasets, options = {}) {
  const old = dashboard.charts[id];
  if (old) old.destroy();
  dashboard.charts[id] = new Chart($(id), {
    type,
    data: { labels, datasets },
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      plugins: { legend: { display: datasets.length > 1 || type === "doughnut" } },
      ...options,
    },
  });
}

function bar(id, counts, label) {
  const top = counts.slice(0, 12);
  chart(id, "bar", top.map((c) => c.dimension || "(unknown)"), [
    { label, data: top.map((c) => Number(c.count)), backgroundColor: COLORS[0] },
  ], { indexAxis: "y" });
}

function tile(label, value) {
  const div = document.createElement("div");
  div.className = "tile";
  const b = document.createElement("b");
  b.textContent = Number(value).toLocaleString();
  const span = document.createElement("span");
  span.textContent = label;
  div.append(b, span);
  return div;
}

// Buckets of the period, so that days without activity show as zero.
function buckets(from, to, step) {
  const out = [];
  for (let t = Date.parse(from); t < Date.parse(to); t += step) out.push(new Date(t).toISOString().slice(0, 19) + "Z");
  return out;
}

function series(points, metric, labels) {
  const values = new Map(labels.map((l) => [l, 0]));
  for (const p of points) if (p.metric === metric && values.has(p.bucket)) values.set(p.bucket, values.get(p.bucket) + Number(p.value));
  return labels.map((l) => values.get(l));
}

async function loadCharts() {
  const { from, to, days } = period();
  const app = $("app").value;
  const granularity = days <= 1 ? "hour" : "day";
  const common = { from, to, application_id: app };
  const [summary, activity, active, apps] = await Promise.all([
    api("/api/insights/summary", common),
    api("/api/insights/activity", { ...common, granularity, metrics: "attempts,successes,failures" }),
    api("/api/insights/activity", { ...common, granularity: "day", metrics: "active_users" }),
    api("/api/insights/activity", { from, to, granularity: "month", metrics: "successes", group_by: "application" }),
  ]);
  dashboard.summary = summary;

  const tiles = $("tiles");
  tiles.replaceChildren(
    tile("Sign-in attempts", summary.attempts),
    tile("Successful sign-ins", summary.successes),
    tile("Failures", summary.failures),
    tile("Blocked by policy", summary.blocks),
    tile("Active users", summary.active_users),
    tile("New sign-ups", summary.signups),
    tile("MFA completions", summary.mfa_completions),
    tile("Risk detections", summary.risk_detections),
  );

  const step = granularity === "hour" ? 3600000 : DAY;
  const start = granularity === "hour" ? from : new Date(Math.floor(Date.parse(from) / DAY) * DAY).toISOString();
  const labels = buckets(start, to, step);
  const short = labels.map((l) => (granularity === "hour" ? l.slice(11, 16) : l.slice(5, 10)));
  chart("chart-signins", "line", short, [
    { label: "Attempts", data: series(activity.points, "attempts", labels), borderColor: COLORS[0], tension: 0.2 },
    { label: "Successes", data: series(activity.points, "successes", labels), borderColor: COLORS[1], tension: 0.2 },
    { label: "Failures", data: series(activity.points, "failures", labels), borderColor: COLORS[2], tension: 0.2 },
  ]);
  const dayLabels = buckets(new Date(Math.floor(Date.parse(from) / DAY) * DAY).toISOString(), to, DAY);
  chart("chart-active", "line", dayLabels.map((l) => l.slice(5, 10)), [
    { label: "Active users", data: series(active.points, "active_users", dayLabels), borderColor: COLORS[4], tension: 0.2 },
  ]);
  chart("chart-mfa", "doughnut",
    summary.mfa_completions_by_method.map((c) => c.dimension),
    [{ data: summary.mfa_completions_by_method.map((c) => Number(c.count)), backgroundColor: COLORS }]);
  bar("chart-countries", summary.signins_by_country, "Sign-ins");
  bar("chart-risk", summary.risk_detections_by_kind, "Detections");

  const byApp = new Map();
  for (const p of apps.points) byApp.set(p.application_id, (byApp.get(p.application_id) || 0) + Number(p.value));
  const appCounts = [...byApp].map(([dimension, count]) => ({ dimension, count })).sort((a, b) => b.count - a.count);
  // App ids are UUIDv7: their ends tell them apart.
  bar("chart-apps", appCounts.map((c) => ({ ...c, dimension: `…${c.dimension.slice(-8)}` })), "Sign-ins");
  const select = $("app");
  const chosen = select.value;
  select.replaceChildren(new Option("All applications", ""));
  for (const { dimension } of appCounts) select.append(new Option(dimension, dimension));
  if (chosen && !byApp.has(chosen)) select.append(new Option(chosen, chosen));
  select.value = chosen;
}

let nextPage = "";

async function loadSignIns(append = false) {
  const { from, to } = period();
  const page = await api("/api/insights/signins", {
    from, to, application_id: $("app").value, outcome: $("outcome").value,
    country: $("country").value.trim().toUpperCase(), page_size: "50", page_token: append ? nextPage : "",
  });
  nextPage = page.next_page_token;
  $("more").hidden = !nextPage;
  dashboard.signIns = append ? dashboard.signIns.concat(page.sign_ins) : page.sign_ins;
  const rows = page.sign_ins.map((s) => {
    const tr = document.createElement("tr");
    const cells = [s.started_at.replace("T", " ").replace("Z", ""), s.user_id.slice(-8), s.application_id.slice(-8), s.ip, s.country,
      [s.browser, s.os].filter(Boolean).join(" / "), s.primary_method, s.mfa_method, s.risk_level, s.outcome, s.reason];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 9) td.className = s.outcome;
      tr.append(td);
    });
    tr.dataset.id = s.id;
    return tr;
  });
  const body = $("signins").tBodies[0];
  if (append) body.append(...rows); else body.replaceChildren(...rows);
}

async function loadRisky() {
  const risky = await api("/api/risk/users", { page_size: "50" });
  dashboard.risky = risky.users;
  $("risky").tBodies[0].replaceChildren(...risky.users.map((u) => {
    const tr = document.createElement("tr");
    for (const text of [u.user_id, u.level, u.state, u.updated_at]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
}

async function load() {
  $("error").textContent = "";
  try {
    await Promise.all([loadCharts(), loadSignIns(), loadRisky()]);
    dashboard.loads += 1;
    document.body.dataset.loads = String(dashboard.loads);
  } catch (error) {
    if (error.status === 401) return signOut("That key is not valid.");
    $("error").textContent = `Could not load: ${error.message}`;
  }
}

function signOut(message = "") {
  sessionStorage.removeItem("gatehouse.key");
  sessionStorage.removeItem("gatehouse.tenant");
  $("dashboard").hidden = true;
  $("sign-in").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("sign-in-error").textContent = message;
}

function open() {
  $("sign-in").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = session().tenant ? `Tenant ${session().tenant}` : "Your tenant";
  return load();
}

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("gatehouse.key", $("key").value.trim());
  sessionStorage.setItem("gatehouse.tenant", $("tenant").value.trim());
  $("key").value = "";
  open();
});
$("sign-out").addEventListener("click", () => signOut());
$("period").addEventListener("change", load);
$("app").addEventListener("change", load);
$("outcome").addEventListener("change", () => loadSignIns().catch((e) => ($("error").textContent = e.message)));
$("country").addEventListener("change", () => loadSignIns().catch((e) => ($("error").textContent = e.message)));
$("more").addEventListener("click", () => loadSignIns(true).catch((e) => ($("error").textContent = e.message)));
if (session().key) open();
