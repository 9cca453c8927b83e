// Minimal browser client. Speaks only the websocket protocol of assistant/protocol.py, plus the
// /v1/sessions REST routes. Model output is only ever inserted with textContent.

const TOKEN_KEY = "assistant.token";
const FINAL = new Set(["completed", "cancelled", "failed", "interrupted"]);
const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const byId = (id) => document.getElementById(id);
const el = {
  thread: byTestId("thread"), composer: byTestId("composer"), sessions: byTestId("sessions"),
  newChat: byTestId("new-chat"), status: byTestId("status"), action: byId("action"), form: byId("composer-form"),
  title: byId("title"), menu: byId("menu"), login: byId("login"), loginForm: byId("login-form"),
  loginError: byId("login-error"), tokenInput: byId("token-input"),
};

// models: session_id -> { lastSeq, turns: Map(turn_id -> turn) }, fed only by server events.
// openId: the session shown (null: a new chat, created on its first message).
// pending: event_id of an unanswered turn.create -> its text; create: { eventId, text } of a new chat.
const state = {
  token: null, ws: null, connected: false, retries: 0, retryTimer: null,
  conn: "starting…", notice: "", noticeTimer: null, // the status line: connection, then a transient notice
  openId: null, models: new Map(), titles: new Map(), pending: new Map(), create: null,
};
const view = new Map(); // turn_id -> DOM nodes, for the open session only

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
async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) {
    askForToken("That token was not accepted.");
    throw new Error("unauthorized");
  }
  if (!res.ok) throw new Error(`${method} ${path} failed (${res.status})`);
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
  el.sessions.replaceChildren(...sessions.map(sessionItem));
  el.title.textContent = state.titles.get(state.openId) || "New chat";
}

function sessionItem(s) {
  const li = make("li", "");
  li.dataset.id = s.id;
  li.classList.toggle("active", s.id === state.openId);
  li.append(
    button("session-title", s.title, () => openSession(s.id)),
    button("icon", "✎", () => renameSession(s), `Rename “${s.title}”`),
    button("icon", "×", () => deleteSession(s), `Delete “${s.title}”`),
  );
  return li;
}

function button(className, text, onClick, label) {
  const b = Object.assign(make("button", className), { type: "button", textContent: text, onclick: onClick });
  if (label) b.setAttribute("aria-label", label);
  return b;
}

function make(tag, className, testId, parent) {
  const node = document.createElement(tag);
  node.className = className;
  if (testId) node.dataset.testid = testId;
  if (parent) parent.append(node);
  return node;
}

async function renameSession(s) {
  const title = prompt("Rename chat", s.title);
  if (!title || !title.trim()) return;
  await api(`/v1/sessions/${encodeURIComponent(s.id)}`, { method: "PATCH", body: { title: title.trim() } }).catch((e) => notify(e.message));
  refreshSessions();
}

async function deleteSession(s) {
  if (!confirm(`Delete “${s.title}”?`)) return;
  await api(`/v1/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" }).catch((e) => notify(e.message));
  state.models.delete(s.id);
  if (state.openId === s.id) openSession(null);
  refreshSessions();
}

// --- websocket
function connect() {
  clearTimeout(state.retryTimer);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/ws?token=${encodeURIComponent(state.token)}`);
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
  if (state.create) restoreDraft(state.create.text); // its session.created may never come
  Object.assign(state, { ws: null, connected: false, create: null });
  if (e.code === 4401) return askForToken("That token was not accepted.");
  const delay = Math.min(15000, 500 * 2 ** state.retries++) * (0.75 + Math.random() / 2);
  setConn(`disconnected — reconnecting in ${Math.ceil(delay / 1000)}s`);
  state.retryTimer = setTimeout(connect, delay);
}

function send(event) {
  if (state.connected) state.ws.send(JSON.stringify(event));
  else notify("not connected");
}

function resume(sessionId) {
  send({ type: "session.resume", event_id: newId(), session_id: sessionId, last_seq: model(sessionId).lastSeq });
}

function model(sessionId) {
  if (!state.models.has(sessionId)) state.models.set(sessionId, { lastSeq: 0, turns: new Map() });
  return state.models.get(sessionId);
}

function turnOf(m, id) {
  if (!m.turns.has(id)) m.turns.set(id, { id, text: "", reply: "", route: null, status: "running", error: null, position: null });
  return m.turns.get(id);
}

// --- server events
function onFrame(data) {
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  const special = { "server.hello": onHello, "session.resumed": onResumed, error: onError, pong: () => {} }[ev.type];
  if (special) return special(ev);
  if (!ev.session_id) return;
  const m = model(ev.session_id);
  if (typeof ev.seq === "number") {
    if (ev.seq <= m.lastSeq) return; // already seen (replay overlap)
    m.lastSeq = ev.seq;
  }
  const handler = sessionHandlers[ev.type];
  if (handler) handler(ev, m);
  if (ev.turn_id) renderTurn(ev.session_id, m.turns.get(ev.turn_id));
  updateControls();
}

const sessionHandlers = {
  "session.created": (ev) => {
    if (!state.create || state.create.eventId !== ev.event_id) return refreshSoon();
    const { text } = state.create;
    state.create = null;
    openSession(ev.session_id, { resume: false });
    sendTurn(ev.session_id, text);
    refreshSoon();
  },
  "turn.created": (ev, m) => {
    turnOf(m, ev.turn_id).text = ev.text;
    state.pending.delete(ev.event_id);
    refreshSoon(); // the first turn names the session
  },
  "turn.queued": (ev, m) => { turnOf(m, ev.turn_id).position = ev.position; },
  "turn.routed": (ev, m) => Object.assign(turnOf(m, ev.turn_id), { route: ev, position: null }),
  "response.delta": (ev, m) => Object.assign(turnOf(m, ev.turn_id), { position: null }).reply += ev.delta,
  "response.done": (ev, m) =>
    Object.assign(turnOf(m, ev.turn_id), { reply: ev.text, status: ev.status, error: ev.error || null, position: null }),
};

function onHello(ev) {
  state.connected = true;
  state.retries = 0;
  if (ev.limits && ev.limits.max_text_chars) el.composer.maxLength = ev.limits.max_text_chars;
  const waiting = (ev.skills || []).filter((s) => !s.ready).map((s) => `${s.name}: ${s.state}`);
  setConn(`connected as ${ev.user}${waiting.length ? ` · ${waiting.join(", ")}` : ""}`);
  if (state.openId) resume(state.openId);
}

function onResumed(ev) {
  model(ev.session_id).lastSeq = Math.max(model(ev.session_id).lastSeq, ev.last_seq);
  updateControls();
}

function onError(ev) {
  if (ev.code === "unauthorized") return; // the close (4401) follows
  if (state.pending.has(ev.event_id)) restoreDraft(state.pending.get(ev.event_id));
  state.pending.delete(ev.event_id);
  if (state.create?.eventId === ev.event_id) {
    restoreDraft(state.create.text);
    state.create = null;
  }
  if (ev.code === "session_not_found" && ev.session_id) {
    state.models.delete(ev.session_id);
    if (state.openId === ev.session_id) openSession(null);
    refreshSessions();
  }
  notify(`${ev.code}: ${ev.message}`);
}

// --- thread
function openSession(sessionId, { resume: doResume = true } = {}) {
  state.openId = sessionId;
  view.clear();
  el.thread.replaceChildren();
  if (sessionId) {
    for (const t of model(sessionId).turns.values()) renderTurn(sessionId, t);
    if (doResume && state.connected) resume(sessionId);
  }
  for (const li of el.sessions.children) li.classList.toggle("active", li.dataset.id === sessionId);
  el.title.textContent = state.titles.get(sessionId) || "New chat";
  document.body.classList.remove("nav-open");
  el.menu.setAttribute("aria-expanded", "false");
  el.thread.scrollTop = el.thread.scrollHeight;
  updateControls();
  el.composer.focus();
}

function buildTurn() {
  const user = make("div", "msg user", "user-message", el.thread);
  const bot = make("div", "msg assistant", "assistant-message", el.thread);
  const chip = make("div", "chip", "route-chip", bot);
  return { user, bot, chip, body: make("div", "body", null, bot), note: make("div", "note", null, bot) };
}

function renderTurn(sessionId, t) {
  if (!t || sessionId !== state.openId) return;
  const nearBottom = el.thread.scrollHeight - el.thread.scrollTop - el.thread.clientHeight < 80;
  if (!view.has(t.id)) view.set(t.id, buildTurn());
  const v = view.get(t.id);
  v.user.textContent = t.text;
  v.user.hidden = !t.text;
  v.chip.hidden = !t.route;
  if (t.route) v.chip.textContent = `${t.route.skill} · ${Math.round(t.route.confidence * 100)}% — ${t.route.reason}`;
  v.body.textContent = t.reply;
  v.bot.dataset.status = t.status;
  const note = t.position ? `queued (position ${t.position})` : FINAL.has(t.status) && t.status !== "completed"
    ? t.status + (t.error ? ` — ${t.error.message}` : "") : "";
  v.note.textContent = note;
  v.note.hidden = !note;
  if (nearBottom) el.thread.scrollTop = el.thread.scrollHeight;
}

// --- composer and status
const liveTurns = () => [...(state.openId ? model(state.openId).turns.values() : [])].filter((t) => !FINAL.has(t.status));

function updateControls() {
  const running = liveTurns().length > 0;
  el.action.textContent = running ? "Stop" : "Send";
  el.action.dataset.testid = running ? "stop" : "send";
  el.action.classList.toggle("stop", running);
  el.action.disabled = !state.connected;
  renderStatus();
}

function renderStatus() {
  const queued = liveTurns().filter((t) => t.position).pop();
  const parts = [state.conn];
  if (queued) parts.push(`queued (position ${queued.position})`);
  if (state.notice) parts.push(state.notice);
  el.status.textContent = parts.join(" · ");
  el.status.classList.toggle("error", Boolean(state.notice));
}

const setConn = (text) => { state.conn = text; updateControls(); };

function notify(text) {
  state.notice = text;
  clearTimeout(state.noticeTimer);
  state.noticeTimer = setTimeout(() => { state.notice = ""; renderStatus(); }, 8000);
  renderStatus();
}

const restoreDraft = (text) => { if (!el.composer.value.trim()) el.composer.value = text; };

function sendTurn(sessionId, text) {
  const eventId = newId();
  state.pending.set(eventId, text);
  send({ type: "turn.create", event_id: eventId, session_id: sessionId, text });
}

function submit() {
  const text = el.composer.value;
  if (!text.trim() || !state.connected) return;
  el.composer.value = "";
  autosize();
  if (state.openId) return sendTurn(state.openId, text);
  if (state.create) return restoreDraft(text); // a new chat is already being created
  state.create = { eventId: newId(), text };
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
}

el.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (el.action.dataset.testid === "stop") stop(); else submit();
});
el.composer.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit(); // while a turn runs, this queues the next one
  }
});
el.composer.addEventListener("input", autosize);
el.newChat.addEventListener("click", () => openSession(null));
el.menu.addEventListener("click", () => {
  const open = document.body.classList.toggle("nav-open");
  el.menu.setAttribute("aria-expanded", String(open));
});
el.thread.addEventListener("click", () => document.body.classList.remove("nav-open"));
window.addEventListener("online", () => { if (state.token && !state.ws) connect(); });
setInterval(() => { if (state.connected) send({ type: "ping" }); }, 30000);

// --- start
function start(token) {
  state.token = token;
  connect();
  refreshSessions();
  updateControls();
}

const token = readToken();
if (token) start(token); else askForToken();
