// inferd's side-by-side page: one question to every ticked model at once, answers streamed into
// columns with live TTFT, tokens/s, token count and finish reason. It calls only the public
// OpenAI routes (/v1/models, /v1/chat/completions), so it doubles as an example of them.
// Model output is text: it is rendered by building DOM nodes with textContent (a small Markdown
// subset), never through innerHTML.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "inferd-api-key"; // sessionStorage: this tab only

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  models: [],
  columns: new Map(), // model id -> column
  system: "",
};

const EXAMPLES = [
  ["Math: a triangle",
   "A right triangle has legs of 6 cm and 8 cm. How long is its hypotenuse, and what is its area? Show each step."],
  ["Logic: a family riddle",
   "Sally has 3 brothers. Each of her brothers has 2 sisters. How many sisters does Sally have? Explain your reasoning."],
  ["Code: Fibonacci",
   "Write a Python function `fib(n)` that returns the n-th Fibonacci number iteratively, with a docstring and two doctests."],
  ["Long context: a needle", needlePrompt()],
];

function needlePrompt() {
  const filler = [
    "The harbour town woke slowly, its fishing boats rocking against the grey stone quay.",
    "Merchants argued over the price of salt while gulls circled the market square.",
    "In the library, an old clock ticked beside shelves of maritime charts and ledgers.",
    "Rain moved in from the west, and the lamplighters began their rounds early.",
    "A ferry crossed to the island twice a day, carrying mail, bread and the occasional visitor.",
  ];
  const lines = [];
  for (let i = 0; i < 60; i++) lines.push(filler[i % filler.length]);
  lines.splice(31, 0, "The secret passphrase for the lighthouse archive is 'violet-otter-42'.");
  return lines.join(" ") + "\n\nWhat is the secret passphrase for the lighthouse archive? Answer with the passphrase only.";
}

// ---------- API ----------

async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  return fetch(path, { ...init, headers });
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  let response;
  try {
    response = await api("/v1/models");
  } catch (e) {
    setStatus(`Cannot reach the server: ${e.message}`, true);
    return;
  }
  if (response.status === 401) {
    askKey(state.key ? "That key was refused." : "");
    return;
  }
  if (!response.ok) {
    setStatus(`/v1/models: ${await errorMessage(response)}`, true);
    return;
  }
  state.models = (await response.json()).data || [];
  renderModels();
  setStatus(`${state.models.length} model${state.models.length === 1 ? "" : "s"} loaded.`);
}

// ---------- API key ----------

function askKey(error = "") {
  $("key-error").textContent = error;
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

function saveKey() {
  state.key = $("key-input").value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("key-dialog").close();
  loadModels();
}

// ---------- columns ----------

function renderModels() {
  const box = $("models");
  box.replaceChildren();
  for (const m of state.models) {
    const label = document.createElement("label");
    const tick = document.createElement("input");
    tick.type = "checkbox";
    tick.checked = true;
    tick.value = m.id;
    tick.addEventListener("change", () => column(m.id).el.classList.toggle("off", !tick.checked));
    label.append(tick, document.createTextNode(m.id));
    box.append(label);
    column(m.id, m);
  }
}

function column(model, card) {
  let col = state.columns.get(model);
  if (col) return col;
  const el = document.createElement("article");
  el.className = "column";
  el.dataset.model = model;
  const title = document.createElement("h2");
  title.textContent = model;
  if (card?.max_model_len) title.title = `max_model_len ${card.max_model_len}`;
  const stats = document.createElement("div");
  stats.className = "stats";
  const fields = {};
  for (const [k, label] of [["ttft", "TTFT"], ["tps", "tok/s"], ["tokens", "tokens"], ["finish", "finish"]]) {
    const span = document.createElement("span");
    const value = document.createElement("b");
    value.dataset.stat = k;
    value.textContent = "–";
    span.append(document.createTextNode(`${label} `), value);
    stats.append(span);
    fields[k] = value;
  }
  const transcript = document.createElement("div");
  transcript.className = "transcript";
  el.append(title, stats, transcript);
  $("columns").append(el);
  col = { model, el, fields, transcript, messages: [], turns: [], controller: null };
  state.columns.set(model, col);
  return col;
}

function ticked() {
  return [...$("models").querySelectorAll("input:checked")].map((t) => column(t.value));
}

function showStats(col, s) {
  col.fields.ttft.textContent = s.ttft == null ? "–" : `${s.ttft.toFixed(2)} s`;
  col.fields.tps.textContent = s.tps == null ? "–" : s.tps.toFixed(1);
  col.fields.tokens.textContent = String(s.tokens);
  col.fields.finish.textContent = s.finish || (s.running ? "…" : "–");
}

// ---------- asking ----------

function send() {
  const prompt = $("prompt").value.trim();
  const targets = ticked();
  if (!prompt || targets.length === 0) return;
  state.system = $("system").value.trim();
  const temperature = Number($("temperature").value);
  const maxTokens = Math.max(1, Math.floor(Number($("max-tokens").value) || 1));
  $("prompt").value = "";
  const runs = targets.map((col) => ask(col, prompt, temperature, maxTokens));
  $("stop").disabled = false;
  $("send").disabled = true;
  setStatus(`Asking ${targets.length} model${targets.length === 1 ? "" : "s"}…`);
  Promise.allSettled(runs).then(() => {
    $("stop").disabled = true;
    $("send").disabled = false;
    setStatus("Done. A follow-up continues each column's conversation.");
  });
}

async function ask(col, prompt, temperature, maxTokens) {
  col.messages.push({ role: "user", content: prompt });
  const user = document.createElement("div");
  user.className = "turn-user";
  user.textContent = prompt;
  const answer = document.createElement("div");
  answer.className = "answer streaming";
  col.transcript.append(user, answer);

  const messages = state.system ? [{ role: "system", content: state.system }, ...col.messages] : [...col.messages];
  const controller = new AbortController();
  col.controller = controller;
  const s = { ttft: null, tps: null, tokens: 0, finish: null, running: true };
  const started = performance.now();
  let first = null;
  let text = "";
  let pending = false;
  const paint = () => {
    pending = false;
    renderMarkdown(answer, text);
    showStats(col, s);
  };
  const schedule = () => {
    if (!pending) {
      pending = true;
      requestAnimationFrame(paint);
    }
  };
  showStats(col, s);
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: col.model, messages, stream: true, stream_options: { include_usage: true },
        temperature, max_tokens: maxTokens,
      }),
      signal: controller.signal,
    });
    if (response.status === 401) askKey("The server asked for a key.");
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response.body)) {
      if (event.error) throw new Error(event.error.message || "stream error");
      if (event.usage) s.tokens = event.usage.completion_tokens;
      for (const choice of event.choices || []) {
        const delta = choice.delta?.content;
        if (delta) {
          const now = performance.now();
          if (first === null) {
            first = now;
            s.ttft = (now - started) / 1000;
          }
          text += delta;
          s.tokens += 1;
          if (now > first) s.tps = (s.tokens - 1) / ((now - first) / 1000);
        }
        if (choice.finish_reason) s.finish = choice.finish_reason;
      }
      schedule();
    }
  } catch (e) {
    if (e.name === "AbortError") {
      s.finish = "stopped";
    } else {
      s.finish = "error";
      const err = document.createElement("p");
      err.className = "error";
      err.textContent = e.message;
      answer.after(err);
    }
  } finally {
    s.running = false;
    col.controller = null;
    answer.classList.remove("streaming");
    paint();
    col.messages.push({ role: "assistant", content: text });
    col.turns.push({ prompt, answer: text, ttft_s: s.ttft, tokens_per_s: s.tps, tokens: s.tokens, finish_reason: s.finish });
  }
}

// Parse a fetch body as Server-Sent Events, yielding each `data:` payload as JSON (until [DONE]).
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function stopAll() {
  for (const col of state.columns.values()) col.controller?.abort();
}

function newComparison() {
  stopAll();
  for (const col of state.columns.values()) {
    col.messages = [];
    col.turns = [];
    col.transcript.replaceChildren();
    showStats(col, { ttft: null, tps: null, tokens: 0, finish: null });
  }
  setStatus("New comparison.");
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// ---------- Markdown, as DOM nodes ----------

// Fenced code, headings, lists and paragraphs; inline code, bold and italics. Everything is a
// text node in the end: `<script>` in an answer shows as the text "<script>".
function renderMarkdown(el, text) {
  const out = [];
  const lines = text.split("\n");
  let paragraph = [];
  let list = null;
  const flush = () => {
    if (paragraph.length) {
      const p = document.createElement("p");
      inline(p, paragraph.join("\n"));
      out.push(p);
      paragraph = [];
    }
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      flush();
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      const pre = document.createElement("pre");
      const c = document.createElement("code");
      if (fence[2]) c.dataset.lang = fence[2];
      c.textContent = code.join("\n");
      pre.append(c);
      out.push(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = document.createElement(heading[1].length <= 2 ? "h3" : "h4");
      inline(h, heading[2]);
      out.push(h);
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      if (paragraph.length) flush();
      const kind = /\d/.test(item[1]) ? "OL" : "UL";
      if (!list || list.tagName !== kind) {
        list = document.createElement(kind.toLowerCase());
        out.push(list);
      }
      const li = document.createElement("li");
      inline(li, item[2]);
      list.append(li);
      continue;
    }
    if (line.trim() === "") {
      flush();
      continue;
    }
    list = null;
    paragraph.push(line);
  }
  flush();
  el.replaceChildren(...out);
}

function inline(parent, text) {
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    const token = m[0];
    const [tag, inner] = token.startsWith("`") ? ["code", token.slice(1, -1)]
      : token.startsWith("**") ? ["strong", token.slice(2, -2)] : ["em", token.slice(1, -1)];
    const node = document.createElement(tag);
    node.textContent = inner;
    parent.append(node);
    last = m.index + token.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

// ---------- export ----------

function comparison() {
  return {
    created: new Date().toISOString(),
    system: state.system,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
    models: [...state.columns.values()].filter((c) => c.turns.length).map((c) => ({ model: c.model, turns: c.turns })),
  };
}

function asMarkdown(data) {
  const parts = [`# inferd comparison, ${data.created}`, ""];
  if (data.system) parts.push(`System prompt: ${data.system}`, "");
  parts.push(`Temperature ${data.temperature}, max tokens ${data.max_tokens}.`, "");
  const turns = Math.max(0, ...data.models.map((m) => m.turns.length));
  for (let t = 0; t < turns; t++) {
    const prompt = data.models.find((m) => m.turns[t])?.turns[t].prompt ?? "";
    parts.push(`## Turn ${t + 1}`, "", "> " + prompt.split("\n").join("\n> "), "");
    for (const m of data.models) {
      const turn = m.turns[t];
      if (!turn) continue;
      const ttft = turn.ttft_s == null ? "–" : `${turn.ttft_s.toFixed(2)} s`;
      const tps = turn.tokens_per_s == null ? "–" : turn.tokens_per_s.toFixed(1);
      parts.push(`### ${m.model}`, "", `TTFT ${ttft} · ${tps} tok/s · ${turn.tokens} tokens · finish: ${turn.finish_reason}`, "", turn.answer, "");
    }
  }
  return parts.join("\n");
}

function download(name, type, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

// ---------- wiring ----------

function init() {
  for (const [label, prompt] of EXAMPLES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.addEventListener("click", () => {
      $("prompt").value = prompt;
      $("prompt").focus();
    });
    $("examples").append(b);
  }
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stopAll);
  $("new-chat").addEventListener("click", newComparison);
  $("export-md").addEventListener("click", () => download("inferd-comparison.md", "text/markdown", asMarkdown(comparison())));
  $("export-json").addEventListener("click", () => download("inferd-comparison.json", "application/json", JSON.stringify(comparison(), null, 2)));
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send();
  });
  $("key-button").addEventListener("click", () => askKey());
  $("key-save").addEventListener("click", saveKey);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  $("key-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter") saveKey();
  });
  // For tests and the console: what the export buttons would save.
  window.inferd = { comparison, asMarkdown };
  loadModels();
}

init();
