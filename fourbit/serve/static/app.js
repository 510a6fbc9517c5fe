// The fourbit web page: chat with streamed tokens, ask your documents, upload a document.
// Plain JavaScript, no build step, nothing fetched from elsewhere; text is inserted with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("fourbit-api-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("fourbit-api-key", keyInput.value); loadModels(); });

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function failure(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

// Read a server-sent-event stream; call onData with each parsed `data:` payload until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        onData(parsed);
      }
    }
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers(false) });
  if (!response.ok) { showError(await failure(response)); return; }
  const select = $("model");
  select.replaceChildren();
  for (const m of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    select.appendChild(option);
  }
  showError("");
}

// ---- chat ----
const history = [];

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").appendChild(div);
  return div;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  $("chat-send").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true, max_tokens: 256 }),
    });
    if (!response.ok) throw new Error(await failure(response));
    await readEvents(response, (chunk) => {
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) out.textContent += delta.content;
    });
    history.push({ role: "assistant", content: out.textContent });
    out.dataset.done = "true";
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    $("chat-send").disabled = false;
  }
});

// Enter sends, Shift+Enter starts a new line (and Enter while an input method composes a word does neither).
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
  event.preventDefault();
  if (!$("chat-send").disabled) $("chat-form").requestSubmit();
});

// ---- ask your documents ----
// The parent's text with each evidence sentence wrapped in <mark> (built as DOM nodes, never as HTML).
function highlighted(text, sentences) {
  const flat = text.split(/\s+/).join(" ");
  const spans = [];
  for (const s of sentences) {
    let at = flat.indexOf(s);
    while (at >= 0) { spans.push([at, at + s.length]); at = flat.indexOf(s, at + s.length); }
  }
  spans.sort((a, b) => a[0] - b[0]);
  const fragment = document.createDocumentFragment();
  let pos = 0;
  for (const [start, end] of spans) {
    if (start < pos) continue;
    fragment.appendChild(document.createTextNode(flat.slice(pos, start)));
    const mark = document.createElement("mark");
    mark.textContent = flat.slice(start, end);
    fragment.appendChild(mark);
    pos = end;
  }
  fragment.appendChild(document.createTextNode(flat.slice(pos)));
  return fragment;
}

function showSources(found) {
  const evidence = $("evidence");
  evidence.replaceChildren();
  for (const e of found.evidence) {
    const li = document.createElement("li");
    li.textContent = e.text + " (" + e.source + ", page " + e.page + ")";
    evidence.appendChild(li);
  }
  const sources = $("sources");
  sources.replaceChildren();
  for (const s of found.sources) {
    const div = document.createElement("div");
    div.className = "source";
    const where = document.createElement("div");
    where.className = "where";
    where.textContent = s.source + ", page " + s.page + " (score " + s.score + ")";
    const body = document.createElement("div");
    body.appendChild(highlighted(s.text, found.evidence.filter((e) => e.parent_id === s.id).map((e) => e.text)));
    div.append(where, body);
    sources.appendChild(div);
  }
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const answer = $("answer");
  answer.textContent = "";
  delete answer.dataset.done;
  $("ask").disabled = true;
  try {
    const response = await fetch("/v1/answers", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ question, retriever: $("retriever").value, top_k: Number($("top-k").value),
                             model: $("model").value || null, stream: true }),
    });
    if (!response.ok) throw new Error(await failure(response));
    await readEvents(response, (e) => {
      if (e.type === "sources") showSources(e);
      else if (e.type === "delta") answer.textContent += e.text;
      else if (e.type === "done") {
        // The checked answer replaces the streamed one: an unsupported answer becomes the best evidence
        // sentence, below the note that says so.
        answer.textContent = e.note ? `${e.note}\n${e.answer}` : e.answer;
        answer.dataset.supported = String(e.supported);
        answer.dataset.done = "true";
      }
    });
    showError("");
  } catch (err) {
    showError(err.message);
  } finally {
    $("ask").disabled = false;
  }
});

// ---- upload ----
$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  const status = $("upload-status");
  status.textContent = "uploading " + file.name + " ...";
  const form = new FormData();
  form.append("file", file);
  const response = await fetch("/v1/documents", { method: "POST", headers: headers(false), body: form });
  if (!response.ok) { status.textContent = ""; showError(await failure(response)); return; }
  const report = await response.json();
  status.textContent = report.filename + ": " + report.status + " (" + report.parents + " parts)";
  showError("");
});

loadModels();
