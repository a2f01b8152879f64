// The BAGEL playground. Plain JS, no build step, nothing fetched from outside: every request
// goes to this service's own API, relative to /ui/ (so a Serve route prefix works too).
"use strict";

const API = new URL("../", document.baseURI);  // the app's root (…/ui/ -> …/)

// BAGEL's sampler knobs, their help and every task's defaults come from the server (GET knobs,
// cluster/knobs.py), which makes them from pipelines/params.py: the page never disagrees with it.
async function loadKnobs() {
  const response = await fetch(new URL("knobs", API), {cache: "no-store"});
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

const PANELS = {
  t2i: {defaults: "t2i", endpoint: "v1/images/generations", size: true, think: false,
        intro: "Describe an image and BAGEL draws it."},
  think: {defaults: "t2i", endpoint: "v1/images/generations", size: true, think: true,
          intro: "BAGEL first thinks: it writes a plan for the image (streamed below), then draws from your prompt and that plan."},
  edit: {defaults: "edit", endpoint: "v1/images/edits", upload: true, thinkOption: true,
         intro: "Upload an image and say how to change it. The result keeps the input's size."},
};

const SIZE_PRESETS = [
  ["", "Model default"],
  ["1024x1024", "1:1 · 1024×1024"], ["1024x768", "4:3 · 1024×768"], ["768x1024", "3:4 · 768×1024"],
  ["1024x576", "16:9 · 1024×576"], ["576x1024", "9:16 · 576×1024"],
  ["512x512", "1:1 · 512×512"], ["256x256", "1:1 · 256×256"], ["128x128", "1:1 · 128×128"], ["64x64", "1:1 · 64×64"],
  ["custom", "Custom (width × height)"],
];
const SIDES = [64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024];
const PREVIEWS = 3;  // partial_images: previews of the image while it is made (the most OpenAI's API allows)

// -- small helpers ------------------------------------------------------------------------------

const $ = (root, role) => root.querySelector(`[data-role="${role}"]`);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children);
  return node;
}

function show(node, text) {
  if (text === undefined || text === null || text === "") { node.hidden = true; node.textContent = ""; }
  else { node.hidden = false; node.textContent = text; }
}

class ApiError extends Error {}

// The API key (only when the service has one): kept for this tab, sent as a bearer token.
const KEY_STORE = "bagel-playground-api-key";
function apiKeyInput() { return document.getElementById("api-key"); }
function setupApiKey() {
  const input = apiKeyInput();
  input.value = sessionStorage.getItem(KEY_STORE) || "";
  input.addEventListener("input", () => {
    sessionStorage.setItem(KEY_STORE, input.value.trim());
    input.parentElement.classList.remove("needed");
  });
}

// The message of an error response: the server's error.message; 429 says when to retry.
async function errorMessage(response) {
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    apiKeyInput().parentElement.classList.add("needed");
    return `${message} Enter the service's API key at the top of the page.`;
  }
  if (response.status === 429) {
    const after = response.headers.get("Retry-After") || "a few";
    return `Server busy, retry in ${after} s. (${message})`;
  }
  return message;
}

async function post(path, body, signal, session) {
  const headers = {"Content-Type": "application/json", "Accept": "text/event-stream"};
  const key = apiKeyInput().value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (session) headers["X-Session-ID"] = session;  // a chat's turns go to the replica holding its prefix
  let response;
  try {
    response = await fetch(new URL(path, API), {method: "POST", headers, body: JSON.stringify(body), signal});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Cannot reach the service (${e.message}).`);
  }
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

// Server-sent events of a fetch response: yields the parsed `data:` payloads until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message || "the request failed");
      yield event;
    }
  }
}

// An uploaded file as a data URL, checked to be an image the browser can decode.
function readImage(file) {
  return new Promise((resolve, reject) => {
    if (!file.type.startsWith("image/")) {
      reject(new ApiError(`"${file.name}" is not an image (${file.type || "unknown type"}): choose a PNG, JPEG or WebP file.`));
      return;
    }
    const reader = new FileReader();
    reader.onerror = () => reject(new ApiError(`Cannot read "${file.name}".`));
    reader.onload = () => {
      const probe = new Image();
      probe.onload = () => resolve({dataUrl: reader.result, name: file.name, width: probe.naturalWidth, height: probe.naturalHeight});
      probe.onerror = () => reject(new ApiError(`"${file.name}" is not a readable image (corrupt or unsupported format).`));
      probe.src = reader.result;
    };
    reader.readAsDataURL(file);
  });
}

function formatSeconds(ms) { return `${(ms / 1000).toFixed(1)} s`; }

// -- tabs ---------------------------------------------------------------------------------------

const TAB_NAMES = ["t2i", "think", "edit", "chat"];

function selectTab(name, focus = false) {
  if (!TAB_NAMES.includes(name)) name = "t2i";
  for (const t of TAB_NAMES) {
    const tab = document.getElementById(`tab-${t}`);
    tab.setAttribute("aria-selected", String(t === name));
    tab.tabIndex = t === name ? 0 : -1;
    document.getElementById(`panel-${t}`).hidden = t !== name;
  }
  if (focus) document.getElementById(`tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function setupTabs() {
  for (const t of TAB_NAMES) {
    const tab = document.getElementById(`tab-${t}`);
    tab.addEventListener("click", () => selectTab(t));
    tab.addEventListener("keydown", (e) => {
      const i = TAB_NAMES.indexOf(t);
      if (e.key === "ArrowRight") selectTab(TAB_NAMES[(i + 1) % TAB_NAMES.length], true);
      if (e.key === "ArrowLeft") selectTab(TAB_NAMES[(i + TAB_NAMES.length - 1) % TAB_NAMES.length], true);
    });
  }
  selectTab(location.hash.slice(1));
  window.addEventListener("hashchange", () => selectTab(location.hash.slice(1)));
}

// -- health and the demo banner -----------------------------------------------------------------

async function checkHealth() {
  const pill = document.getElementById("model-status");
  const demo = document.getElementById("demo-banner");
  const bad = document.getElementById("health-banner");
  try {
    const response = await fetch(new URL("health", API), {cache: "no-store"});
    const body = await response.json().catch(() => ({}));
    if (!response.ok || body.status !== "ok") {
      throw new Error(body.error || (body.status === "starting" ? `starting (${body.detail})` : `HTTP ${response.status}`));
    }
    pill.textContent = `${body.model}${body.demo ? " (demo)" : ""} · ${body.stages ? body.stages.length : "?"} stage(s) · ${body.requests_in_system} busy`;
    pill.className = "pill ok";
    show(bad, "");
    if (body.demo) {
      show(demo, `Demo model: ${body.notice || "random weights, outputs are noise"}. ` +
        "Everything works end to end, but images and answers are meaningless: start the service with " +
        "BAGEL_CHECKPOINT=/path/to/BAGEL-7B-MoT for real ones.");
    } else {
      show(demo, "");
    }
  } catch (e) {
    pill.textContent = "unavailable";
    pill.className = "pill bad";
    show(bad, `The service is not healthy: ${e.message}`);
  }
}

// -- image panels (text to image, think, edit) --------------------------------------------------

const panels = {};

function knobField(task, knob, defaults) {
  const id = `${task}-${knob.name}`;
  const value = defaults[knob.name];
  let input;
  if (knob.options) {
    input = el("select", {id, name: knob.name});
    for (const o of knob.options) input.append(el("option", {value: o, text: o}));
    input.value = value;
  } else {
    input = el("input", {id, name: knob.name, type: "number", min: knob.min, max: knob.max, step: knob.step,
                         placeholder: knob.placeholder, value: value === "" ? null : value});
  }
  input.dataset.knob = knob.name;
  const label = el("label", {for: id, title: knob.help, class: knob.think ? "think-knob" : null},
    el("span", {class: "name", text: knob.label}), input, el("small", {text: knob.hint}));
  return label;
}

function fillSizes(panel) {
  const preset = $(panel, "size-preset");
  const width = $(panel, "width");
  const height = $(panel, "height");
  for (const [value, text] of SIZE_PRESETS) preset.append(el("option", {value, text}));
  for (const select of [width, height]) {
    select.append(el("option", {value: "", text: "auto"}));
    for (const side of SIDES) select.append(el("option", {value: String(side), text: String(side)}));
  }
  const sync = () => {
    const match = SIZE_PRESETS.find(([v]) => v === `${width.value}x${height.value}`);
    preset.value = !width.value && !height.value ? "" : match ? match[0] : "custom";
  };
  preset.addEventListener("change", () => {
    if (preset.value === "custom") { if (!width.value) { width.value = "512"; height.value = "512"; } sync(); return; }
    const [w, h] = preset.value ? preset.value.split("x") : ["", ""];
    width.value = w; height.value = h;
  });
  for (const [select, other] of [[width, height], [height, width]]) {
    select.addEventListener("change", () => {
      if (!select.value) other.value = "";  // both or neither
      else if (!other.value) other.value = select.value;
      sync();
    });
  }
  preset.value = ""; width.value = ""; height.value = "";
}

function imagePanel(task, page) {
  const spec = PANELS[task];
  const section = document.getElementById(`panel-${task}`);
  section.append(document.getElementById("image-panel").content.cloneNode(true));
  const form = section.querySelector("form");
  const knobs = page.knobs;
  const state = {task, spec, form, knobs, controller: null, image: null, lastSeed: null, lastImage: null};
  panels[task] = state;

  $(form, "intro").textContent = spec.intro;
  $(form, "prompt").id = `${task}-prompt`;
  $(form, "prompt").placeholder = task === "edit" ? "Make the sky a sunset." : "A red fox in the snow, golden hour.";
  $(form, "run").id = `${task}-run`;
  $(form, "cancel").id = `${task}-cancel`;
  $(form, "run").textContent = task === "edit" ? "Edit" : "Generate";

  const defaults = page.defaults[spec.defaults];
  const grid = $(form, "knobs");
  for (const knob of knobs) grid.append(knobField(task, knob, defaults));
  const thinkOn = () => spec.think || (spec.thinkOption && $(form, "think").checked);
  const syncThink = () => grid.querySelectorAll(".think-knob").forEach((n) => { n.hidden = !thinkOn(); });
  syncThink();
  $(form, "reset").addEventListener("click", () => {
    for (const knob of knobs) form.querySelector(`#${task}-${knob.name}`).value = defaults[knob.name];
  });

  if (spec.size) { $(form, "size-box").hidden = false; fillSizes(form); }
  if (spec.thinkOption) {
    $(form, "think-box").hidden = false;
    $(form, "think").addEventListener("change", syncThink);
  }
  if (spec.upload) {
    $(form, "upload-box").hidden = false;
    const file = $(form, "file");
    file.id = `${task}-file`;
    file.addEventListener("change", async () => {
      clearOutput(state);
      if (!file.files.length) return;
      try {
        setInputImage(state, await readImage(file.files[0]));
      } catch (e) {
        setInputImage(state, null);
        file.value = "";
        show($(form, "error"), e.message);
      }
    });
  }

  $(form, "reuse-seed").addEventListener("click", () => {
    if (state.lastSeed !== null) form.querySelector(`#${task}-seed`).value = state.lastSeed;
  });
  $(form, "to-edit").hidden = task === "edit";
  $(form, "to-edit").addEventListener("click", () => {
    if (!state.lastImage) return;
    setInputImage(panels.edit, {dataUrl: state.lastImage, name: "generated.png"});
    $(panels.edit.form, "file").value = "";
    clearOutput(panels.edit);
    selectTab("edit");
  });
  form.addEventListener("submit", (e) => { e.preventDefault(); runImage(state); });
  $(form, "cancel").addEventListener("click", () => state.controller && state.controller.abort());
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
}

function setInputImage(state, image) {
  state.image = image;
  const preview = $(state.form, "preview");
  if (image) { preview.src = image.dataUrl; preview.hidden = false; }
  else { preview.removeAttribute("src"); preview.hidden = true; }
}

function clearOutput(state) {
  const f = state.form;
  delete $(f, "result").dataset.previewsShown;
  show($(f, "error"), "");
  show($(f, "status"), "");
  $(f, "progress-box").hidden = true;
  $(f, "thought-box").hidden = true;
  $(f, "thought").textContent = "";
}

// The request body from the form: BAGEL's knobs, empty fields left to the server's defaults.
function imageBody(state) {
  const {task, spec, form, knobs} = state;
  const think = spec.think || (spec.thinkOption && $(form, "think").checked);
  const body = {prompt: $(form, "prompt").value, stream: true, think};
  for (const knob of knobs) {
    if (knob.think && !think) continue;
    const raw = form.querySelector(`#${task}-${knob.name}`).value.trim();
    if (raw === "") continue;
    const value = knob.options ? raw : Number(raw);
    if (knob.param) body[knob.param] = [value, knob.end];  // a pair shown as its start
    else body[knob.name] = value;
  }
  if (spec.size && $(form, "width").value) body.size = `${$(form, "width").value}x${$(form, "height").value}`;
  body.partial_images = PREVIEWS;
  if (spec.upload) body.image = state.image.dataUrl;
  return body;
}

async function runImage(state) {
  const f = state.form;
  clearOutput(state);
  if (state.spec.upload && !state.image) { show($(f, "error"), "Please choose an input image first."); return; }
  if (!$(f, "prompt").value.trim()) { show($(f, "error"), "Please enter a prompt."); $(f, "prompt").focus(); return; }
  const body = imageBody(state);

  const controller = new AbortController();
  state.controller = controller;
  $(f, "run").disabled = true;
  $(f, "cancel").disabled = false;
  const bar = $(f, "progress");
  const text = $(f, "progress-text");
  const thought = $(f, "thought");
  bar.removeAttribute("value");  // indeterminate until the first step
  text.textContent = body.think ? "Thinking…" : "Waiting for the server…";
  $(f, "progress-box").hidden = false;
  if (body.think) { $(f, "thought-box").hidden = false; thought.textContent = ""; }
  const started = performance.now();
  let done = false;
  try {
    const response = await post(state.spec.endpoint, body, controller.signal);
    for await (const event of sseEvents(response)) {
      if (event.type === "thought") {
        thought.textContent += event.delta;
        thought.scrollTop = thought.scrollHeight;
        text.textContent = `Thinking… ${thought.textContent.length} characters`;
      } else if (event.type === "progress") {
        bar.max = event.num_steps;
        bar.value = event.step;
        text.textContent = event.step < event.num_steps ? `Step ${event.step} of ${event.num_steps}`
          : `Step ${event.step} of ${event.num_steps} · decoding…`;
      } else if (event.type.endsWith(".partial_image")) {
        showPreview(state, event);
      } else if (event.type.endsWith(".completed")) {
        showImage(state, event, performance.now() - started);
        done = true;
      }
    }
    if (!done) throw new ApiError("The stream ended without an image.");
    $(f, "progress-box").hidden = true;
  } catch (e) {
    $(f, "progress-box").hidden = true;
    if (e.name === "AbortError") show($(f, "status"), "Cancelled.");
    else show($(f, "error"), e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`);
  } finally {
    state.controller = null;
    $(f, "run").disabled = false;
    $(f, "cancel").disabled = true;
  }
}

// A preview of the image in the making (OpenAI's partial_image event): a small picture of the
// predicted final image, shown at the final image's size until the next preview or the image.
function showPreview(state, event) {
  const f = state.form;
  const [width] = event.size.split("x").map(Number);
  const image = $(f, "image");
  image.src = `data:image/${event.output_format};base64,${event.b64_json}`;
  image.style.width = `${width}px`;
  $(f, "result").dataset.preview = String(event.partial_image_index + 1);
  $(f, "result").dataset.previewsShown = String(event.partial_image_index + 1);
  $(f, "meta").textContent = `Preview ${event.partial_image_index + 1} · after step ${event.step} of ${event.num_steps}`;
  $(f, "download").hidden = true;
  $(f, "result").hidden = false;
}

function showImage(state, item, elapsedMs) {
  const f = state.form;
  const url = `data:image/${item.output_format};base64,${item.b64_json}`;
  state.lastSeed = item.seed;
  state.lastImage = url;
  delete $(f, "result").dataset.preview;
  $(f, "download").hidden = false;
  $(f, "image").style.width = "";
  $(f, "image").src = url;
  $(f, "download").href = url;
  $(f, "download").download = `bagel-${state.task}-${item.seed}.png`;
  $(f, "meta").textContent = `${item.width}×${item.height} · seed ${item.seed} · ${formatSeconds(elapsedMs)}`;
  $(f, "result").hidden = false;
  if (item.revised_prompt) {
    $(f, "thought-box").hidden = false;
    $(f, "thought").textContent = item.revised_prompt;
  }
}

// -- understanding / chat -----------------------------------------------------------------------

const newSession = () => `chat-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
const chat = {history: [], image: null, controller: null, session: newSession()};

function chatBubble(role, text, imageUrl) {
  const bubble = el("div", {class: `bubble ${role}`});
  bubble.append(el("div", {class: "who", text: role === "user" ? "You" : "BAGEL"}));
  if (imageUrl) bubble.append(el("img", {src: imageUrl, alt: "attached image", class: "thumb"}));
  const body = el("div", {class: "text", text});
  bubble.append(body);
  document.getElementById("chat-log").append(bubble);
  return body;
}

function setChatImage(image) {
  chat.image = image;
  const preview = document.getElementById("chat-preview");
  if (image) { preview.src = image.dataUrl; preview.hidden = false; }
  else { preview.removeAttribute("src"); preview.hidden = true; document.getElementById("chat-file").value = ""; }
  document.getElementById("chat-clear-image").hidden = !image;
}

async function runChat() {
  const error = document.getElementById("chat-error");
  const prompt = document.getElementById("chat-prompt");
  const run = document.getElementById("chat-run");
  const cancel = document.getElementById("chat-cancel");
  show(error, "");
  const question = prompt.value.trim();
  if (!question) { show(error, "Please enter a question."); prompt.focus(); return; }

  const content = chat.image
    ? [{type: "image_url", image_url: {url: chat.image.dataUrl}}, {type: "text", text: question}]
    : question;
  const message = {role: "user", content};
  const body = {messages: [...chat.history, message], stream: true,
                think: document.getElementById("chat-think").checked};
  for (const name of ["max_tokens", "temperature", "seed"]) {
    const raw = document.getElementById(`chat-${name}`).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }

  const userBubble = chatBubble("user", question, chat.image && chat.image.dataUrl).parentElement;
  const answer = chatBubble("assistant", "");
  answer.parentElement.classList.add("streaming");
  const controller = new AbortController();
  chat.controller = controller;
  run.disabled = true;
  cancel.disabled = false;
  let text = "";
  let finish = null;
  try {
    const response = await post("v1/chat/completions", body, controller.signal, chat.session);
    for await (const chunk of sseEvents(response)) {
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) { text += choice.delta.content; answer.textContent = text; }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === null) throw new ApiError("The stream ended before the answer was complete.");
    if (finish === "length") answer.parentElement.append(el("div", {class: "muted", text: "(stopped at max tokens)"}));
    chat.history.push(message, {role: "assistant", content: text});
    prompt.value = "";
    setChatImage(null);  // the image is now part of the conversation
  } catch (e) {
    userBubble.remove();
    answer.parentElement.remove();
    if (e.name === "AbortError") show(error, "Cancelled.");
    else show(error, e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`);
  } finally {
    answer.parentElement.classList.remove("streaming");
    chat.controller = null;
    run.disabled = false;
    cancel.disabled = true;
  }
}

function setupChat(defaults) {
  for (const [name, value] of Object.entries(defaults)) document.getElementById(`chat-${name}`).value = value;
  const form = document.querySelector("#panel-chat form");
  const file = document.getElementById("chat-file");
  const error = document.getElementById("chat-error");
  file.addEventListener("change", async () => {
    show(error, "");
    if (!file.files.length) { setChatImage(null); return; }
    try { setChatImage(await readImage(file.files[0])); }
    catch (e) { setChatImage(null); show(error, e.message); }
  });
  document.getElementById("chat-clear-image").addEventListener("click", () => setChatImage(null));
  form.addEventListener("submit", (e) => { e.preventDefault(); runChat(); });
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && e.target.id === "chat-prompt") { e.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("chat-cancel").addEventListener("click", () => chat.controller && chat.controller.abort());
  document.getElementById("chat-new").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    chat.session = newSession();
    document.getElementById("chat-log").textContent = "";
    show(error, "");
    setChatImage(null);
  });
}

// -- start --------------------------------------------------------------------------------------

async function start() {
  setupApiKey();
  try {
    const page = await loadKnobs();
    for (const task of Object.keys(PANELS)) imagePanel(task, page);
    setupChat(page.chat);
  } catch (e) {
    show(document.getElementById("health-banner"), `Cannot load the settings from the service: ${e.message}`);
  }
  setupTabs();
  checkHealth();
  setInterval(checkHealth, 30000);
  document.body.dataset.ready = "true";
}

start();
