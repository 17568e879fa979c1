// Lanes and history: each worker's current step, growing as events arrive, and the finished steps in the order
// they finished. A lane keeps its current step as segments {text, reason}: reason is null for sampled text, else
// why the engine inserted it (header, intervention, finisher), which decides its style.

const DEFAULT_NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi"];
const FINISH_LABELS = { stop: "done", length: "budget used", abort: "stopped" };
const NUM_COLORS = 8;

/** One lane per worker in `container` (emptied first); returns the lane objects in worker order. */
export function buildLanes(container, workers) {
  container.replaceChildren();
  const lanes = [];
  for (let worker = 0; worker < workers; worker++) {
    const name = DEFAULT_NAMES[worker] || `Worker ${worker + 1}`;
    const el = document.createElement("article");
    el.className = `lane w${worker % NUM_COLORS}`;
    el.dataset.worker = worker;
    el.innerHTML =
      '<header><span class="swatch" aria-hidden="true"></span><h3 class="name"></h3>' +
      '<span class="meta">step <b class="step-num">1</b> · <b class="count">0</b> tokens</span>' +
      '<span class="lane-state"></span></header><div class="lane-text" tabindex="0"></div>';
    const lane = {
      worker,
      name,
      el,
      tokens: 0,
      segments: [], // the current step: {text, reason} with reason null for sampled text
      textEl: el.querySelector(".lane-text"),
      stepEl: el.querySelector(".step-num"),
      countEl: el.querySelector(".count"),
    };
    renameLane(lane, name);
    container.append(el);
    lanes.push(lane);
  }
  return lanes;
}

export function renameLane(lane, name) {
  lane.name = name;
  lane.el.querySelector(".name").textContent = name;
  lane.el.setAttribute("aria-label", `${name}'s current step`);
}

export function appendText(lane, text, reason) {
  if (!text) return;
  lane.segments.push({ text, reason });
  const box = lane.textEl;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  const shown = box.childNodes.length === 0 ? text.replace(/^\s+/, "") : text;
  const last = box.lastElementChild;
  if (reason === null && last && last.classList.contains("sample")) last.firstChild.appendData(shown);
  else if (shown) box.append(segmentNode(shown, reason));
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function segmentNode(text, reason) {
  const span = document.createElement("span");
  if (reason === null) {
    span.className = "sample";
    span.append(document.createTextNode(text));
  } else {
    span.className = `ins ins-${reason}`;
    span.title = `inserted by the engine (${reason})`;
    span.append(document.createTextNode(reason === "header" ? text.replaceAll("**", "") : text));
  }
  return span;
}

// A finished step leaves the lane for the history. step_text is the lane's text without the whitespace around
// it: the matching part of the lane's segments moves with its styling, whatever followed it stays in the lane
// as the start of the next step. Text the lane never showed goes to the history as it is.
export function endStep(lane, stepText, step, history) {
  const laneText = lane.segments.map((s) => s.text).join("");
  const trimmed = stepText.trim();
  const start = trimmed ? laneText.indexOf(trimmed) : -1;
  if (start < 0) {
    addHistory(history, lane, [{ text: stepText, reason: null }], step);
    lane.segments = [];
  } else {
    addHistory(history, lane, sliceSegments(lane.segments, start, start + trimmed.length), step);
    lane.segments = sliceSegments(lane.segments, start + trimmed.length, laneText.length);
  }
  const remaining = lane.segments;
  lane.segments = [];
  lane.textEl.replaceChildren();
  for (const segment of remaining) appendText(lane, segment.text, segment.reason);
}

function sliceSegments(segments, from, to) {
  const result = [];
  let offset = 0;
  for (const { text, reason } of segments) {
    const piece = text.slice(Math.max(0, from - offset), Math.max(0, to - offset));
    if (piece) result.push({ text: piece, reason });
    offset += text.length;
  }
  return result;
}

function addHistory(history, lane, segments, step) {
  const item = document.createElement("li");
  item.className = `step w${lane.worker % NUM_COLORS}`;
  item.dataset.worker = lane.worker;
  const tag = document.createElement("div");
  tag.className = "tag";
  tag.innerHTML = '<span class="name"></span><span class="num"></span>';
  tag.firstChild.textContent = lane.name;
  tag.lastChild.textContent = step ? `step ${step}` : "";
  const body = document.createElement("div");
  body.className = "step-text";
  for (const segment of segments) body.append(segmentNode(segment.text, segment.reason));
  item.append(tag, body);
  history.append(item);
}

export function setLaneState(lane, reason) {
  lane.el.dataset.finish = reason || "stop";
  lane.el.querySelector(".lane-state").textContent = FINISH_LABELS[reason] || reason || "";
}
