// The Hufu console: draws the page its path names from the node's JSON
// under /console/api/ and refreshes it every few seconds. Read-only; no
// framework, no other origin: the node serves this file itself.
"use strict";

// Errors on the page are shown, never swallowed: an operator must know
// when the console itself is broken.
const consoleErrors = [];
function showError(message) {
  consoleErrors.push(message);
  const box = document.getElementById("errors");
  if (box) {
    box.hidden = false;
    box.textContent = "console error: " + consoleErrors.slice(-3).join("\n");
  }
}
window.addEventListener("error", (e) => showError(e.message));
window.addEventListener("unhandledrejection", (e) => showError(String(e.reason)));

const REFRESH_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

// el("td", {class: "num"}, "12"): an element with attributes and children
// (text is always set as text, never parsed as HTML).
function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG_NS, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

async function getJson(path) {
  const reply = await fetch(path, { cache: "no-store" });
  if (!reply.ok) throw new Error(path + ": " + reply.status + " " + (await reply.text()));
  return reply.json();
}

function card(title, ...body) {
  return el("section", { class: "card" }, el("h2", {}, title), ...body);
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function when(ms) {
  if (ms === null || ms === undefined || ms <= 0) return "–";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function age(secs) {
  if (secs === null || secs === undefined) return "–";
  if (secs < 60) return secs.toFixed(1) + " s";
  if (secs < 3600) return (secs / 60).toFixed(1) + " min";
  return (secs / 3600).toFixed(1) + " h";
}

function stat(label, value, cls) {
  return el("div", { class: "stat" }, el("b", { class: cls || "" }, value), el("span", {}, label));
}

// ---- Federation ---------------------------------------------------------

// A tile-grid map: each province one square, placed roughly where it lies.
// [row, column, short name] by GB/T 2260 code.
const TILES = {
  "230000": [0, 8, "HL"], "220000": [1, 8, "JL"], "150000": [1, 5, "NM"],
  "650000": [1, 1, "XJ"], "210000": [2, 7, "LN"], "110000": [2, 6, "BJ"],
  "140000": [2, 5, "SX"], "640000": [2, 4, "NX"], "620000": [2, 3, "GS"],
  "120000": [3, 7, "TJ"], "130000": [3, 6, "HE"], "610000": [3, 5, "SN"],
  "630000": [3, 3, "QH"], "540000": [3, 1, "XZ"], "370000": [4, 7, "SD"],
  "410000": [4, 6, "HA"], "500000": [4, 5, "CQ"], "510000": [4, 4, "SC"],
  "310000": [5, 8, "SH"], "320000": [5, 7, "JS"], "340000": [5, 6, "AH"],
  "420000": [5, 5, "HB"], "520000": [5, 4, "GZ"], "530000": [5, 3, "YN"],
  "330000": [6, 7, "ZJ"], "360000": [6, 6, "JX"], "430000": [6, 5, "HN"],
  "450000": [6, 4, "GX"], "350000": [7, 7, "FJ"], "440000": [7, 5, "GD"],
  "710000": [7, 8, "TW"], "810000": [8, 6, "HK"], "820000": [8, 5, "MO"],
  "460000": [8, 4, "HI"],
};
const STATE_COLOUR = { self: "#2f6fd6", fresh: "#2e9e5b", stale: "#d98a00", empty: "#c93c3c" };

function tileMap(members) {
  const size = 46, gap = 4;
  const byCode = Object.fromEntries(members.map((m) => [m.province, m]));
  const svg = el("svg:svg", {
    id: "province-map", viewBox: `0 0 ${9 * (size + gap)} ${9 * (size + gap)}`,
    width: 9 * (size + gap), height: 9 * (size + gap), role: "img",
    "aria-label": "provinces coloured by replica state",
  });
  for (const [code, [row, col, short]] of Object.entries(TILES)) {
    const m = byCode[code];
    const x = col * (size + gap), y = row * (size + gap);
    const fill = m ? STATE_COLOUR[m.state] || "#888" : "#e3e6ec";
    const tile = el("svg:g", { "data-province": code, "data-state": m ? m.state : "none" },
      el("svg:title", {}, m ? `${m.name} (${code}): ${m.state}` : `${code}: not a member`),
      el("svg:rect", { x, y, width: size, height: size, rx: 5, fill }),
      el("svg:text", { x: x + size / 2, y: y + size / 2 + 4, "text-anchor": "middle",
        fill: m ? "#fff" : "#8a93a3" }, short));
    svg.append(tile);
  }
  const legend = el("div", { class: "legend" },
    Object.entries(STATE_COLOUR).map(([s, c]) => {
      const swatch = el("i", {});
      swatch.style.background = c;
      return el("span", {}, swatch, s === "empty" ? "no data" : s);
    }));
  return [svg, legend];
}

function showProvince(code) {
  document.getElementById("province").textContent = "province " + code;
}

async function federationPage(main) {
  const f = await getJson("/console/api/federation.json");
  showProvince(f.province);
  const t = f.trust;
  const trust = t
    ? el("div", { class: "stats" },
        stat("trust list version", t.version),
        stat("threshold", t.threshold),
        stat("witness quorum", t.witness_quorum),
        stat("issued", when(t.issued_at * 1000), "small"),
        stat("signed by", t.signers.map((s) => s.replace(/^hufu-governance-/, "")).join(", ") || "–", "small"))
    : el("p", { class: "muted" }, "This node runs alone: no trust list installed.");
  const rows = f.members.map((m) => el("tr", { "data-province": m.province, "data-state": m.state },
    el("td", {}, m.province), el("td", {}, m.name),
    el("td", { class: "mono" }, m.endpoints.join(" ")),
    el("td", { class: "num" }, m.sequence),
    el("td", { class: "num" }, m.state === "self" ? "–" : age(m.age_secs)),
    el("td", {}, el("span", { class: "badge state-" + m.state }, m.state)),
    el("td", {}, m.state === "self" ? "–"
      : el("span", { class: "badge breaker-" + m.peer.breaker }, m.peer.breaker)),
    el("td", { class: "error" }, m.peer.last_error
      ? `${when(m.peer.last_error_ms)}: ${m.peer.last_error}` : "–")));
  main.replaceChildren(
    el("div", { class: "row" },
      card("Trust list in force", trust),
      card("Provinces", ...tileMap(f.members))),
    card("Members",
      el("p", { class: "muted" }, `A replica is fresh when its newest signed head is at most ${f.max_replica_age_secs} s old.`),
      table(["province", "name", "endpoint", "feed position", "replica age", "state", "breaker", "last error"],
        rows, { id: "members" })));
}

// ---- Load ---------------------------------------------------------------

const PALETTE = ["#2f6fd6", "#2e9e5b", "#d98a00", "#c93c3c", "#7b4fd0", "#1a9aa0", "#8a5a2b"];
let loadSamples = [];
let loadInterval = 2000;

// A line chart of the series `pick` selects, over the samples held.
function chart(id, title, unit, pick) {
  const w = 560, h = 180, left = 48, bottom = 20, top = 8;
  const names = [...new Set(loadSamples.flatMap((s) => Object.keys(s.v).filter(pick)))].sort();
  const t0 = loadSamples.length ? loadSamples[0].t : 0;
  const t1 = loadSamples.length ? loadSamples[loadSamples.length - 1].t : 1;
  let max = 0;
  for (const s of loadSamples) for (const n of names) max = Math.max(max, s.v[n] || 0);
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => left + (w - left - 4) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  let points = Infinity;
  const svg = el("svg:svg", { id, class: "chart", viewBox: `0 0 ${w} ${h}`, width: "100%", height: h },
    el("svg:line", { x1: left, y1: y(0), x2: w - 4, y2: y(0), stroke: "#c9cfd9" }),
    el("svg:text", { x: left - 6, y: top + 10, "text-anchor": "end", fill: "#6b7687" }, fmt(max)),
    el("svg:text", { x: left - 6, y: y(0), "text-anchor": "end", fill: "#6b7687" }, "0"),
    el("svg:text", { x: left, y: h - 4, fill: "#6b7687" }, loadSamples.length ? new Date(t0).toISOString().slice(11, 19) : ""),
    el("svg:text", { x: w - 4, y: h - 4, "text-anchor": "end", fill: "#6b7687" }, loadSamples.length ? new Date(t1).toISOString().slice(11, 19) + " UTC" : ""));
  names.forEach((n, i) => {
    const colour = PALETTE[i % PALETTE.length];
    const at = loadSamples.filter((s) => n in s.v).map((s) => [x(s.t).toFixed(1), y(s.v[n]).toFixed(1)]);
    points = Math.min(points, at.length);
    svg.append(el("svg:polyline", { points: at.map((p) => p.join(",")).join(" "), fill: "none", stroke: colour, "stroke-width": 1.6 }));
    if (at.length === 1) svg.append(el("svg:circle", { cx: at[0][0], cy: at[0][1], r: 2.5, fill: colour }));
  });
  // The test reads how many points every series has.
  svg.setAttribute("data-series", names.join(" "));
  svg.setAttribute("data-points", names.length ? points : 0);
  const latest = loadSamples.length ? loadSamples[loadSamples.length - 1].v : {};
  const legend = el("div", { class: "legend" }, names.map((n, i) => {
    const swatch = el("i", {});
    swatch.style.background = PALETTE[i % PALETTE.length];
    return el("span", {}, swatch, `${n.replace(/^[a-z]+\//, "")} ${fmt(latest[n] || 0)}${unit}`);
  }));
  return card(title, names.length ? null : el("p", { class: "muted" }, "no data yet"), svg, legend);
}

function fmt(v) {
  if (v >= 1000) return (v / 1000).toFixed(1) + "k";
  if (v >= 10) return v.toFixed(0);
  return v.toFixed(v >= 1 ? 1 : 2);
}

async function loadPage(main) {
  const since = loadSamples.length ? loadSamples[loadSamples.length - 1].t : "";
  const reply = await getJson("/console/api/load.json" + (since ? "?since=" + since : ""));
  showProvince(reply.province);
  loadInterval = reply.interval_ms;
  loadSamples = loadSamples.concat(reply.samples);
  const hourAgo = Date.now() - 3600 * 1000;
  loadSamples = loadSamples.filter((s) => s.t >= hourAgo);
  main.replaceChildren(
    el("p", { class: "muted" }, `Last hour, one sample every ${loadInterval / 1000} s; ${loadSamples.length} samples.`),
    el("div", { class: "row" },
      chart("chart-calls", "Calls admitted, per second, by class", "/s", (n) => n.startsWith("calls/")),
      chart("chart-refused", "Refusals (RESOURCE_EXHAUSTED), per second, by reason", "/s", (n) => n.startsWith("refused/")),
      chart("chart-latency", "Latency, p50 and p99", " ms", (n) => n === "p50_ms" || n === "p99_ms"),
      chart("chart-connections", "Connections, calls in flight, queued", "", (n) => ["connections", "in_flight", "queued"].includes(n)),
      chart("chart-handshakes", "TLS handshakes per second", "/s", (n) => n.startsWith("handshakes/"))));
}

// ---- Audit --------------------------------------------------------------

async function auditPage(main) {
  const a = await getJson("/console/api/audit.json");
  showProvince(a.province);
  const checkpoints = a.checkpoints.map((c) => el("tr", {},
    el("td", { class: "num" }, c.size),
    el("td", { class: "mono" }, c.root),
    el("td", {}, c.cosigners.map((s) => s.province || s.witness).join(", ") || "–"),
    el("td", {}, when(Math.max(0, ...c.cosigners.map((s) => s.time)) * 1000))));
  const failures = a.witness_failures.slice().reverse().map((f) => el("tr", {},
    el("td", {}, when(f.time_ms)), el("td", {}, f.province), el("td", { class: "num" }, f.size)));
  const evidence = a.evidence.map((e) => el("tr", {},
    el("td", { class: "mono" }, e.origin), el("td", { class: "num" }, e.count),
    el("td", {}, when(e.last_found_at * 1000)), el("td", {}, e.last_reason)));
  main.replaceChildren(
    card("Audit log", el("div", { class: "stats" },
      stat("entries", a.log_size),
      stat("published checkpoints", a.published_count),
      stat("latest witnessed size", a.checkpoints.length ? a.checkpoints[0].size : 0),
      stat("recent witnessing failures", a.witness_failures.length),
      stat("conflicts found", a.conflicts, a.conflicts > 0 ? "alarm" : ""),
      stat("recording", a.enabled ? "on" : "off"))),
    card("Latest published checkpoints",
      table(["size", "root hash", "cosigned by", "cosigned at"], checkpoints, { id: "checkpoints" })),
    el("div", { class: "row" },
      card("Witnessing failures", failures.length ? table(["when", "witness", "checkpoint size"], failures)
        : el("p", { class: "muted" }, "none recently")),
      card("Conflicts in other provinces' logs (evidence kept)", evidence.length
        ? table(["log", "evidence", "last found", "reason"], evidence)
        : el("p", { class: "muted" }, "none found"))));
}

// ---- Keys ---------------------------------------------------------------

async function keysPage(main) {
  const k = await getJson("/console/api/keys.json");
  showProvince(k.province);
  const keys = k.keys.map((r) => el("tr", {},
    el("td", { class: "mono" }, r.kid), el("td", {}, r.alg),
    el("td", {}, when(r.created_at * 1000)), el("td", {}, when((r.retired_at || 0) * 1000)),
    el("td", { class: r.revoked_at ? "alarm" : "" }, r.revoked_at ? when(r.revoked_at * 1000) : "–"),
    el("td", {}, r.active ? "active" : r.revoked_at ? "revoked" : "retired")));
  const members = k.members.map((m) => el("tr", {},
    el("td", {}, m.province), el("td", {}, m.name),
    el("td", { class: "mono" }, m.kids.join(" ")),
    el("td", { class: "mono" }, m.revoked_kids.join(" ") || "–"),
    el("td", { class: "mono" }, m.announced_digest || "–")));
  main.replaceChildren(
    card(`Code-signing keys of ${k.province} (rotations and revocations)`,
      table(["kid", "alg", "created", "retired", "revoked", "state"], keys, { id: "own-keys" }),
      el("p", { class: "muted" }, "Digest announced in feed heads: ", el("span", { class: "mono" }, k.digest))),
    card("Published JWKS", el("pre", {}, JSON.stringify(k.jwks, null, 2))),
    card("Members' keys", table(["province", "name", "key ids (trust list)", "revoked", "digest announced in feed"],
      members, { id: "member-keys" })));
}

// ---- Page loop ----------------------------------------------------------

const PAGES = { federation: federationPage, load: loadPage, audit: auditPage, keys: keysPage };

async function refresh(page, main) {
  try {
    await PAGES[page](main);
    document.getElementById("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    document.body.setAttribute("data-loaded", "true");
  } catch (e) {
    showError(e.message);
  }
  setTimeout(() => refresh(page, main), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = location.pathname.replace(/^\/console\//, "") || "federation";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.classList.add("active");
  }
  if (!PAGES[page]) {
    showError("unknown page " + page);
    return;
  }
  document.body.setAttribute("data-page", page);
  refresh(page, document.getElementById("main"));
});
