// arcdiff playground: lists the models, submits generations to the API, follows each through its
// event stream (a progress bar, the x0_hat previews sharpening, a cancel button) and shows the images
// with their seeds, NFE and latency record. Plain JavaScript, nothing from other hosts. The stream is
// read with fetch rather than EventSource, which cannot send the Authorization header.
// URLs are relative to the page, so it also works behind a proxy that serves the API under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["model", "steps", "solver", "schedule", "seed", "n", "image", "mask", "strength"];
// network evaluations per step of each solver (one RK4 step costs 4) until /v1/models says; the API's nfe is the truth
let STAGES = { euler: 1, heun: 2, rk4: 4, ddim: 1, ddpm: 1, dpmpp2m: 1, unipc2: 1, unipc3: 1, dpmpp3m: 1, dpmpp2m_sde: 1 };
const GRIDS = ["uniform", "logsnr", "karras"];
const KEY_STORE = "arcdiff-api-key";

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: [],
  limits: { steps: [1, 1000], n: [1, 16], seed: [0, 4294967295] },
  limitsLoaded: false,
};

class ApiError extends Error {
  constructor(status, message, body, retryAfter) {
    super(message);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

function messageOf(body, response) {
  if (body && typeof body === "object") {
    if (typeof body.message === "string") return body.message;
    if (typeof body.detail === "string") return body.detail;
  }
  if (typeof body === "string" && body.trim()) return body.trim().slice(0, 300);
  return `${response.status} ${response.statusText || "error"}`;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, `cannot reach the server (${e.message})`, null, null);
  }
  const text = await r.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (e) { /* not JSON: keep the text */ }
  if (!r.ok) throw new ApiError(r.status, messageOf(data, r), data, r.headers.get("Retry-After"));
  return { status: r.status, data };
}

// ---- errors beside the fields and the button ------------------------------------------------

function clearErrors() {
  for (const f of FIELDS) {
    $(`err-${f}`).textContent = "";
    if ($(f)) $(f).removeAttribute("aria-invalid");
  }
  $("err-form").textContent = "";
}

function fieldOf(loc) {
  const parts = (loc || []).filter((p) => !["body", "query", "path", "header"].includes(p));
  return parts.length ? String(parts[0]) : null;
}

const sentence = (text) => (/[.!?]$/.test(text) ? text : `${text}.`);

function showError(err) {
  const form = $("err-form");
  if (err.status === 401 || err.status === 403) {
    askForKey(err.message);
    form.textContent = `API key needed: ${sentence(err.message)}`;
    return;
  }
  if (err.status === 422) {
    const detail = err.body && Array.isArray(err.body.detail) ? err.body.detail : [];
    for (const d of detail) {
      const f = fieldOf(d.loc);
      if (f && FIELDS.includes(f)) {
        const slot = $(`err-${f}`);
        slot.textContent = slot.textContent ? `${slot.textContent}; ${d.msg}` : d.msg;
        if ($(f)) $(f).setAttribute("aria-invalid", "true");
      }
    }
    form.textContent = `The API rejected the request: ${err.message}`;
    const first = FIELDS.find((f) => $(f) && $(f).getAttribute("aria-invalid") === "true");
    if (first) $(first).focus();
    return;
  }
  const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : "";
  if (err.status === 429) form.textContent = `Too many requests: ${sentence(err.message)}${wait}`;
  else if (err.status === 503) form.textContent = `The service is not ready: ${sentence(err.message)}${wait}`;
  else if (err.status === 0) form.textContent = `Cannot reach the service: ${sentence(err.message)}`;
  else form.textContent = `Error ${err.status}: ${err.message}`;
}

// ---- API key ----------------------------------------------------------------------------------

function askForKey(message) {
  $("key-row").hidden = false;
  $("err-key").textContent = state.key ? message : "This service needs an API key.";
  $("api-key").focus();
}

async function useKey() {
  state.key = $("api-key").value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
  else sessionStorage.removeItem(KEY_STORE);
  $("err-key").textContent = "";
  await loadModels();
}

// ---- limits, models, readiness --------------------------------------------------------------

function range(schema) {
  if (!schema) return null;
  const s = schema.anyOf ? schema.anyOf.find((x) => x.type === "integer") || schema : schema;
  if (typeof s.minimum !== "number" || typeof s.maximum !== "number") return null;
  return [s.minimum, s.maximum];
}

async function loadLimits() {
  // the request schema in /openapi.json states this deployment's limits (n's maximum is configured)
  try {
    const doc = (await api("GET", "openapi.json")).data;
    const ref = doc.paths["/v1/generations"].post.requestBody.content["application/json"].schema.$ref;
    const props = doc.components.schemas[ref.split("/").pop()].properties;
    for (const f of ["steps", "n", "seed"]) {
      const r = range(props[f]);
      if (r) state.limits[f] = r;
    }
    state.limitsLoaded = true;
  } catch (e) {
    /* keep the defaults (tried again once a key works); the API still checks every field */
  }
  for (const f of ["steps", "n", "seed"]) {
    const [lo, hi] = state.limits[f];
    $(f).min = lo;
    $(f).max = hi;
    if (f !== "seed") $(`hint-${f}`).textContent = `${lo}–${hi}`;
  }
}

function describe(m) {
  const params = m.parameters >= 1e6 ? `${(m.parameters / 1e6).toFixed(2)}M` : `${Math.round(m.parameters / 1e3)}k`;
  const head = m.prediction === "x0_eps" ? "dual head (x0 + eps)" : `${m.prediction} prediction`;
  const card = `${m.image_size}×${m.image_size}×${m.channels} · ${head} · ${params} parameters`;
  const d = m.distilled;
  if (!d) return card;
  // a few-step student: what it was distilled from, for how many steps, and how it measured
  let out = `${card} · distilled from ${d.teacher} for ${d.steps} ${d.solver} step${d.steps === 1 ? "" : "s"}`;
  const q = d.quality && d.quality.fd;
  if (q) out += " · FD " + Object.entries(q).map(([space, v]) => `${space} ${v.student} (teacher ${v.teacher_best_at_10} at 10 NFE)`).join(", ");
  return out;
}

async function loadModels() {
  let models;
  try {
    models = (await api("GET", "v1/models")).data;
  } catch (err) {
    if (err.status === 401 || err.status === 403) askForKey(err.message);
    else $("err-model").textContent = `Cannot list the models: ${err.message}`;
    return;
  }
  $("err-key").textContent = "";
  if (!state.key) $("key-row").hidden = true;
  if (!state.limitsLoaded) await loadLimits();
  state.models = models;
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  if (models.some((m) => m.name === previous)) select.value = previous;
  $("err-model").textContent = models.length ? "" : "This service serves no models.";
  onModel();
}

function onModel() {
  const m = state.models.find((x) => x.name === $("model").value);
  $("model-info").textContent = m ? describe(m) : "";
  if (m && m.nfe_per_step) STAGES = m.nfe_per_step;
  const defaults = (m && m.defaults) || { solver: "rk4" };
  const solver = $("solver");
  const previous = solver.value || defaults.solver;
  const names = m ? m.solvers : Object.keys(STAGES);
  solver.replaceChildren(...names.map((s) => new Option(s, s)));
  solver.value = names.includes(previous) ? previous : names[0];
  // the first choice sends no "schedule": the API then gives the solver its own default grid, so
  // a request means the same here as over curl or the CLI; picking a grid sends it
  const schedule = $("schedule");
  const before = schedule.value;
  const grids = (m && m.schedules) || GRIDS;
  schedule.replaceChildren(new Option("the solver's default", ""), ...grids.map((g) => new Option(g, g)));
  schedule.value = grids.includes(before) ? before : "";
  $("hint-solver").textContent = m && m.defaults ? `measured best at 10 NFE: ${m.defaults.solver} on ${m.defaults.schedule}` : "";
  updateHint();
}

function updateHint() {
  // name the grid the solver's default stands for (from /v1/models, which reads the solver table)
  const m = state.models.find((x) => x.name === $("model").value);
  const grid = m && m.default_schedules && m.default_schedules[$("solver").value];
  const first = $("schedule").options[0];
  if (first && first.value === "") first.textContent = grid ? `the solver's default (${grid})` : "the solver's default";
  const steps = Number($("steps").value);
  const stages = STAGES[$("solver").value];
  $("nfe-hint").textContent = Number.isInteger(steps) && steps > 0 && stages ? `${steps * stages} NFE per image` : "";
}

async function checkReady() {
  const el = $("ready");
  let again = 10000;
  try {
    const r = await fetch("readyz", { headers: { Accept: "application/json" } });
    const body = await r.json();
    el.dataset.state = r.ok ? "ready" : "not-ready";
    el.textContent = r.ok ? `ready · ${body.mode}` : `not ready: ${body.reason || "unknown"}`;
    if (!r.ok) again = 2000;
  } catch (e) {
    el.dataset.state = "down";
    el.textContent = "unreachable";
    again = 3000;
  }
  setTimeout(checkReady, again);
}

// ---- generations ------------------------------------------------------------------------------

function intOrRaw(value) {
  // the API is the judge: send what was typed (as a number when it is one) and show its answer
  if (value.trim() === "") return undefined;
  const x = Number(value);
  return Number.isFinite(x) ? x : value;
}

function requestBody() {
  const body = {
    model: $("model").value || undefined,
    steps: intOrRaw($("steps").value),
    solver: $("solver").value,
    preview: true,
    schedule: $("schedule").value || undefined,
  };
  const seed = intOrRaw($("seed").value);
  if (seed !== undefined) body.seed = seed;
  const n = intOrRaw($("n").value);
  if (n !== undefined) body.n = n;
  if (edit.image) {  // image-to-image; with painted pixels, inpainting
    body.image = edit.image;
    body.strength = Number($("strength").value);
    if ($("inpaint").checked && edit.mask.some((v) => v > 0)) body.mask = greyPng(edit.mask, edit.size, edit.size);
  }
  return body;
}

// ---- editing: an input image, a painted mask, a strip between two seeds ------------------------

const edit = { image: null, mask: new Uint8Array(0), size: 0, picture: null, painting: false };

function crc32(bytes) {
  let crc = 0xffffffff;
  for (const b of bytes) {
    let c = (crc ^ b) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

function greyPng(pixels, w, h) {
  // the mask as an 8-bit greyscale PNG, base64 (a canvas only exports RGBA, which the API refuses
  // for a mask): zlib "stored" blocks need no compressor, and masks are small
  const raw = new Uint8Array(h * (w + 1));
  for (let y = 0; y < h; y++) raw.set(pixels.subarray(y * w, (y + 1) * w), y * (w + 1) + 1);
  const parts = [Uint8Array.of(0x78, 0x01)];
  for (let i = 0; i < raw.length || i === 0; i += 65535) {
    const chunk = raw.subarray(i, i + 65535);
    const len = chunk.length;
    parts.push(Uint8Array.of(i + 65535 >= raw.length ? 1 : 0, len & 255, len >> 8, ~len & 255, (~len >> 8) & 255), chunk);
  }
  let a = 1, b = 0;
  for (const v of raw) { a = (a + v) % 65521; b = (b + a) % 65521; }
  const be32 = (v) => Uint8Array.of(v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255);
  parts.push(be32(((b << 16) | a) >>> 0));
  const cat = (list) => {
    const out = new Uint8Array(list.reduce((s, p) => s + p.length, 0));
    let o = 0;
    for (const p of list) { out.set(p, o); o += p.length; }
    return out;
  };
  const chunk = (type, data) => {
    const body = cat([new TextEncoder().encode(type), data]);
    return cat([be32(data.length), body, be32(crc32(body))]);
  };
  const ihdr = cat([be32(w), be32(h), Uint8Array.of(8, 0, 0, 0, 0)]);
  const png = cat([Uint8Array.of(137, 80, 78, 71, 13, 10, 26, 10), chunk("IHDR", ihdr), chunk("IDAT", cat(parts)), chunk("IEND", new Uint8Array(0))]);
  return btoa(String.fromCharCode(...png));
}

function drawEdit() {
  const canvas = $("edit-canvas");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (edit.picture) ctx.drawImage(edit.picture, 0, 0, edit.size, edit.size);
  ctx.fillStyle = "rgba(255, 60, 60, 0.6)";  // the painted mask, over the image
  for (let i = 0; i < edit.mask.length; i++) {
    if (edit.mask[i]) ctx.fillRect(i % edit.size, Math.floor(i / edit.size), 1, 1);
  }
}

function setInput(b64) {
  const model = state.models.find((m) => m.name === $("model").value);
  const size = model ? model.image_size : 28;
  edit.image = b64;
  edit.size = size;
  edit.mask = new Uint8Array(size * size);
  const canvas = $("edit-canvas");
  canvas.width = canvas.height = size;
  canvas.style.width = canvas.style.height = `${size * Math.max(4, Math.floor(224 / size))}px`;
  const picture = new Image();
  picture.onload = () => { edit.picture = picture; drawEdit(); };
  picture.src = `data:image/png;base64,${b64}`;
  $("edit-box").hidden = false;
  document.body.classList.add("editing");
}

function clearInput() {
  edit.image = null;
  edit.picture = null;
  $("edit-box").hidden = true;
  $("edit-file").value = "";
  document.body.classList.remove("editing");
}

function paint(event) {
  if (!edit.painting || !$("inpaint").checked) return;
  const canvas = $("edit-canvas");
  const r = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - r.left) / r.width) * edit.size);
  const y = Math.floor(((event.clientY - r.top) / r.height) * edit.size);
  const brush = Math.max(1, Math.round(edit.size / 14));
  for (let dy = -brush; dy <= brush; dy++) {
    for (let dx = -brush; dx <= brush; dx++) {
      const px = x + dx, py = y + dy;
      if (px >= 0 && py >= 0 && px < edit.size && py < edit.size && dx * dx + dy * dy <= brush * brush) {
        edit.mask[py * edit.size + px] = 255;
      }
    }
  }
  drawEdit();
}

async function readFile() {
  const file = $("edit-file").files[0];
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  setInput(btoa(s));  // the API checks it (size, mode) and says what is wrong
}

async function interpolate() {
  clearErrors();
  const model = state.models.find((m) => m.name === $("model").value);
  const body = {
    model: $("model").value || undefined,
    start: { seed: intOrRaw($("seed").value) ?? 0 },
    end: { seed: intOrRaw($("seed-to").value) ?? 1 },
    frames: Math.max(2, intOrRaw($("n").value) || 8),
    steps: intOrRaw($("steps").value),
  };
  const solver = $("solver").value;
  if (solver && !["ddpm", "dpmpp2m_sde"].includes(solver)) body.solver = solver;
  let gen;
  try {
    gen = (await api("POST", "v1/interpolations", body)).data;
  } catch (err) {
    showError(err);
    return;
  }
  const card = newCard(gen, model);
  follow(card, gen, model);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function ms(x) {
  if (x >= 10000) return `${(x / 1000).toFixed(1)} s`;
  if (x >= 1000) return `${(x / 1000).toFixed(2)} s`;
  if (x >= 10) return `${Math.round(x)} ms`;
  return `${x.toFixed(1)} ms`;
}

function scaleFor(model) {
  const size = model ? model.image_size : 28;
  return Math.max(1, Math.floor(112 / size));
}

function newCard(gen, model) {
  const card = el("article", "run");
  card.dataset.id = gen.id;
  card.dataset.status = gen.status;
  const head = el("header");
  head.append(el("span", "title", gen.kind && gen.kind !== "generate" ? `${gen.model} · ${gen.kind}` : gen.model));
  card.dataset.kind = gen.kind || "generate";
  const last = (gen.seed + gen.n - 1) % 4294967296;
  const seeds = gen.n > 1 ? `seeds ${gen.seed}–${last}` : `seed ${gen.seed}`;
  head.append(el("span", "facts", `${gen.solver} · ${gen.schedule || "uniform"} · ${gen.steps} steps · ${gen.nfe} NFE per image · ${seeds}`));
  head.append(el("span", "status", gen.status));
  const cancel = el("button", "secondary cancel", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => cancelRun(card, gen.id));
  head.append(cancel);
  const progress = el("progress", "progress");
  progress.max = gen.nfe * gen.n;
  progress.value = 0;
  progress.title = "network evaluations done";
  card.append(head, progress, el("p", "run-error"), el("div", "latency"));
  const grid = el("div", "grid");
  const side = (model ? model.image_size : 28) * scaleFor(model);
  for (let k = 0; k < gen.n; k++) {
    const fig = el("figure");
    const ph = el("div", "placeholder");
    ph.style.width = `${side}px`;
    ph.style.height = `${side}px`;
    fig.append(ph, el("figcaption", null, `seed ${(gen.seed + k) % 4294967296}`));
    grid.append(fig);
  }
  card.append(grid);
  $("empty").hidden = true;
  $("results").prepend(card);
  return card;
}

function renderLatency(box, m) {
  const parts = [["queue", m.queue_ms, "queue"], ["sample", m.sample_ms, "sampling"], ["encode", m.encode_ms, "encoding"]];
  const other = Math.max(0, m.total_ms - m.queue_ms - m.sample_ms - m.encode_ms);
  if (other > 0.01 * m.total_ms) parts.push(["other", other, "other"]);
  const bar = el("div", "bar");
  bar.title = `total ${ms(m.total_ms)}`;
  const legend = el("div", "legend");
  for (const [cls, value, label] of parts) {
    const seg = el("span", cls);
    seg.style.width = `${m.total_ms > 0 ? (100 * value) / m.total_ms : 0}%`;
    seg.title = `${label} ${ms(value)}`;
    bar.append(seg);
    legend.append(el("span", cls, `${label} ${ms(value)}`));
  }
  legend.append(el("span", "total", `total ${ms(m.total_ms)}`));
  const batches = [...new Set(m.batch_sizes || [])].sort((a, b) => a - b);
  const batch = batches.length ? ` · batch ${batches.length > 2 ? `${batches[0]}–${batches.at(-1)}` : batches.join(", ")}` : "";
  legend.append(el("span", "device", `${m.device} · ${m.worker}${batch}`));
  box.replaceChildren(bar, legend);
}

function renderImages(card, gen, model) {
  const scale = scaleFor(model);
  const grid = card.querySelector(".grid");
  const figs = gen.images.map((im) => {
    const fig = el("figure");
    const img = el("img", "sample");
    img.alt = `${gen.model} image ${im.index}, seed ${im.seed}`;
    img.title = `seed ${im.seed}: click to use this seed (n = 1 gives this image again)`;
    img.dataset.seed = String(im.seed);
    img.dataset.index = String(im.index);
    img.addEventListener("load", () => {
      img.style.width = `${img.naturalWidth * scale}px`;
      img.style.height = `${img.naturalHeight * scale}px`;
    });
    img.addEventListener("click", () => {
      $("seed").value = String(im.seed);
      $("n").value = "1";
      updateHint();
    });
    img.src = `data:image/png;base64,${im.png_base64}`;
    const use = el("button", "secondary use-input", "edit");
    use.type = "button";
    use.title = "use this image as the input of an edit (strength, inpainting)";
    use.addEventListener("click", () => setInput(im.png_base64));
    fig.append(img, el("figcaption", null, `seed ${im.seed}`), use);
    return fig;
  });
  grid.replaceChildren(...figs);
}

function finish(card, gen, model, elapsed) {
  card.dataset.status = gen.status;
  const status = card.querySelector(".status");
  card.querySelector(".cancel").remove();
  if (gen.status === "finished") {
    card.querySelector(".progress").value = card.querySelector(".progress").max;
    status.textContent = `done in ${ms(gen.metrics ? gen.metrics.total_ms : elapsed)}`;
    if (gen.metrics) renderLatency(card.querySelector(".latency"), gen.metrics);
    renderImages(card, gen, model);
  } else if (gen.status === "canceled") {
    status.textContent = "canceled";  // the last previews stay: where it was when it stopped
  } else {
    status.textContent = "failed";
    card.querySelector(".run-error").textContent = gen.error || "the generation failed";
    card.querySelector(".grid").replaceChildren();
  }
}

async function cancelRun(card, id) {
  const button = card.querySelector(".cancel");
  if (button) button.disabled = true;
  try {
    await api("DELETE", `v1/generations/${id}`);  // the stream then ends with "canceled"
  } catch (err) {
    // 409: it finished first (the stream shows it); anything else is worth saying
    if (err.status !== 409) card.querySelector(".run-error").textContent = `cancel: ${err.message}`;
    if (button) button.disabled = false;
  }
}

function showProgress(card, data, started) {
  const bar = card.querySelector(".progress");
  bar.max = data.nfe_total;
  bar.value = data.nfe_done;
  card.dataset.status = "running";
  const pct = data.nfe_total ? Math.floor((100 * data.nfe_done) / data.nfe_total) : 0;
  card.querySelector(".status").textContent =
    `running · ${pct}% · ${data.images_done} of ${card.querySelectorAll(".grid figure").length} done · ${ms(performance.now() - started)}`;
}

function showPreview(card, data, model) {
  const fig = card.querySelectorAll(".grid figure")[data.index];
  if (!fig) return;
  let img = fig.querySelector("img.preview");
  if (!img) {
    img = el("img", "preview");
    const side = (model ? model.image_size : 28) * scaleFor(model);
    img.style.width = `${side}px`;
    img.style.height = `${side}px`;
    fig.querySelector(".placeholder, img").replaceWith(img);
  }
  img.alt = `preview of image ${data.index} after ${data.nfe_done} evaluations`;
  img.title = `x0_hat after ${data.nfe_done} network evaluations`;
  img.dataset.nfe = String(data.nfe_done);
  img.src = `data:image/png;base64,${data.png_base64}`;
}

// Server-sent events over fetch: blocks separated by a blank line, "field: value" lines.
function parseEvent(block) {
  const ev = { event: "message", data: [], id: null };
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data.push(value);
    else if (field === "id") ev.id = value;
  }
  return ev;
}

const TERMINAL = ["finished", "failed", "canceled"];

// Calls onEvent(name, data) for each event until a terminal one; resumes with Last-Event-ID when the
// connection drops. Returns the terminal event's data (the generation), or throws.
async function streamEvents(id, onEvent) {
  let lastId = null;
  for (let attempt = 0; attempt < 6; attempt++) {
    const headers = { Accept: "text/event-stream" };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    if (lastId) headers["Last-Event-ID"] = lastId;
    let r;
    try {
      r = await fetch(`v1/generations/${id}/events`, { headers });
    } catch (e) {
      await sleep(300 * (attempt + 1));
      continue;
    }
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(r.status, messageOf(body, r), body, r.headers.get("Retry-After"));
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r\n\r\n|\n\n|\r\r/)) >= 0) {
          const ev = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end).replace(/^(\r\n\r\n|\n\n|\r\r)/, "");
          if (ev.id) lastId = ev.id;
          if (!ev.data.length) continue;
          const data = JSON.parse(ev.data.join("\n"));
          if (TERMINAL.includes(ev.event)) return data;
          onEvent(ev.event, data);
        }
      }
    } catch (e) {
      /* the connection dropped: resume after the last event seen */
    }
    await sleep(300 * (attempt + 1));
  }
  throw new ApiError(0, "the event stream kept breaking", null, null);
}

const sleep = (t) => new Promise((resolve) => setTimeout(resolve, t));

async function follow(card, gen, model) {
  const started = performance.now();
  try {
    const done = await streamEvents(gen.id, (name, data) => {
      if (name === "progress") showProgress(card, data, started);
      else if (name === "preview") showPreview(card, data, model);
    });
    finish(card, done, model, performance.now() - started);
    return;
  } catch (err) {
    if (err.status === 404 || err.status === 401 || err.status === 403) {
      finish(card, { ...gen, status: "failed", error: err.message }, model, performance.now() - started);
      return;
    }
    /* no stream (e.g. a proxy that buffers it): poll instead */
  }
  await poll(card, gen, model, started);
}

async function poll(card, gen, model, started) {
  let interval = 100;
  const status = card.querySelector(".status");
  while (!TERMINAL.includes(gen.status)) {
    await sleep(interval);
    interval = Math.min(1000, interval * 1.4);
    try {
      gen = (await api("GET", `v1/generations/${gen.id}`)).data;
      card.querySelector(".run-error").textContent = "";
    } catch (err) {
      if (err.status === 404 || err.status === 401 || err.status === 403) {
        gen = { ...gen, status: "failed", error: err.message };
        break;
      }
      card.querySelector(".run-error").textContent = `polling: ${err.message} (retrying)`;
      interval = Math.max(interval, 1000 * (Number(err.retryAfter) || 1));
      continue;
    }
    card.dataset.status = gen.status;
    status.textContent = `${gen.status} · ${ms(performance.now() - started)}`;
  }
  finish(card, gen, model, performance.now() - started);
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("generate");
  button.disabled = true;
  const model = state.models.find((m) => m.name === $("model").value);
  let gen;
  try {
    gen = (await api("POST", "v1/generations", requestBody())).data;
  } catch (err) {
    showError(err);
    return;
  } finally {
    button.disabled = false;
  }
  const card = newCard(gen, model);
  follow(card, gen, model);
}

// ---- start ------------------------------------------------------------------------------------

function start() {
  $("form").addEventListener("submit", submit);
  $("model").addEventListener("change", onModel);
  $("steps").addEventListener("input", updateHint);
  $("solver").addEventListener("change", updateHint);
  $("key-use").addEventListener("click", useKey);
  $("edit-file").addEventListener("change", readFile);
  $("edit-clear").addEventListener("click", clearInput);
  $("strength").addEventListener("input", () => { $("strength-out").textContent = $("strength").value; });
  $("interpolate").addEventListener("click", interpolate);
  const canvas = $("edit-canvas");
  canvas.addEventListener("pointerdown", (e) => { edit.painting = true; paint(e); });
  canvas.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", () => { edit.painting = false; });
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      useKey();
    }
  });
  if (state.key) {
    $("api-key").value = state.key;
    $("key-row").hidden = false;
  }
  checkReady();
  Promise.all([loadLimits(), loadModels()]).then(() => document.body.classList.add("loaded"));
}

start();
