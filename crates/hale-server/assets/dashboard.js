// hale's live dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The admin token comes from the URL fragment (`/#token=...`, never sent to the server) or
// from the form, and is kept in sessionStorage (this tab only). Every API call sends it
// as a bearer token. Live updates come from GET /v1/events/stream, read with fetch (an
// EventSource cannot send an Authorization header); each event schedules a throttled
// re-read of /v1/agents and /v1/status, which are also re-read every second so heartbeat
// ages and progress bars move.
"use strict";

const TOKEN_KEY = "hale-admin-token";
const REFRESH_EVERY_MS = 1000;
const REFRESH_AFTER_EVENT_MS = 250;
const TIMELINE_KINDS = ["agent_down", "incarnation_started", "process_started", "agent_failed"];
const TIMELINE_HOURS = 24;
// Kinds that come many times a second from a busy agent: left out of "Recent events".
const NOISY_KINDS = new Set(["checkpointed", "progress_reported", "message_acked", "spend_reported", "budget_reserved"]);
const RECENT_MAX = 100;

let token = null;
let started = false;
let refreshTimer = null;
let lastSeq = null;
let agents = [];
const seen = new Set();
// Per agent, its failures in time order: {incarnation, downAt, cause, startedAt, backAt, backIncarnation, failed}.
const failures = new Map();

function $(id) { return document.getElementById(id); }

// Builds an element; text goes in as text, never as HTML (agents write progress messages).
function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") element.className = value;
    else if (key.startsWith("data-")) element.setAttribute(key, String(value));
    else element[key] = value;
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function clockTime(ms) {
  const date = new Date(ms);
  const pad = (n, width) => String(n).padStart(width || 2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function duration(ms) {
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  if (ms < 3600000) return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

function ago(ms) {
  const age = Math.max(0, Date.now() - ms);
  return age < 1000 ? "just now" : `${duration(age)} ago`;
}

// ---- token ----------------------------------------------------------------------------

function takeTokenFromFragment() {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const fromUrl = fragment.get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // Out of the address bar, so it is not copied along with the address.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(problem) {
  setConnection("refused", problem ? "token refused" : "no token");
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-problem").hidden = !problem;
  $("login-problem").textContent = problem || "";
  $("token").focus();
}

class Refused extends Error {}

async function api(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    throw new Refused(await errorMessage(response));
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// A read that a single node answers `not_clustered`: null there.
async function apiOnCluster(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    throw new Refused(await errorMessage(response));
  }
  if (response.status === 409) return null;
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${body.error.code}: ${body.error.message}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

function refused(error) {
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  started = false;
  askForToken(`hale refused the token (${error.message}). Paste the admin token.`);
}

// ---- agents, tasks, mode ----------------------------------------------------------------

function agentState(agent) {
  if (agent.quarantine) return "quarantined";
  const managed = agent.managed;
  if (agent.down) {
    if (managed && managed.status !== "running" && managed.status !== "starting") return managed.status;
    return "down";
  }
  if (managed && managed.status !== "running") return managed.status;
  if (agent.health) return agent.health === "alive" && managed ? "running" : agent.health;
  if (managed) return managed.status;
  return agent.attached ? "attached" : "idle";
}

function tone(state) {
  if (["running", "alive", "attached", "closed", "optimal", "completed", "up", "leader"].includes(state)) return "ok";
  if (["suspect", "reconnecting", "starting", "backoff", "half_open", "degraded", "pending", "compensating"].includes(state)) return "warn";
  if (["down", "failed", "quarantined", "open", "minimal", "lost"].includes(state)) return "bad";
  return "";
}

function badge(text, extra) {
  return h("span", { class: `badge ${tone(text)} ${extra || ""}` }, text);
}

function renderAgents() {
  const body = $("agents").querySelector("tbody");
  const rows = agents.map((agent) => {
    const state = agentState(agent);
    const progress = agent.progress || {};
    const fraction = typeof progress.fraction === "number" ? Math.min(1, Math.max(0, progress.fraction)) : null;
    const fill = h("div");
    fill.style.width = `${fraction === null ? 0 : fraction * 100}%`;
    const detail = agent.down
      ? `${agent.down.cause} (${agent.down.detector})`
      : [fraction === null ? null : `${Math.round(fraction * 100)}%`, progress.message].filter(Boolean).join(" ");
    const managed = agent.managed || {};
    return h("tr", { "data-agent": agent.agent, "data-state": state, "data-incarnation": agent.incarnation },
      h("td", {}, h("b", {}, agent.agent), h("span", { class: "role" }, agent.role),
        managed.node ? h("span", { class: "role node", title: "the node it runs on" }, `on ${managed.node}`) : ""),
      h("td", { class: "state" }, badge(state)),
      h("td", { class: "num incarnation" }, agent.incarnation),
      h("td", { class: "heartbeat" }, agent.last_heartbeat_ms ? ago(agent.last_heartbeat_ms) : "–"),
      h("td", {}, h("div", { class: "bar", title: fraction === null ? "no progress reported" : `${Math.round(fraction * 100)}%` }, fill),
        h("div", { class: "progress-text", title: detail }, detail || "\u00a0")),
      h("td", {}, badge(agent.breaker || "closed")),
      h("td", { class: "num restarts" }, managed.restarts === undefined ? "–" : managed.restarts),
      h("td", { class: "num" }, managed.pid === undefined ? "–" : managed.pid));
  });
  body.replaceChildren(...rows);
  $("no-agents").hidden = agents.length > 0;
  $("agent-count").textContent = agents.length ? `(${agents.length})` : "";
}

function renderNodes(nodes) {
  $("nodes-card").hidden = nodes === null;
  if (nodes === null) return;
  const rows = nodes.map((node) =>
    h("tr", { "data-node": node.name, "data-status": node.status, "data-raft": node.raft },
      h("td", {}, h("b", {}, node.name), h("span", { class: "role" }, `id ${node.node_id}`)),
      h("td", { class: "state" }, badge(node.status)),
      h("td", { class: "raft" }, node.raft),
      h("td", {}, node.address),
      h("td", { class: "heard" }, node.last_heard_ms_ago === undefined ? "–" : `${duration(node.last_heard_ms_ago)} ago`),
      h("td", { class: "agents" }, node.agents.length ? node.agents.join(", ") : "–")));
  $("nodes").querySelector("tbody").replaceChildren(...rows);
  $("node-count").textContent = `(${nodes.filter((node) => node.status === "up").length} of ${nodes.length} up)`;
}

function renderStatus(status) {
  const mode = $("mode");
  mode.textContent = status.mode;
  mode.className = `badge ${tone(status.mode)}`;
  $("serving").textContent = status.roles ? `${status.serving} of ${status.roles} roles served` : "";
  const order = ["pending", "running", "shadowed", "compensating", "completed", "failed", "cancelled"];
  const counts = status.tasks_by_status || {};
  const names = [...order.filter((name) => name in counts), ...Object.keys(counts).filter((name) => !order.includes(name))];
  const chips = names.map((name) => h("span", { class: "chip", "data-status": name }, h("b", {}, counts[name]), name));
  if (!chips.length) chips.push(h("span", { class: "muted" }, "No tasks yet."));
  $("tasks").replaceChildren(...chips);
  const rows = (status.per_role || []).map((role) =>
    h("tr", {}, h("td", {}, role.role), h("td", { class: "num" }, role.agents), h("td", { class: "num" }, role.healthy),
      h("td", { class: "num" }, role.leases), h("td", { class: "num" }, role.queued)));
  $("roles").querySelector("tbody").replaceChildren(...rows);
  $("roles").hidden = rows.length === 0;
}

async function refresh() {
  refreshTimer = null;
  if (!token) return;
  try {
    const [agentList, status, nodes] =
      await Promise.all([api("/v1/agents"), api("/v1/status"), apiOnCluster("/v1/nodes")]);
    agents = agentList;
    renderAgents();
    renderStatus(status);
    renderNodes(nodes);
    renderTimeline();
  } catch (error) {
    if (error instanceof Refused) refused(error);
  }
}

function scheduleRefresh() {
  if (refreshTimer === null) refreshTimer = setTimeout(refresh, REFRESH_AFTER_EVENT_MS);
}

// ---- failures and recoveries -------------------------------------------------------------

function managedAgent(name) {
  const agent = agents.find((candidate) => candidate.agent === name);
  return Boolean(agent && agent.managed);
}

// Folds one event into the failures: a down opens one; the next incarnation's process
// (or, for an agent hale does not run, the next incarnation) closes it.
function foldFailure(event) {
  const name = event.agent;
  if (!name) return;
  const list = failures.get(name) || [];
  const open = list.length ? list[list.length - 1] : null;
  const fields = event.event || {};
  switch (event.kind) {
    case "agent_down":
      // The summary ends "DOWN (detector: cause)": the part in brackets says it all.
      list.push({ incarnation: fields.incarnation, downAt: event.at_ms, cause: downCause(event.summary),
                  startedAt: null, backAt: null, backIncarnation: null, failed: false });
      failures.set(name, list);
      break;
    case "incarnation_started":
      if (open && open.backAt === null && fields.incarnation > open.incarnation && open.startedAt === null) {
        open.startedAt = event.at_ms;
        open.backIncarnation = fields.incarnation;
      }
      break;
    case "process_started":
      if (open && open.backAt === null && fields.incarnation > open.incarnation) {
        open.backAt = event.at_ms;
        open.backIncarnation = fields.incarnation;
      }
      break;
    case "agent_failed":
      if (open && open.backAt === null) open.failed = true;
      break;
  }
}

function downCause(summary) {
  const found = summary.match(/DOWN \((.*)\)$/);
  return found ? found[1] : summary;
}

function renderTimeline() {
  const entries = [];
  for (const [name, list] of failures) {
    for (const failure of list) entries.push({ name, failure });
  }
  entries.sort((a, b) => b.failure.downAt - a.failure.downAt);
  const items = entries.slice(0, 50).map(({ name, failure }) => {
    let backAt = failure.backAt;
    if (backAt === null && failure.startedAt !== null && !managedAgent(name)) backAt = failure.startedAt;
    let outcome;
    let durationText;
    if (backAt !== null) {
      outcome = `back as incarnation ${failure.backIncarnation}`;
      durationText = duration(backAt - failure.downAt);
    } else if (failure.failed) {
      outcome = "FAILED: too many restarts, waiting for `hale restart`";
      durationText = `down ${duration(Date.now() - failure.downAt)}`;
    } else {
      outcome = "still down";
      durationText = `down ${duration(Date.now() - failure.downAt)}`;
    }
    return h("li", { "data-agent": name, "data-recovered": backAt !== null, "data-incarnation": failure.incarnation },
      h("span", { class: "time" }, clockTime(failure.downAt)),
      h("span", { class: `duration ${backAt !== null ? "" : "down"}` }, durationText),
      h("span", { class: "what" }, h("b", {}, name), ` incarnation ${failure.incarnation} down: ${failure.cause} → ${outcome}`));
  });
  $("timeline").replaceChildren(...items);
  $("no-failures").hidden = items.length > 0;
}

// ---- events -------------------------------------------------------------------------------

function takeEvent(event) {
  if (seen.has(event.seq)) return;
  seen.add(event.seq);
  if (TIMELINE_KINDS.includes(event.kind)) {
    foldFailure(event);
    renderTimeline();
  }
  if (!NOISY_KINDS.has(event.kind)) {
    const list = $("events");
    list.prepend(h("li", { "data-kind": event.kind },
      h("span", { class: "time" }, clockTime(event.at_ms)),
      h("span", { class: "kind" }, event.kind),
      h("span", { class: "what" }, event.summary)));
    while (list.children.length > RECENT_MAX) list.lastChild.remove();
  }
  scheduleRefresh();
}

async function loadTimeline() {
  const since = Date.now() - TIMELINE_HOURS * 3600 * 1000;
  const events = await api(`/v1/events?kind=${TIMELINE_KINDS.join(",")}&since=${since}&limit=10000`);
  // Oldest first, so each down is matched with what came after it.
  for (const event of events) {
    if (seen.has(event.seq)) continue;
    seen.add(event.seq);
    foldFailure(event);
  }
  for (const list of failures.values()) list.sort((a, b) => a.downAt - b.downAt);
  renderTimeline();
}

function setConnection(state, text) {
  const element = $("connection");
  element.dataset.state = state;
  element.textContent = text || state;
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

// Reads the event stream; after a drop or a lag, reconnects after the last event it got.
async function follow() {
  while (token) {
    try {
      const query = lastSeq === null ? "" : `?after=${lastSeq}`;
      const response = await fetch(`/v1/events/stream${query}`, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        refused(new Error(await errorMessage(response)));
        return;
      }
      if (!response.ok) throw new Error(await errorMessage(response));
      setConnection("live");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          takeBlock(block);
        }
      }
    } catch (error) {
      // Dropped: hale restarting, or the network. Try again shortly.
    }
    if (!token) return;
    setConnection("reconnecting");
    await sleep(1000);
  }
}

function takeBlock(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (name === "message") {
    lastSeq = payload.seq;
    takeEvent(payload);
  } else if (name === "lagged") {
    // We fell behind; the next connection resumes after the last event we got.
    lastSeq = payload.after;
  }
}

async function start() {
  if (started) return;
  started = true;
  $("login").hidden = true;
  $("main").hidden = false;
  setConnection("connecting");
  follow();
  try {
    await refresh();
    if (!token) return;
    await loadTimeline();
  } catch (error) {
    if (error instanceof Refused) refused(error);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    token = value;
    $("token").value = "";
    start();
  });
  window.addEventListener("hashchange", () => {
    const fresh = takeTokenFromFragment();
    if (fresh && fresh !== token) {
      token = fresh;
      start();
    }
  });
  token = takeTokenFromFragment();
  if (token) start();
  else askForToken(null);
  setInterval(() => { if (token && started) refresh(); }, REFRESH_EVERY_MS);
});
