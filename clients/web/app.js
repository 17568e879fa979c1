// The live demo: one streamed session, one lane per worker, the shared history, the answer and counters.
// Streams with fetch POST + ReadableStream (EventSource cannot POST); Stop aborts the request, which makes the
// server cancel the session. body[data-state] is idle | running | done | stopped | error.

import { appendText, buildLanes, endStep, renameLane, setLaneState } from "./lanes.js";
import { SSEParser } from "./sse.js";

const COMPLETIONS = "v1/hogwild/completions";
const NUMBER_FIELDS = ["workers", "max_tokens", "temperature", "redundancy_check_every", "seed"];
const TICK_MS = 100;
const HEALTH_RETRY_MS = 2000; // while the server is not ready
const HEALTH_POLL_MS = 5000; // while it is
const SERVER_STATES = { down: "engine restarting…", failed: "engine failed", stopped: "server stopping" };

const $ = (id) => document.getElementById(id);
let run = null; // the session on screen: see newRun()
let wasReady = false; // the server has served since the page opened: a later load is the engine restarting

class ServerError extends Error {
  constructor(error, status) {
    super(error.message || "the server reported an error");
    this.status = status;
    this.param = error.param || null;
  }
}

function newRun(workers) {
  return {
    controller: new AbortController(),
    lanes: [],
    workers,
    tokens: 0,
    steps: 0,
    prompt: null, // { tokens, cached } from the usage chunk
    startedAt: performance.now(),
    firstTokenAt: null,
    endedAt: null,
    timer: null,
  };
}

// ---- the form ----------------------------------------------------------------------------------------------

function requestBody() {
  const body = { prompt: $("prompt").value, stream: true, stream_options: { include_usage: true } };
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  return body;
}

// What the form cannot send as typed: a number field holding no number ("5e": its value reads as empty, which
// would silently mean the server's default), or an API key no HTTP header can carry.
function formProblem() {
  for (const name of NUMBER_FIELDS) {
    if ($(name).validity.badInput) return { message: `${fieldLabel(name)}: not a number`, param: name };
  }
  if (/[^\x21-\x7e]/.test($("api_key").value.trim())) {
    return { message: "API key: only printable ASCII characters, without spaces", param: "api_key" };
  }
  return null;
}

function fieldLabel(name) {
  return document.querySelector(`label[for="${name}"]`).firstChild.textContent.trim();
}

function headers() {
  const key = $("api_key").value.trim();
  const result = { "Content-Type": "application/json", Accept: "text/event-stream" };
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function start(event) {
  event?.preventDefault();
  if (run && !run.endedAt) return;
  clearError();
  const problem = formProblem();
  if (problem) {
    showError(problem.message, problem.param);
    return;
  }
  const body = requestBody();
  run = newRun(Number.isInteger(body.workers) ? body.workers : 2);
  resetView();
  setState("running", "waiting for the server…");
  run.timer = setInterval(updateCounters, TICK_MS);
  const current = run;
  try {
    const response = await fetch(COMPLETIONS, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: current.controller.signal,
    });
    if (!response.ok) throw await httpError(response);
    current.lanes = buildLanes($("lanes"), current.workers);
    setState("running", "generating");
    await consume(response, current);
    const aborted = current.lanes.some((lane) => lane.el.dataset.finish === "abort");
    end(current, aborted ? "stopped" : "done", aborted ? "stopped by the server" : "finished");
  } catch (error) {
    if (current.controller.signal.aborted) end(current, "stopped", "stopped");
    else fail(current, error);
  }
}

function stop() {
  if (!run || run.endedAt) return;
  run.controller.abort();
  end(run, "stopped", "stopped");
}

async function httpError(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    error = {};
  }
  if (!error.message) error.message = `${response.status} ${response.statusText}`.trim();
  const retry = response.headers.get("Retry-After");
  if (response.status === 503 && retry) error.message = `${error.message.replace(/\.?$/, ".")} Try again in ${retry} s.`;
  if (response.status === 401) error.param = "api_key";
  return new ServerError(error, response.status);
}

// ---- the stream --------------------------------------------------------------------------------------------

async function consume(response, current) {
  const reader = response.body.getReader();
  const parser = new SSEParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the connection closed before the run finished");
    for (const payload of parser.feed(value)) {
      if (payload === "[DONE]") return;
      handleChunk(JSON.parse(payload), current);
    }
  }
}

function handleChunk(chunk, current) {
  if (chunk.error) throw new ServerError(chunk.error, null);
  if (!chunk.choices || chunk.choices.length === 0) {
    if (chunk.usage) applyUsage(current, chunk.usage);
    return;
  }
  const choice = chunk.choices[0];
  const info = chunk.hogwild || {};
  const lane = current.lanes[info.worker ?? choice.index];
  if (!lane) return;
  if (info.name && info.name !== lane.name) renameLane(lane, info.name);
  if (info.step) lane.stepEl.textContent = info.step;
  switch (info.kind) {
    case "token":
      countTokens(current, lane, info.token_ids?.length || 1);
      appendText(lane, choice.text, null);
      break;
    case "inserted":
      appendText(lane, choice.text, info.reason || "header");
      break;
    case "step_end":
      current.steps += 1;
      endStep(lane, info.step_text || "", info.step, $("history"));
      $("history-empty").hidden = true;
      break;
    case "answer":
      showAnswer(info.answer ?? "", lane.name);
      break;
    case "finish":
      setLaneState(lane, choice.finish_reason);
      break;
  }
}

function countTokens(current, lane, count) {
  current.firstTokenAt ??= performance.now();
  current.tokens += count;
  lane.tokens += count;
  lane.countEl.textContent = lane.tokens;
}

// The usage chunk is exact: token chunks leave out an end-of-sequence token and a character's unfinished bytes.
function applyUsage(current, usage) {
  current.tokens = usage.completion_tokens;
  current.prompt = { tokens: usage.prompt_tokens, cached: usage.prompt_tokens_details?.cached_tokens ?? 0 };
  for (const [index, tokens] of (usage.completion_tokens_per_worker || []).entries()) {
    const lane = current.lanes[index];
    if (lane) lane.countEl.textContent = lane.tokens = tokens;
  }
}

function showAnswer(text, name) {
  $("answer-text").textContent = text.trim() || "(empty)";
  $("answer-by").textContent = `— ${name}`;
  $("answer").hidden = false;
}

// ---- state, counters, errors -------------------------------------------------------------------------------

function resetView() {
  $("lanes").replaceChildren();
  $("history").replaceChildren();
  $("history-empty").hidden = false;
  $("answer").hidden = true;
  updateCounters();
}

function setState(state, label) {
  document.body.dataset.state = state;
  $("stat-status").textContent = label;
  const running = state === "running";
  $("start").disabled = running;
  $("stop").disabled = !running;
}

function end(current, state, label) {
  if (current.endedAt) return;
  current.endedAt = performance.now();
  clearInterval(current.timer);
  updateCounters();
  if (state === "stopped") for (const lane of current.lanes) if (!lane.el.dataset.finish) setLaneState(lane, "abort");
  if (current === run) setState(state, label);
}

function fail(current, error) {
  current.controller.abort(); // a failure on this side must not leave the server generating for nobody
  const message = error instanceof ServerError ? error.message : `Connection lost: ${error.message}`;
  const status = error instanceof ServerError && error.status ? ` (HTTP ${error.status})` : "";
  showError(message + status, error.param);
  end(current, "error", "error");
}

function showError(message, param) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  const field = param ? $(param) : null;
  if (field) {
    field.setAttribute("aria-invalid", "true");
    const details = field.closest("details");
    if (details) details.open = true;
    field.focus();
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
  for (const field of document.querySelectorAll("[aria-invalid]")) field.removeAttribute("aria-invalid");
}

function updateCounters() {
  if (!run) return;
  const now = run.endedAt ?? performance.now();
  const elapsed = (now - run.startedAt) / 1000;
  const generating = run.firstTokenAt === null ? 0 : (now - run.firstTokenAt) / 1000;
  $("stat-elapsed").textContent = `${elapsed.toFixed(1)} s`;
  $("stat-tokens").textContent = run.tokens;
  $("stat-steps").textContent = run.steps;
  $("stat-prompt").textContent = run.prompt ? `${run.prompt.tokens} · ${run.prompt.cached}` : "–";
  $("stat-rate").textContent = generating > 0.2 ? (run.tokens / generating).toFixed(1) : "–";
}

// ---- server status -----------------------------------------------------------------------------------------

// Polled for the page's lifetime: a server can restart its engine, stop, or come back.
async function watchServer() {
  const label = $("server-text");
  const dot = $("server");
  let ready = false;
  try {
    const response = await fetch("health", { cache: "no-store" });
    const health = await response.json().catch(() => ({}));
    ready = response.ok;
    const status = health.status === "loading" && wasReady ? "down" : health.status;
    wasReady ||= ready;
    dot.dataset.health = ready ? "ok" : status === "failed" ? "down" : "loading";
    label.textContent = ready ? `${health.model || "model"} · ready` : SERVER_STATES[status] || "model loading…";
  } catch {
    dot.dataset.health = "down";
    label.textContent = "server unreachable";
  }
  setTimeout(watchServer, ready ? HEALTH_POLL_MS : HEALTH_RETRY_MS);
}

function init() {
  $("run-form").addEventListener("submit", start);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("run-form").requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") stop();
  });
  for (const field of document.querySelectorAll("input, textarea")) {
    field.addEventListener("input", () => field.removeAttribute("aria-invalid"));
  }
  watchServer();
}

init();
