// The chat page's client: keeps the conversation (in localStorage too, so a reload keeps it), sends it over
// /ws/chat/, renders the reply's Markdown safely as tokens stream in (markdown.js), and shows time to first
// token and decode speed for every reply.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = $("log").dataset.store; // one conversation per signed-in user of this browser
const history = []; // [{role, content, meta?}] of the whole conversation; role and content go to the server
let socket = null;
let reply = null; // the reply being streamed: {node, text}
let retryMs = 500;

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
  let opened = false;
  socket.onopen = () => { opened = true; retryMs = 500; };
  socket.onmessage = (msg) => handle(JSON.parse(msg.data));
  socket.onclose = () => {
    if (reply) failReply();
    // A refused handshake (signed out, or in no tenant) closes before it ever opened.
    const why = opened ? "disconnected" : "could not connect (signed in, and a member of a tenant?)";
    setStatus(`${why}; retrying in ${retryMs / 1000}s`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

function handle(event) {
  if (event.type === "ready") {
    setStatus(`connected: ${event.model.model} (${event.model.label})`);
    $("model").options[0].dataset.label = event.model.label;
    showLabel();
  } else if (event.type === "delta" && reply) {
    reply.text += event.text;
    reply.node.innerHTML = renderMarkdown(reply.text);
  } else if (event.type === "done" && reply) {
    const meta = metaLine(event);
    history.push({ role: "assistant", content: reply.text, meta });
    addMeta(reply.node, meta);
    save();
    endReply();
  } else if (event.type === "error") {
    if (reply) failReply();
    addMessage("error", `${event.code}: ${event.message}`);
  }
}

function metaLine(done) {
  const server = done.timings || {};
  const client = done.client || {};
  const parts = [`${done.usage.completion_tokens} tokens`];
  if (client.ttft_s != null) parts.push(`TTFT ${(client.ttft_s * 1000).toFixed(0)} ms`);
  if (client.tokens_per_s != null) parts.push(`${client.tokens_per_s.toFixed(1)} tokens/s`);
  if (server.queued_s != null) parts.push(`queued ${(server.queued_s * 1000).toFixed(0)} ms`);
  if (done.status !== "completed") parts.push(done.status);
  return parts.join(" · ");
}

function send(text) {
  if (!socket || socket.readyState !== WebSocket.OPEN || reply) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  save();
  reply = { node: addMessage("assistant", ""), text: "" };
  $("send").disabled = true;
  $("stop").disabled = false;
  socket.send(JSON.stringify({
    model: $("model").value,
    messages: history.map(({ role, content }) => ({ role, content })),
    params: {
      temperature: Number($("temperature").value),
      top_p: Number($("top_p").value),
      max_tokens: parseInt($("max_tokens").value, 10),
    },
  }));
}

// The reply ended in an error or a lost connection: no empty bubble stays, and the unanswered question
// leaves the history (it is still on screen), so the next turn does not send two user turns in a row.
function failReply() {
  if (!reply.text) reply.node.remove();
  if (history.length && history[history.length - 1].role === "user") history.pop();
  save();
  endReply();
}

function endReply() {
  reply = null;
  $("send").disabled = false;
  $("stop").disabled = true;
}

function addMessage(role, text) {
  const node = document.createElement("div");
  node.className = `msg ${role}`;
  if (role === "assistant") node.innerHTML = renderMarkdown(text);
  else node.textContent = text;
  $("log").appendChild(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function addMeta(node, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = text;
  node.after(meta);
}

function save() {
  try { localStorage.setItem(STORE, JSON.stringify(history)); } catch { /* private mode or full: keep going */ }
}

function restore() {
  let saved = [];
  try { saved = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { saved = []; }
  for (const turn of Array.isArray(saved) ? saved : []) {
    if (typeof turn.content !== "string" || !["user", "assistant"].includes(turn.role)) continue;
    history.push(turn);
    const node = addMessage(turn.role, turn.content);
    if (turn.meta) addMeta(node, String(turn.meta));
  }
}

function showLabel() {
  const option = $("model").selectedOptions[0];
  if (option) $("model-label").textContent = `${option.value} · ${option.dataset.label}`;
}

function setStatus(text) { $("status").textContent = text; }

$("compose").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (text) { send(text); $("prompt").value = ""; }
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("compose").requestSubmit(); }
});
$("stop").addEventListener("click", () => socket && socket.send(JSON.stringify({ type: "cancel" })));
$("reset").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); save(); });
$("model").addEventListener("change", showLabel);

restore();
connect();
