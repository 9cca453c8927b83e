// Browser client. Speaks only the websocket protocol of assistant/protocol.py, plus the REST routes
// (/v1/sessions…, /v1/sessions/{id}/attachments, /healthz). Model output reaches the DOM only through
// markdown.js, which builds nodes from text (never innerHTML) and drops unsafe links.

import { renderMarkdown } from "./markdown.js";
import { Recorder, micSupported } from "./mic.js";
import { downloadExport } from "./export.js";

const TOKEN_KEY = "assistant.token";
const REVIEW_KEY = "assistant.reviewSpeech";
const FINAL = new Set(["completed", "cancelled", "failed", "interrupted"]);
const IMAGE_SKILLS = ["caption", "vqa"];
const SPEECH_SKILLS = ["speech", "asr", "stt", "transcribe", "whisper"];
const SKILL_LABELS = { caption: "caption", vqa: "question", chat: "chat" };
const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const byId = (id) => document.getElementById(id);
const el = {
  thread: byTestId("thread"), composer: byTestId("composer"), sessions: byTestId("sessions"),
  newChat: byTestId("new-chat"), status: byTestId("status"), action: byId("action"), form: byId("composer-form"),
  title: byId("title"), menu: byId("menu"), login: byId("login"), loginForm: byId("login-form"),
  loginError: byId("login-error"), tokenInput: byId("token-input"), attach: byId("attach"), file: byId("file"),
  mic: byId("mic"), level: byId("level"), review: byId("review"), tray: byId("tray"), live: byId("live-transcript"),
  exportMenu: byId("export"), drop: byId("drop"),
};

// models: session_id -> { lastSeq, turns: Map(turn_id -> turn) }, fed only by server events.
// openId: the session shown (null: a new chat, created on its first message).
// pending: event_id of an unanswered turn.create -> its draft; create: { eventId, draft } of a new chat.
const state = {
  token: null, ws: null, connected: false, retries: 0, retryTimer: null,
  conn: "starting…", notice: "", noticeTimer: null,
  openId: null, models: new Map(), titles: new Map(), pending: new Map(), create: null, renaming: false,
  replaying: new Set(), // sessions whose resume is being answered: drawn once, when it ends
  paints: 0, // times the thread was drawn (tests: a replay is drawn once, not per event)
  frames: 0, // text frames received (tests: a replay comes batched)
  skills: new Map(), // name -> {ready, state, detail}
  tray: [], // attachments uploaded for the next turn: {id, localUrl, name, uploading}
  audio: null, // {sessionId, recorder, started, queue, review}
};
const view = new Map(); // turn_id -> DOM nodes, for the open session only
const attachmentInfo = new Map(); // attachment id -> upload response (for thumbnail urls)
const thumbUrls = new Map(); // attachment id -> Promise<blob: url>

let counter = 0;
const newId = () => `c${Date.now().toString(36)}${(counter++).toString(36)}${Math.random().toString(36).slice(2, 8)}`;

// --- token
function readToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(TOKEN_KEY);
}

function askForToken(message = "") {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  closeSocket();
  el.loginError.textContent = message;
  el.login.hidden = false;
  el.tokenInput.focus();
}

el.loginForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const raw = el.tokenInput.value.trim();
  const token = raw.includes("token=") ? decodeURIComponent(raw.split("token=")[1].split("&")[0]) : raw;
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  el.tokenInput.value = "";
  el.login.hidden = true;
  start(token);
});

// --- REST
async function api(path, { method = "GET", body, form, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: form ?? (body === undefined ? undefined : JSON.stringify(body)) });
  if (res.status === 401) {
    askForToken("That token was not accepted.");
    throw new Error("unauthorized");
  }
  if (!res.ok) {
    let detail = null;
    try { detail = (await res.json()).detail; } catch { /* not JSON */ }
    const msg = detail?.message || (typeof detail === "string" ? detail : `${method} ${path} failed (${res.status})`);
    throw Object.assign(new Error(msg), { code: detail?.code, status: res.status });
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

async function refreshSessions() {
  try {
    const { sessions } = await api("/v1/sessions");
    state.titles = new Map(sessions.map((s) => [s.id, s.title]));
    renderSessions(sessions);
  } catch (err) {
    if (state.token) notify(err.message);
  }
}

let refreshTimer = null;
const refreshSoon = () => { clearTimeout(refreshTimer); refreshTimer = setTimeout(refreshSessions, 300); };

function renderSessions(sessions) {
  el.title.textContent = state.titles.get(state.openId) || "New chat";
  // A refresh (a turn naming its session, say) must not take a half-typed rename away: the list
  // is drawn again when the rename ends.
  if (state.renaming) return;
  const sorted = [...sessions].sort((a, b) => (b.updated_at || "").localeCompare(a.updated_at || ""));
  el.sessions.replaceChildren(...sorted.map(sessionItem));
  el.exportMenu.hidden = !state.openId;
}

function sessionItem(s) {
  const li = make("li", "");
  li.dataset.id = s.id;
  li.classList.toggle("active", s.id === state.openId);
  const open = button("session-title", s.title, () => openSession(s.id));
  if (s.id === state.openId) open.setAttribute("aria-current", "page");
  li.append(
    open,
    button("icon", "✎", () => startRename(li, s), `Rename “${s.title}”`),
    button("icon", "×", () => deleteSession(s), `Delete “${s.title}”`),
  );
  return li;
}

function button(className, text, onClick, label) {
  const b = Object.assign(make("button", className), { type: "button", textContent: text, onclick: onClick });
  if (label) { b.setAttribute("aria-label", label); b.title = label; }
  return b;
}

function make(tag, className, testId, parent) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (testId) node.dataset.testid = testId;
  if (parent) parent.append(node);
  return node;
}

function startRename(li, s) {
  const input = Object.assign(make("input", "rename"), { value: s.title, maxLength: 200 });
  input.setAttribute("aria-label", "New title");
  input.dataset.testid = "rename-input";
  li.replaceChildren(input);
  state.renaming = true;
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    const title = input.value.trim();
    if (save && title && title !== s.title) {
      await api(`/v1/sessions/${encodeURIComponent(s.id)}`, { method: "PATCH", body: { title } }).catch((e) => notify(e.message));
    }
    await refreshSessions();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteSession(s) {
  if (!confirm(`Delete “${s.title}”? This cannot be undone.`)) return;
  try {
    await api(`/v1/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" });
  } catch (e) {
    notify(e.message);
  }
  state.models.delete(s.id);
  if (state.openId === s.id) openSession(null);
  refreshSessions();
}

// --- websocket
function connect() {
  clearTimeout(state.retryTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/ws?token=${encodeURIComponent(state.token)}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setConn("connecting…");
  ws.onmessage = (e) => onFrame(e.data);
  ws.onclose = (e) => onClose(ws, e);
}

function closeSocket() {
  const ws = state.ws;
  Object.assign(state, { ws: null, connected: false });
  clearTimeout(state.retryTimer);
  ws?.close();
}

function onClose(ws, e) {
  if (state.ws !== ws) return; // replaced or closed on purpose
  state.replaying.clear(); // no replay comes on this socket any more
  paintSoon();
  if (state.create) restoreDraft(state.create.draft); // its session.created may never come
  for (const draft of state.pending.values()) restoreDraft(draft);
  state.pending.clear();
  if (state.audio) abortRecording("the connection dropped while recording");
  Object.assign(state, { ws: null, connected: false, create: null });
  if (e.code === 4401) return askForToken("That token was not accepted.");
  const delay = state.retries === 0 ? 250 : Math.min(15000, 500 * 2 ** state.retries) * (0.75 + Math.random() / 2);
  state.retries++;
  setConn(`connection lost — reconnecting in ${Math.max(1, Math.ceil(delay / 1000))}s`);
  state.retryTimer = setTimeout(connect, delay);
}

function send(event) {
  if (state.connected && state.ws?.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(event));
    return true;
  }
  notify("not connected — try again in a moment");
  return false;
}

function resume(sessionId) {
  // batch: the replay comes as a few session.replay frames of many events, not a frame per event
  const lastSeq = model(sessionId).lastSeq;
  if (send({ type: "session.resume", event_id: newId(), session_id: sessionId, last_seq: lastSeq, batch: true })) {
    state.replaying.add(sessionId);
  }
}

function model(sessionId) {
  if (!state.models.has(sessionId)) state.models.set(sessionId, { lastSeq: 0, turns: new Map() });
  return state.models.get(sessionId);
}

function turnOf(m, id) {
  if (!m.turns.has(id)) {
    m.turns.set(id, {
      id, text: "", attachmentIds: [], input: "text", reply: "", route: null, status: "running",
      error: null, position: null, usage: null,
    });
  }
  return m.turns.get(id);
}

// --- server events
function onFrame(data) {
  if (typeof data !== "string") return;
  state.frames += 1;
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  onEvent(ev);
}

function onEvent(ev) {
  const special = {
    "server.hello": onHello, "session.resumed": onResumed, "session.replay": (r) => r.events.forEach(onEvent),
    error: onError, pong: () => {},
  }[ev.type];
  if (special) return special(ev);
  if (!ev.session_id) return;
  const m = model(ev.session_id);
  if (typeof ev.seq === "number") {
    if (ev.seq <= m.lastSeq) return; // already seen (replay overlap)
    m.lastSeq = ev.seq;
  }
  const handler = sessionHandlers[ev.type];
  if (handler) handler(ev, m);
  if (ev.turn_id && m.turns.has(ev.turn_id)) renderTurn(ev.session_id, m.turns.get(ev.turn_id));
  paintSoon();
}

const sessionHandlers = {
  "session.created": (ev) => {
    if (!state.create || state.create.eventId !== ev.event_id) return refreshSoon();
    const { draft } = state.create;
    state.create = null;
    state.titles.set(ev.session_id, ev.session.title);
    openSession(ev.session_id, { resume: false });
    sendTurn(ev.session_id, draft);
    refreshSessions(); // show the new chat in the sidebar at once
  },
  "turn.created": (ev, m) => {
    Object.assign(turnOf(m, ev.turn_id), { text: ev.text, attachmentIds: ev.attachment_ids || [], input: ev.input || "text" });
    state.pending.delete(ev.event_id);
    refreshSoon(); // the first turn names the session
  },
  "turn.queued": (ev, m) => { turnOf(m, ev.turn_id).position = ev.position; },
  "turn.routed": (ev, m) => Object.assign(turnOf(m, ev.turn_id), { route: ev, position: null }),
  "response.delta": (ev, m) => { Object.assign(turnOf(m, ev.turn_id), { position: null }).reply += ev.delta; },
  "response.done": (ev, m) => {
    Object.assign(turnOf(m, ev.turn_id), {
      reply: ev.text, status: ev.status, error: ev.error || null, position: null, usage: ev.usage || null,
    });
    // Turns queued behind this one move up.
    for (const t of m.turns.values()) if (t.position && !FINAL.has(t.status)) t.position = Math.max(1, t.position - 1);
    for (const t of m.turns.values()) if (t.position) renderTurn(ev.session_id, t);
    // A chat opened with an image alone is named after the first reply (its caption).
    if (ev.status === "completed" && state.titles.get(ev.session_id) === "New chat") refreshSoon();
  },
  "audio.started": (ev) => onAudioStarted(ev),
  "audio.cleared": () => {},
  "transcript.partial": (ev) => { if (ev.session_id === state.openId) showLive(ev.text, true); },
  "transcript.final": (ev) => onTranscript(ev),
};

function onHello(ev) {
  state.connected = true;
  state.retries = 0;
  if (ev.limits && ev.limits.max_text_chars) el.composer.maxLength = ev.limits.max_text_chars;
  setSkills(ev.skills || []);
  setConn(`connected as ${ev.user}`);
  if (state.openId) resume(state.openId);
}

function setSkills(list) {
  state.skills = new Map(list.map((s) => [s.name, s]));
  updateCapabilities();
  if (list.some((s) => s.state === "loading")) setTimeout(pollHealth, 3000);
}

async function pollHealth() {
  try {
    const res = await fetch("/healthz");
    const { skills } = await res.json();
    setSkills(Object.entries(skills).map(([name, s]) => ({ name, ...s })));
  } catch { /* the websocket reconnect reports connectivity */ }
}

function capability(names, what) {
  const present = names.map((n) => state.skills.get(n)).filter(Boolean);
  if (!present.length) return { ok: false, why: `${what} is not available: this server has no ${names[0]} skill` };
  const ready = present.find((s) => s.ready);
  if (ready) return { ok: true, why: "" };
  const s = present[0];
  const how = { loading: "is still loading", unavailable: "is unavailable", disabled: "is turned off on this server" }[s.state] || `is ${s.state}`;
  return { ok: false, why: `${what} ${how}${s.detail ? `: ${s.detail}` : ""}` };
}

function updateCapabilities() {
  const img = capability(IMAGE_SKILLS, "Image understanding");
  el.attach.disabled = !img.ok;
  el.attach.title = img.ok ? "Attach an image (or paste / drop one)" : img.why;
  const speechNames = SPEECH_SKILLS.filter((n) => state.skills.has(n));
  const sp = micSupported()
    ? capability(speechNames.length ? speechNames : SPEECH_SKILLS, "Speech input")
    : { ok: false, why: "This browser cannot record audio here (needs a secure context: https or localhost)" };
  el.mic.disabled = !sp.ok && !state.audio;
  el.mic.title = sp.ok ? "Hold to talk (or press Ctrl+M to start and stop)" : sp.why;
  el.mic.setAttribute("aria-label", el.mic.title);
  el.attach.setAttribute("aria-label", el.attach.title);
  renderOpenThread();
}

function onResumed(ev) {
  model(ev.session_id).lastSeq = Math.max(model(ev.session_id).lastSeq, ev.last_seq);
  state.replaying.delete(ev.session_id);
  paintSoon();
}

function onError(ev) {
  if (ev.code === "unauthorized") return; // the close (4401) follows
  if (ev.session_id && state.replaying.delete(ev.session_id)) paintSoon();
  if (state.pending.has(ev.event_id)) restoreDraft(state.pending.get(ev.event_id));
  state.pending.delete(ev.event_id);
  if (state.create?.eventId === ev.event_id) {
    restoreDraft(state.create.draft);
    state.create = null;
  }
  if (state.audio && (ev.code.startsWith("audio_") || ev.event_id === state.audio.eventId)) {
    abortRecording();
  }
  if (ev.code === "session_not_found" && ev.session_id) {
    state.models.delete(ev.session_id);
    if (state.openId === ev.session_id) openSession(null);
    refreshSessions();
  }
  notify(ERROR_TEXT[ev.code] ? `${ERROR_TEXT[ev.code]} (${ev.message})` : `${ev.code}: ${ev.message}`);
}

const ERROR_TEXT = {
  turn_queue_full: "Too many messages are waiting in this chat",
  audio_silent: "I could not hear anything",
  audio_empty: "No audio was recorded",
  audio_too_long: "That recording is too long",
  skill_unavailable: "That skill is not available right now",
};

// --- thread
function openSession(sessionId, { resume: doResume = true } = {}) {
  state.openId = sessionId;
  view.clear();
  changed.clear(); // the other session's turns, not drawn yet
  clearBacklog();
  el.thread.replaceChildren();
  if (sessionId) {
    for (const t of model(sessionId).turns.values()) renderTurn(sessionId, t);
    paintTurns();
    if (doResume && state.connected) resume(sessionId);
  }
  for (const li of el.sessions.children) {
    li.classList.toggle("active", li.dataset.id === sessionId);
    li.querySelector(".session-title")?.toggleAttribute("aria-current", li.dataset.id === sessionId);
  }
  el.title.textContent = state.titles.get(sessionId) || "New chat";
  el.exportMenu.hidden = !sessionId;
  document.body.classList.remove("nav-open");
  el.menu.setAttribute("aria-expanded", "false");
  el.thread.scrollTop = el.thread.scrollHeight;
  showLive("");
  updateControls();
  el.composer.focus();
}

function renderOpenThread() {
  if (!state.openId) return;
  for (const t of model(state.openId).turns.values()) renderTurn(state.openId, t);
}

function buildTurn(before = null) {
  const user = make("div", "msg user", "user-message");
  const images = make("div", "images", null, user);
  const userText = make("div", "text", null, user);
  const bot = make("div", "msg assistant", "assistant-message");
  el.thread.insertBefore(user, before);
  el.thread.insertBefore(bot, before);
  const chip = make("details", "chip", "route-chip", bot);
  const summary = make("summary", "", null, chip);
  const menu = make("div", "chip-menu", null, chip);
  const body = make("div", "body md", "assistant-body", bot);
  const note = make("div", "note", "turn-note", bot);
  return { user, images, userText, bot, chip, summary, menu, body, note, rendered: null, imageKey: "" };
}

// Turns changed since the last paint are drawn together, once per animation frame: a replay of a
// long conversation (thousands of events) lays the thread out once, not once per event (which took
// seconds for 300 turns, every event forcing a layout of the whole thread to keep it scrolled).
const changed = new Set();
// fn in the next animation frame, or in 50 ms on a hidden page (which gets no frames); once until it runs
function nextFrame(fn) {
  const s = { frame: 0, timer: 0 };
  s.cancel = () => {
    cancelAnimationFrame(s.frame);
    clearTimeout(s.timer);
    s.frame = s.timer = 0;
  };
  const run = () => { s.cancel(); fn(); };
  s.schedule = () => {
    if (s.frame) return;
    s.frame = requestAnimationFrame(run);
    s.timer = setTimeout(run, 50);
  };
  return s;
}
const paint = nextFrame(paintTurns);
const backlogStep = nextFrame(drawBacklog); // a chunk a frame, so that each is shown before the next is laid out

function renderTurn(sessionId, t) {
  if (!t || sessionId !== state.openId) return;
  changed.add(t);
  paintSoon();
}
function paintSoon() {
  if (!state.replaying.has(state.openId)) paint.schedule();
}
function atEnd() {
  return el.thread.scrollHeight - el.thread.scrollTop - el.thread.clientHeight < 120;
}
function paintTurns() {
  paint.cancel();
  state.paints += 1;
  const nearBottom = atEnd();
  if (!view.size && changed.size > BACKLOG_CHUNK) {
    // An opened conversation: its newest turns now, the older ones above them in the frames that follow
    // (laying out 300 long replies at once took 200 ms on the 2-core CPU, before any was shown).
    backlog = [...changed].slice(0, -BACKLOG_CHUNK);
    for (const t of backlog) pending.add(t);
    backlogStep.schedule();
  }
  for (const t of changed) if (!pending.has(t)) drawTurn(t);
  changed.clear();
  if (nearBottom) el.thread.scrollTop = el.thread.scrollHeight;
  updateControls();
}

const BACKLOG_CHUNK = 40; // turns drawn at a time when a long conversation opens
let backlog = []; // the open conversation's turns not drawn yet, oldest first: they go above the drawn ones
const pending = new Set(); // the turns in backlog

function drawBacklog() {
  state.paints += 1;
  const nearBottom = atEnd();
  const top = el.thread.firstChild;
  for (const t of backlog.splice(-BACKLOG_CHUNK)) {
    pending.delete(t);
    drawTurn(t, top);
  }
  if (nearBottom) el.thread.scrollTop = el.thread.scrollHeight; // else the browser keeps what is in view in place
  if (backlog.length) backlogStep.schedule();
}

function clearBacklog() {
  backlogStep.cancel();
  backlog = [];
  pending.clear();
}

function drawTurn(t, before = null) {
  if (!view.has(t.id)) view.set(t.id, buildTurn(before));
  const v = view.get(t.id);
  setText(v.userText, t.text);
  v.user.dataset.input = t.input;
  v.user.hidden = !t.text && !t.attachmentIds.length;
  const imageKey = t.attachmentIds.join(",");
  if (v.imageKey !== imageKey) {
    v.imageKey = imageKey;
    v.images.replaceChildren(...t.attachmentIds.map(thumbnail));
  }
  renderChip(v, t);
  if (v.rendered !== t.reply) {
    v.rendered = t.reply;
    v.body.replaceChildren(renderMarkdown(t.reply));
  }
  v.bot.dataset.status = t.status;
  v.bot.setAttribute("aria-busy", String(!FINAL.has(t.status)));
  const note = t.position
    ? `Waiting for the server — position ${t.position} in the queue`
    : t.status === "cancelled" ? "Stopped (cancelled)"
      : FINAL.has(t.status) && t.status !== "completed" ? t.status + (t.error ? ` — ${t.error.message}` : "") : "";
  setText(v.note, note);
  v.note.hidden = !note;
}

function renderChip(v, t) {
  v.chip.hidden = !t.route;
  if (!t.route) return;
  const r = t.route;
  const label = SKILL_LABELS[r.skill] || r.skill;
  setText(v.summary, `${label} · ${Math.round(r.confidence * 100)}%${r.overridden ? " · chosen" : ""} — ${r.reason}`);
  v.summary.title = `Answered by the ${r.skill} skill (router confidence ${Math.round(r.confidence * 100)}%): ${r.reason}. Click to answer differently.`;
  const options = [...state.skills.keys()].filter((s) => SKILL_LABELS[s] && (s === "chat" || t.attachmentIds.length || hasImage(t)));
  const key = `${options.join(",")}|${r.skill}|${FINAL.has(t.status)}`;
  if (v.menuKey === key) return;
  v.menuKey = key;
  v.menu.replaceChildren(...options.map((s) => {
    const ready = state.skills.get(s)?.ready;
    const b = button("", `Answer as ${SKILL_LABELS[s]}`, () => { v.chip.open = false; rerun(t, s); });
    b.dataset.skill = s;
    b.disabled = !ready || !FINAL.has(t.status);
    if (s === r.skill) b.classList.add("current");
    return b;
  }));
}

function hasImage(t) {
  return Boolean(t.route?.attachment_id);
}

function rerun(t, skill) {
  if (!state.openId) return;
  const ids = t.attachmentIds.length ? t.attachmentIds : t.route?.attachment_id ? [t.route.attachment_id] : [];
  const eventId = newId();
  state.pending.set(eventId, "");
  send({ type: "turn.create", event_id: eventId, session_id: state.openId, text: t.text, attachment_ids: ids, skill });
}

// --- images
function thumbnail(id) {
  const fig = make("figure", "thumb", "thumbnail");
  const img = make("img", "", null, fig);
  img.alt = "attached image";
  fig.dataset.attachmentId = id;
  thumbUrl(id).then((url) => { if (url) img.src = url; else fig.classList.add("missing"); });
  return fig;
}

function thumbUrl(id) {
  if (!thumbUrls.has(id)) {
    const info = attachmentInfo.get(id);
    const path = info?.thumbnail_url || `/v1/attachments/${encodeURIComponent(id)}/thumbnail`;
    thumbUrls.set(id, api(path, { raw: true }).then(async (res) => URL.createObjectURL(await res.blob())).catch(() => {
      thumbUrls.delete(id);
      return null;
    }));
  }
  return thumbUrls.get(id);
}

async function ensureSession() {
  if (state.openId) return state.openId;
  const s = await api("/v1/sessions", { method: "POST", body: {} });
  state.titles.set(s.id, s.title);
  openSession(s.id);
  refreshSoon();
  return s.id;
}

async function addImages(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || !f.type);
  if (!images.length) return notify("Only images can be attached here");
  if (el.attach.disabled) return notify(el.attach.title);
  let sessionId;
  try { sessionId = await ensureSession(); } catch (e) { return notify(e.message); }
  for (const file of images) {
    const item = { id: null, localUrl: URL.createObjectURL(file), name: file.name || "image", uploading: true };
    state.tray.push(item);
    renderTray();
    const form = new FormData();
    form.append("file", file, file.name || "image");
    try {
      const info = await api(`/v1/sessions/${encodeURIComponent(sessionId)}/attachments`, { method: "POST", form });
      attachmentInfo.set(info.id, info);
      thumbUrls.set(info.id, Promise.resolve(item.localUrl));
      Object.assign(item, { id: info.id, uploading: false });
      if (!state.tray.includes(item)) takeBack(item); // removed while it uploaded
    } catch (e) {
      state.tray = state.tray.filter((x) => x !== item);
      notify(`Could not attach ${item.name}: ${e.message}`);
    }
    renderTray();
  }
  el.composer.focus();
}

// An image removed from the tray is deleted on the server too, unless the tray still holds the same
// bytes (same id) or a turn already sent it (409 attachment_in_use: it stays with the chat).
function takeBack(item) {
  if (!item.id || state.tray.some((x) => x.id === item.id)) return;
  api(`/v1/attachments/${encodeURIComponent(item.id)}`, { method: "DELETE" }).catch(() => {});
}

function renderTray() {
  el.tray.hidden = !state.tray.length;
  el.tray.replaceChildren(...state.tray.map((item) => {
    const fig = make("figure", `thumb${item.uploading ? " uploading" : ""}`, "tray-item");
    const img = make("img", "", null, fig);
    img.src = item.localUrl;
    img.alt = item.name;
    const rm = button("remove", "×", () => {
      state.tray = state.tray.filter((x) => x !== item);
      renderTray();
      takeBack(item);
    }, `Remove ${item.name}`);
    fig.append(rm);
    return fig;
  }));
  updateControls();
}

// --- speech
async function startRecording() {
  if (state.audio || el.mic.disabled) return;
  const review = el.review.checked;
  const audio = { sessionId: null, recorder: null, started: false, queue: [], review, eventId: newId(), stopping: false };
  state.audio = audio;
  el.mic.classList.add("recording");
  el.mic.setAttribute("aria-pressed", "true");
  showLive("Listening…", true);
  try {
    audio.sessionId = await ensureSession();
    audio.recorder = new Recorder({
      onChunk: (buf) => {
        if (audio.started && state.ws?.readyState === WebSocket.OPEN) state.ws.send(buf);
        else audio.queue.push(buf);
      },
      onLevel: (lvl) => { el.level.style.setProperty("--level", lvl.toFixed(3)); },
    });
    if (!send({ type: "audio.start", event_id: audio.eventId, session_id: audio.sessionId, format: "pcm16", sample_rate: 16000, review })) {
      throw new Error("not connected");
    }
    await audio.recorder.start();
    if (audio.stopRequested) stopRecording();
  } catch (e) {
    abortRecording(e.name === "NotAllowedError" ? "microphone permission was denied" : e.message);
  }
}

function onAudioStarted(ev) {
  const audio = state.audio;
  if (!audio || ev.session_id !== audio.sessionId) return;
  audio.started = true;
  audio.maxSeconds = ev.max_seconds;
  for (const buf of audio.queue) state.ws.send(buf);
  audio.queue = [];
  if (ev.max_seconds) audio.limitTimer = setTimeout(stopRecording, ev.max_seconds * 1000 - 200);
}

async function stopRecording() {
  const audio = state.audio;
  if (!audio || audio.stopping) return;
  if (!audio.recorder?.ctx) { audio.stopRequested = true; return; } // still starting
  audio.stopping = true;
  clearTimeout(audio.limitTimer);
  await audio.recorder.stop();
  const flushAndCommit = () => {
    for (const buf of audio.queue) state.ws?.send(buf);
    audio.queue = [];
    send({ type: "audio.commit", event_id: newId(), session_id: audio.sessionId });
  };
  if (audio.started) flushAndCommit();
  else audio.commitWhenStarted = setTimeout(flushAndCommit, 1500);
  showLive("Transcribing…", true);
  endRecordingUi();
}

function abortRecording(why) {
  const audio = state.audio;
  if (!audio) return;
  clearTimeout(audio.limitTimer);
  audio.recorder?.stop();
  if (audio.started && state.connected) send({ type: "audio.clear", event_id: newId(), session_id: audio.sessionId });
  state.audio = null;
  endRecordingUi();
  showLive("");
  if (why) notify(`Recording stopped: ${why}`);
  updateCapabilities();
}

function endRecordingUi() {
  el.mic.classList.remove("recording");
  el.mic.setAttribute("aria-pressed", "false");
  el.level.style.setProperty("--level", "0");
}

function onTranscript(ev) {
  const audio = state.audio;
  if (audio && ev.session_id === audio.sessionId) state.audio = null;
  if (ev.session_id !== state.openId) return;
  if (ev.review || !ev.turn_id) {
    showLive("");
    el.composer.value = el.composer.value.trim() ? `${el.composer.value.trimEnd()} ${ev.text}` : ev.text;
    autosize();
    el.composer.focus();
    notify("Transcript ready — edit it and press Enter to send", { info: true });
  } else {
    showLive(`🎤 ${ev.text}`, false);
    setTimeout(() => showLive(""), 2500);
  }
  updateCapabilities();
}

function showLive(text, pending = false) {
  el.live.hidden = !text;
  el.live.textContent = text;
  el.live.classList.toggle("pending", pending);
}

// --- composer and status
const liveTurns = () => [...(state.openId ? model(state.openId).turns.values() : [])].filter((t) => !FINAL.has(t.status));
const readyAttachments = () => state.tray.filter((x) => x.id);

function updateControls() {
  const running = liveTurns().length > 0;
  const hasDraft = Boolean(el.composer.value.trim()) || readyAttachments().length > 0;
  const stopMode = running && !hasDraft;
  setText(el.action, stopMode ? "Stop" : "Send");
  el.action.dataset.testid = stopMode ? "stop" : "send";
  el.action.setAttribute("aria-label", stopMode ? "Stop the reply (Esc)" : "Send (Enter)");
  el.action.classList.toggle("stop", stopMode);
  el.action.disabled = !state.connected || (!stopMode && !hasDraft) || state.tray.some((x) => x.uploading);
  renderStatus();
}

// Set only when it changes: a new text node lays out its box again, and each paint of a streaming reply
// (updateControls) did that here: a second layout of the whole page per paint, 3-4 ms in a 300-turn thread.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function renderStatus() {
  const queued = liveTurns().filter((t) => t.position).pop();
  const parts = [state.conn];
  if (queued) parts.push(`server busy: your message is number ${queued.position} in the queue`);
  if (state.notice) parts.push(state.notice);
  setText(el.status, parts.join(" · "));
  el.status.classList.toggle("error", Boolean(state.notice) && !state.noticeInfo);
  el.status.classList.toggle("offline", !state.connected);
}

const setConn = (text) => { state.conn = text; updateControls(); };

function notify(text, { info = false } = {}) {
  state.notice = text;
  state.noticeInfo = info;
  clearTimeout(state.noticeTimer);
  state.noticeTimer = setTimeout(() => { state.notice = ""; renderStatus(); }, 8000);
  renderStatus();
}

function restoreDraft(draft) {
  if (!draft) return;
  const text = typeof draft === "string" ? draft : draft.text;
  if (text && !el.composer.value.trim()) el.composer.value = text;
  if (typeof draft === "object" && draft.tray?.length && !state.tray.length) { state.tray = draft.tray; renderTray(); }
  autosize();
}

function sendTurn(sessionId, draft) {
  const eventId = newId();
  state.pending.set(eventId, draft);
  send({ type: "turn.create", event_id: eventId, session_id: sessionId, text: draft.text, attachment_ids: draft.tray.map((x) => x.id) });
}

function submit() {
  const text = el.composer.value;
  const tray = readyAttachments();
  if ((!text.trim() && !tray.length) || !state.connected || state.tray.some((x) => x.uploading)) return;
  const draft = { text, tray };
  el.composer.value = "";
  state.tray = [];
  renderTray();
  autosize();
  if (state.openId) return sendTurn(state.openId, draft);
  if (state.create) return restoreDraft(draft); // a new chat is already being created
  state.create = { eventId: newId(), draft };
  send({ type: "session.create", event_id: state.create.eventId });
}

function stop() {
  // Queued turns first (newest first), then the running one, so nothing starts in between.
  for (const t of liveTurns().reverse()) {
    send({ type: "response.cancel", event_id: newId(), session_id: state.openId, turn_id: t.id });
  }
}

function autosize() {
  el.composer.style.height = "auto";
  el.composer.style.height = `${Math.min(el.composer.scrollHeight, 200)}px`;
  updateControls();
}

el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (el.action.dataset.testid === "stop") stop(); else submit();
});
el.composer.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit(); // while a turn runs, this queues the next one
  } else if (e.key === "Escape" && liveTurns().length) {
    e.preventDefault();
    stop();
  }
});
el.composer.addEventListener("input", autosize);
el.composer.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
  if (files.length) { e.preventDefault(); addImages(files); }
});
el.attach.addEventListener("click", () => el.file.click());
el.file.addEventListener("change", () => { addImages(el.file.files); el.file.value = ""; });

let dragDepth = 0;
window.addEventListener("dragenter", (e) => {
  if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
  dragDepth++;
  el.drop.hidden = false;
});
window.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; el.drop.hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  el.drop.hidden = true;
  if (e.dataTransfer?.files?.length) addImages(e.dataTransfer.files);
});

// Hold to talk: pointer on the button, Space/Enter held on the focused button, or Ctrl+M to toggle.
el.mic.addEventListener("pointerdown", (e) => { if (e.button === 0) { el.mic.setPointerCapture(e.pointerId); startRecording(); } });
el.mic.addEventListener("pointerup", () => stopRecording());
el.mic.addEventListener("pointercancel", () => stopRecording());
el.mic.addEventListener("keydown", (e) => {
  if ((e.key === " " || e.key === "Enter") && !e.repeat) { e.preventDefault(); startRecording(); }
});
el.mic.addEventListener("keyup", (e) => { if (e.key === " " || e.key === "Enter") { e.preventDefault(); stopRecording(); } });
el.mic.addEventListener("click", (e) => e.preventDefault());
window.addEventListener("keydown", (e) => {
  if (e.ctrlKey && !e.shiftKey && !e.altKey && e.key.toLowerCase() === "m") {
    e.preventDefault();
    if (state.audio) stopRecording(); else startRecording();
  }
});
el.review.checked = localStorage.getItem(REVIEW_KEY) === "1";
el.review.addEventListener("change", () => localStorage.setItem(REVIEW_KEY, el.review.checked ? "1" : "0"));

el.exportMenu.addEventListener("click", async (e) => {
  const fmt = e.target.closest("button[data-format]")?.dataset.format;
  if (!fmt || !state.openId) return;
  el.exportMenu.open = false;
  try {
    await downloadExport(api, state.openId, fmt);
  } catch (err) {
    notify(`Export failed: ${err.message}`);
  }
});

el.newChat.addEventListener("click", () => openSession(null));
el.menu.addEventListener("click", () => {
  const open = document.body.classList.toggle("nav-open");
  el.menu.setAttribute("aria-expanded", String(open));
  if (open) el.newChat.focus();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && document.body.classList.contains("nav-open")) {
    document.body.classList.remove("nav-open");
    el.menu.setAttribute("aria-expanded", "false");
    el.menu.focus();
  }
});
el.thread.addEventListener("click", () => document.body.classList.remove("nav-open"));
window.addEventListener("online", () => { if (state.token && !state.ws) connect(); });
setInterval(() => { if (state.connected) send({ type: "ping" }); }, 30000);

// A small hook for tests and debugging: drop the socket as a network failure would.
window.__assistant = {
  state,
  get socket() { return state.ws; },
  dropConnection() { state.ws?.close(4000, "dropped by the debug hook"); },
};

// --- start
function start(token) {
  state.token = token;
  connect();
  refreshSessions();
  updateControls();
  updateCapabilities();
}

const token = readToken();
if (token) start(token); else askForToken();
