// SpecLoRA's page: chat through /v1/chat/completions (streamed), the learning chart from
// /api/timeline, the "Now" panel from /api/stats. Plain browser JavaScript, no build step,
// nothing loaded from elsewhere. Text from the daemon goes in through textContent only.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const ADAPTER_COLOURS = ["#6b7385", "#2b5fd9", "#d9822b", "#8e44ad", "#16a085", "#c0392b",
  "#2c3e50", "#b7950b"];

const state = {
  key: sessionStorage.getItem("speclora-key") || "",
  messages: [],          // the chat so far, as OpenAI messages
  points: [],            // timeline requests, oldest first
  runs: [],              // training runs
  lastSeq: 0,
  maxPoints: 5000,
  stats: null,
  busy: null,            // AbortController of the streaming request
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// ------------------------------------------------------------------ the API

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const reply = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (reply.status === 401) {
    $("key-form").hidden = false;
    throw new Unauthorized("the daemon needs its API key");
  }
  return reply;
}

async function getJSON(path) {
  const reply = await api(path);
  const body = await reply.json();
  if (!reply.ok) throw new Error((body.error && body.error.message) || reply.statusText);
  return body;
}

// ------------------------------------------------------------------ chat

function addMessage(role, text) {
  const hint = document.querySelector("#messages .hint");
  if (hint) hint.remove();
  const body = el("div", { class: "body" });
  if (text) body.textContent = text;
  const msg = el("div", { class: "msg " + role }, el("div", { class: "who" }, role), body);
  $("messages").append(msg);
  $("messages").scrollTop = $("messages").scrollHeight;
  return msg;
}

function appendTokens(body, delta, ext) {
  const texts = ext && ext.token_texts;
  const sources = (ext && ext.token_sources) || [];
  if (texts && texts.length === sources.length) {
    texts.forEach((t, i) => { if (t) body.append(el("span", { class: "tok " + sources[i] }, t)); });
  } else if (delta) {  // no per-token split: colour the chunk by its last token's source
    body.append(el("span", { class: "tok " + (sources[sources.length - 1] || "target") }, delta));
  }
}

function fmt(x, digits = 2) {
  return Number.isFinite(x) ? x.toFixed(digits) : "–";
}

function pct(x) {
  return Number.isFinite(x) ? (100 * x).toFixed(0) + "%" : "–";
}

function showMeta(msg, ext) {
  const parts = [
    ["tok/s", fmt(ext.tokens_per_second, 1)],
    ["acceptance", ext.proposed ? pct(ext.acceptance_rate) : "– (nothing proposed)"],
    ["tokens/pass", fmt(ext.tokens_per_step)],
    ["draft", `${ext.from_draft} tok (${ext.draft_accepted}/${ext.draft_proposed})`],
    ["history", `${ext.from_history} tok (${ext.history_accepted}/${ext.history_proposed})`],
    ["adapter", ext.adapter_version || "base"],
  ];
  const meta = el("div", { class: "meta" });
  parts.forEach(([k, v], i) => {
    if (i) meta.append(" · ");
    meta.append(k + " ", el("b", {}, v));
  });
  if (ext.failure_recorded) meta.append(" · recorded as a failure case");
  msg.append(meta);
}

async function* sseEvents(reply) {
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (block.startsWith("data: ")) yield block.slice(6);
    }
  }
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const body = msg.querySelector(".body");
  const controller = new AbortController();
  state.busy = controller;
  setBusy(true);
  let answer = "";
  try {
    const reply = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: "speclora",
        messages: state.messages,
        stream: true,
        token_texts: true,
        max_tokens: Number($("max-tokens").value) || 128,
        temperature: Number($("temperature").value) || 0,
        draft_tokens: $("draft-tokens").value === "" ? null : Number($("draft-tokens").value),
        use_history: $("use-history").checked,
      }),
      signal: controller.signal,
    });
    if (!reply.ok) {
      const err = await reply.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || reply.statusText);
    }
    for await (const data of sseEvents(reply)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        answer += delta;
        appendTokens(body, delta, chunk.speclora);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice && choice.finish_reason && chunk.speclora) showMeta(msg, chunk.speclora);
    }
    state.messages.push({ role: "assistant", content: answer });
  } catch (err) {
    if (err.name === "AbortError") {
      msg.append(el("div", { class: "meta" }, "stopped"));
      if (answer) state.messages.push({ role: "assistant", content: answer });
    } else {
      msg.classList.add("error");
      body.append(el("span", {}, (answer ? "\n" : "") + "error: " + err.message));
      state.messages.pop();  // the question goes unanswered; let the user ask again
    }
  } finally {
    msg.classList.remove("streaming");
    msg.classList.add("done");
    state.busy = null;
    setBusy(false);
    refresh();
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// ------------------------------------------------------------------ learning

// One colour per adapter version, the base draft's first (made once per redraw).
let colours = new Map();

function adapterColour(version) {
  return colours.get(version) || ADAPTER_COLOURS[0];
}

function clear(svg) {
  while (svg.firstChild) svg.firstChild.remove();
}

// x position of request seq `s` on a chart `w` wide
function scaleX(w, pad) {
  const first = state.points.length ? state.points[0].seq : 1;
  const last = Math.max(state.lastSeq, first + 1);
  return (s) => pad + ((s - first) / (last - first)) * (w - pad - 6);
}

function drawChart(svg, h, value, top, opts) {
  clear(svg);
  const w = 600, pad = 34, bottom = h - 14;
  const x = scaleX(w, pad);
  const y = (v) => bottom - (Math.min(v, top) / top) * (bottom - 8);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4, yy = y(v);
    svg.append(el("svg:line", { class: "grid", x1: pad, x2: w, y1: yy, y2: yy }));
    svg.append(el("svg:text", { class: "axis", x: 2, y: yy + 3 }, opts.label(v)));
  }
  if (state.points.length) {
    svg.append(el("svg:text", { class: "axis", x: pad, y: h - 2 }, "request " + state.points[0].seq));
    svg.append(el("svg:text", { class: "axis", x: w - 70, y: h - 2 }, "request " + state.lastSeq));
  }
  const first = state.points.length ? state.points[0].seq : 1;
  for (const run of state.runs) {  // a training run sits between the requests around it
    if (run.requests_before + 1 < first) continue;  // before the oldest point kept
    const xx = x(run.requests_before + 0.5);
    const outcome = run.outcome;
    const mark = el("svg:line", { class: "train-mark " + outcome, x1: xx, x2: xx, y1: 4, y2: bottom,
      "data-run": run.seq });
    mark.append(el("svg:title", {}, runTitle(run)));
    svg.append(mark);
    if (opts.labels) {
      const label = (run.adapter_version || "run " + run.seq) + " " + outcomeMark(outcome);
      const right = xx > w - 110;  // near the right edge: the label goes left of the mark
      svg.append(el("svg:text", { class: "train-label", x: right ? xx - 3 : xx + 3, y: 12,
        "text-anchor": right ? "end" : "start" }, label));
    }
  }
  for (const series of opts.lines || []) {
    const pts = state.points.filter((p) => series.has(p))
      .map((p) => `${x(p.seq).toFixed(1)},${y(series.value(p)).toFixed(1)}`);
    if (pts.length > 1) svg.append(el("svg:polyline", { class: series.cls, points: pts.join(" ") }));
  }
  const r = state.points.length > 400 ? 1.5 : 3;
  for (const p of state.points) {
    if (opts.skip && opts.skip(p)) continue;
    const dot = el("svg:circle", { class: "point", cx: x(p.seq).toFixed(1), cy: y(value(p)).toFixed(1),
      r, fill: adapterColour(p.adapter_version), "data-seq": p.seq });
    dot.append(el("svg:title", {}, pointTitle(p)));
    svg.append(dot);
  }
}

function outcomeMark(outcome) {
  return { promoted: "✓ promoted", rejected: "✗ rejected", failed: "✗ failed",
    cancelled: "✗ cancelled", running: "… training" }[outcome] || outcome;
}

function pointTitle(p) {
  return `request ${p.seq} at ${new Date(p.time * 1000).toLocaleTimeString()}\n` +
    `adapter ${p.adapter_version || "base"}, ${p.mode}\n` +
    `acceptance ${pct(p.acceptance)} (draft ${pct(p.draft_acceptance)}, history ${pct(p.history_acceptance)})\n` +
    `${fmt(p.tokens_per_second, 1)} tok/s, ${fmt(p.tokens_per_pass)} tokens/pass, ${p.completion_tokens} tokens`;
}

function runTitle(run) {
  const when = new Date(run.started_at * 1000).toLocaleString();
  return `training run ${run.seq} (${when}): ${run.outcome}` +
    (run.adapter_version ? ` → ${run.adapter_version}` : "") +
    (run.reason ? `\n${run.reason}` : "");
}

function lossSpark(losses) {
  const svg = el("svg:svg", { viewBox: "0 0 90 22", preserveAspectRatio: "none", class: "loss" });
  const vals = losses.filter((l) => l[1] !== null);
  if (vals.length > 1) {
    const lo = Math.min(...vals.map((l) => l[1])), hi = Math.max(...vals.map((l) => l[1]));
    const n = vals.length - 1;
    const pts = vals.map((l, i) =>
      `${((i / n) * 88 + 1).toFixed(1)},${(20 - ((l[1] - lo) / (hi - lo || 1)) * 18).toFixed(1)}`);
    svg.append(el("svg:polyline", { points: pts.join(" ") }));
  }
  svg.append(el("svg:title", {}, vals.length
    ? `loss ${fmt(vals[0][1], 3)} → ${fmt(vals[vals.length - 1][1], 3)} over ${vals[vals.length - 1][0]} steps`
    : "no steps yet"));
  return svg;
}

function drawRuns() {
  const tbody = document.querySelector("#runs tbody");
  clear(tbody);
  if (!state.runs.length) {
    tbody.append(el("tr", { class: "none" }, el("td", { colspan: 6, class: "muted" },
      "none yet: ", el("code", {}, "speclora train"), " runs one")));
    return;
  }
  for (const run of [...state.runs].reverse()) {
    const losses = run.losses || [];
    const last = losses.length ? losses[losses.length - 1][1] : null;
    const before = run.heldout_before, after = run.heldout_after;
    tbody.append(el("tr", { class: "run " + run.outcome, "data-run": run.seq },
      el("td", {}, run.seq),
      el("td", {}, new Date(run.started_at * 1000).toLocaleTimeString(),
        el("div", { class: "muted" }, run.duration_s ? fmt(run.duration_s, 0) + " s" : "")),
      el("td", {}, `${run.train_cases} train / ${run.heldout_cases} held out`,
        el("div", { class: "muted" }, `${run.steps_done}/${run.steps_planned} steps`)),
      el("td", {}, lossSpark(losses), el("div", { class: "muted" }, last === null ? "" : "loss " + fmt(last, 3))),
      el("td", {}, `${before === null ? "–" : fmt(before, 3)} → ${after === null ? "–" : fmt(after, 3)}`),
      el("td", { class: "reason" }, el("span", { class: run.outcome }, outcomeMark(run.outcome)),
        run.adapter_version ? " " + run.adapter_version : "",
        el("div", { class: "muted" }, run.reason || "")),
    ));
  }
}

function sum(points, f) {
  return points.reduce((a, p) => a + f(p), 0);
}

function drawTables() {
  const byAdapter = document.querySelector("#by-adapter tbody");
  clear(byAdapter);
  const versions = [...new Set(state.points.map((p) => p.adapter_version))].sort();
  for (const v of versions) {
    const ps = state.points.filter((p) => p.adapter_version === v);
    const rated = ps.filter((p) => p.tokens_per_second > 0);
    byAdapter.append(el("tr", {},
      el("td", {}, el("i", { class: "dot" }), v || "base"),
      el("td", {}, ps.length),
      el("td", {}, pct(sum(ps, (p) => p.accepted) / sum(ps, (p) => p.proposed))),
      el("td", {}, pct(sum(ps, (p) => p.draft_accepted) / sum(ps, (p) => p.draft_proposed))),
      el("td", {}, fmt(sum(rated, (p) => p.tokens_per_second) / rated.length, 1)),
      el("td", {}, fmt(sum(ps, (p) => p.completion_tokens) / sum(ps, (p) => p.target_passes))),
    ));
  }
  const bySource = document.querySelector("#by-source tbody");
  clear(bySource);
  const tokens = sum(state.points, (p) => p.completion_tokens);
  const rows = [
    ["draft", sum(state.points, (p) => p.from_draft), sum(state.points, (p) => p.draft_proposed),
      sum(state.points, (p) => p.draft_accepted)],
    ["history", sum(state.points, (p) => p.from_history), sum(state.points, (p) => p.history_proposed),
      sum(state.points, (p) => p.history_accepted)],
  ];
  rows.push(["target", tokens - rows[0][1] - rows[1][1], null, null]);
  for (const [name, n, proposed, accepted] of rows) {
    bySource.append(el("tr", {},
      el("td", {}, el("span", { class: "tok " + name }, name)),
      el("td", {}, n), el("td", {}, tokens ? pct(n / tokens) : "–"),
      el("td", {}, proposed === null ? "" : proposed),
      el("td", {}, proposed ? pct(accepted / proposed) : "")));
  }
  const key = $("adapter-key");
  clear(key);
  versions.forEach((v, i) => {
    const dot = el("i", {});
    dot.style.background = adapterColour(v);  // CSSOM, which the page's CSP allows
    key.append(el("span", {}, dot, v || "base draft"));
    byAdapter.children[i].querySelector(".dot").style.background = adapterColour(v);
  });
}

let drawn = "";  // what the learning panel shows now: redraw only when it changed

function drawLearning() {
  const shown = JSON.stringify([state.lastSeq, state.points.length, state.runs]);
  if (shown === drawn) return;
  drawn = shown;
  const versions = [...new Set(["", ...state.points.map((p) => p.adapter_version)])].sort();
  colours = new Map(versions.map((v, i) => [v, ADAPTER_COLOURS[i % ADAPTER_COLOURS.length]]));
  const spoke = (p) => p.proposed > 0;
  drawChart($("chart-acceptance"), 170, (p) => p.acceptance, 1, {
    label: (v) => (100 * v).toFixed(0) + "%",
    labels: true,
    skip: (p) => !spoke(p),
    lines: [
      { cls: "line-all", has: spoke, value: (p) => p.acceptance },
      { cls: "line-draft", has: (p) => p.draft_proposed > 0, value: (p) => p.draft_acceptance },
      { cls: "line-history", has: (p) => p.history_proposed > 0, value: (p) => p.history_acceptance },
    ].map((s) => Object.assign(s, { value: smooth(s.value, s.has) })),
  });
  const top = Math.max(1, ...state.points.map((p) => p.tokens_per_second)) * 1.1;
  drawChart($("chart-speed"), 130, (p) => p.tokens_per_second, top, {
    label: (v) => v.toFixed(0),
    skip: (p) => !(p.tokens_per_second > 0),
  });
  drawTables();
  drawRuns();
  $("learning-summary").textContent = state.points.length
    ? `${state.lastSeq} requests since start, ${state.points.length} kept (at most ${state.maxPoints}); ` +
      `${state.runs.length} training run${state.runs.length === 1 ? "" : "s"}`
    : "no requests yet";
}

// A running mean over the last few requests that have the measure, so the lines show the trend
// under the per-request dots.
function smooth(value, has, n = 8) {
  const cache = new Map();
  return (p) => {
    if (!cache.size) {
      const window = [];
      for (const q of state.points) {
        if (!has(q)) continue;
        window.push(value(q));
        if (window.length > n) window.shift();
        cache.set(q.seq, window.reduce((a, b) => a + b, 0) / window.length);
      }
    }
    return cache.get(p.seq);
  };
}

// ------------------------------------------------------------------ now

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function duration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function drawNow(s) {
  const d = s.daemon || {};
  const at = d.auto_train || {};
  const autoTrain = !at.enabled ? "off (learning.auto_train)"
    : at.waiting_for && at.waiting_for.length ? "on; waiting for " + at.waiting_for.join(", ")
      : "on; due now";
  const rows = [
    ["target", s.target_model],
    ["draft", s.draft_model || "none"],
    ["adapter", s.adapter_version || "base draft"],
    ["device", `${d.device || "?"} · ${d.cpu_count || "?"} CPUs`],
    ["BLAS", s.blas_skinny_rows ? `${s.blas} + skinny sgemm (up to ${s.blas_skinny_rows} rows)` : s.blas],
    ["mode", s.default_mode],
    ["memory", `${bytes(s.rss_bytes)} resident (peak ${bytes(s.peak_rss_bytes)})`],
    ["weights", bytes(s.weight_bytes)],
    ["prompt cache", bytes(s.prompt_cache_bytes)],
    ["machine", bytes(d.memory_total_bytes)],
    ["active", `${s.requests_active} generation${s.requests_active === 1 ? "" : "s"}`],
    ["queue", `${s.queue_depth} waiting`],
    ["training", s.training_state],
    ["auto-train", autoTrain],
    ["failure cases", `${s.failure_cases} stored, ${s.pending_cases} new since the last run`],
    ["history", `${s.history_tokens} tokens from ${s.history_documents} requests (${bytes(s.history_bytes)})`],
    ["requests", `${s.requests_total} done, ${s.tokens_total} tokens`],
    ["acceptance", `${pct(s.acceptance_recent)} recent, ${pct(s.acceptance_lifetime)} lifetime`],
    ["tok/s", fmt(s.tokens_per_second_recent, 1) + " recent"],
    ["uptime", duration(s.uptime_s)],
    ["version", `${s.version} (pid ${s.pid})`],
  ];
  if (s.failure_store_error) rows.push(["store", s.failure_store_error]);
  const list = $("now-list");
  clear(list);
  for (const [k, v] of rows) list.append(el("dt", {}, k), el("dd", { "data-key": k }, v));
  $("models").textContent = `${s.target_model} + ${s.draft_model || "no draft"}`;
  $("counts").textContent =
    `Failure cases: ${s.failure_cases} stored (${s.pending_cases} new). ` +
    `History: ${s.history_tokens} tokens from ${s.history_documents} requests.`;
}

// ------------------------------------------------------------------ polling

function setStatus(stateName, text) {
  $("status").dataset.state = stateName;
  $("status").textContent = text;
}

async function refresh() {
  try {
    const [stats, timeline] = await Promise.all([
      getJSON("/api/stats"),
      getJSON("/api/timeline?since=" + state.lastSeq),
    ]);
    state.stats = stats;
    if (timeline.last_seq < state.lastSeq) {  // the daemon restarted: start over
      state.points = [];
      state.lastSeq = 0;
      return;
    }
    const fresh = timeline.requests.filter((p) => p.seq > state.lastSeq);  // polls may overlap
    state.points = state.points.concat(fresh).slice(-timeline.max_requests);
    state.maxPoints = timeline.max_requests;
    state.lastSeq = timeline.last_seq;
    state.runs = timeline.training_runs;
    drawNow(stats);
    drawLearning();
    setStatus("serving", "serving");
  } catch (err) {
    setStatus("error", err instanceof Unauthorized ? "API key needed" : "unreachable: " + err.message);
  }
}

function start() {
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || state.busy) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("clear").addEventListener("click", () => {
    state.messages = [];
    clear($("messages"));
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem("speclora-key", state.key);
    $("key-form").hidden = true;
    refresh();
  });
  refresh();
  setInterval(refresh, POLL_MS);
}

start();
