// glimr's search page: pick or drop a photo, drag a crop box, search, click a result for its heat map.
// Everything is served by the glimr service itself (no CDN, no external fonts or scripts).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, image: null, crop: null, drag: null, query: null, scale: 1, maxTop: 100 };

// One message per status the API can answer, then the server's own reason.
const STATUS_TEXT = {
  400: "The request could not be read.",
  401: "This needs the service's token.",
  403: "Not allowed: this service is read-only or the image is outside its folder.",
  404: "Not found: the image or the query is no longer known (search again).",
  410: "The image file is gone from the collection.",
  413: "The photo is too large (file size or pixel count) for this service.",
  415: "That file is not an image this service can read (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM).",
  422: "The request has a bad value (crop, number of results, re-ranking, or an unreadable photo).",
  429: "Too many requests: wait a moment and try again.",
  500: "The service failed on this request.",
  502: "The service is not reachable.",
  503: "The service is not ready.",
};

function showMessage(text, kind) {
  const m = $("message");
  m.textContent = text;
  m.className = kind === "info" ? "info" : "";
  m.hidden = !text;
}

async function apiError(resp) {
  let reason = "";
  try {
    const body = await resp.json();
    if (typeof body.detail === "string") reason = body.detail;
    else if (Array.isArray(body.detail)) reason = body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  } catch (e) { /* not JSON */ }
  const head = STATUS_TEXT[resp.status] || `The service answered ${resp.status}.`;
  return `${head}${reason ? " " + reason : ""} (HTTP ${resp.status})`;
}

async function loadStats() {
  try {
    const r = await fetch("/api/stats");
    if (!r.ok) { showMessage(await apiError(r)); return; }
    const s = await r.json();
    $("stats").textContent = `${s.images} images, model ${s.model}${s.read_only ? ", read-only" : ""}`;
    const sel = $("rerank");
    sel.innerHTML = "";
    for (const name of s.reranks) {
      const o = document.createElement("option");
      o.value = name; o.textContent = name; sel.appendChild(o);
    }
    state.maxTop = s.max_top;
    $("top").max = s.max_top;
    $("top").value = Math.min(s.default_top, s.max_top);
  } catch (e) {
    showMessage("The service is not reachable: " + e.message);
  }
}

function setFile(file) {
  if (!file) return;
  showMessage("");
  if (file.type && !file.type.startsWith("image/")) {
    showMessage(STATUS_TEXT[415] + ` ('${file.name}' is ${file.type})`);
    return;
  }
  state.file = file; state.crop = null; state.query = null;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => { state.image = img; $("canvas-wrap").hidden = false; $("search").disabled = false; draw(); };
  img.onerror = () => { showMessage(STATUS_TEXT[415] + ` ('${file.name}' could not be shown)`); $("search").disabled = true; };
  img.src = url;
}

function draw() {
  const c = $("canvas"), img = state.image;
  if (!img) return;
  const maxW = c.parentElement.clientWidth || 400;
  state.scale = Math.min(1, maxW / img.naturalWidth);
  c.width = Math.round(img.naturalWidth * state.scale);
  c.height = Math.round(img.naturalHeight * state.scale);
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0, c.width, c.height);
  const box = state.drag || state.crop;
  if (box) {
    const [x0, y0, x1, y1] = box.map((v) => v * state.scale);
    g.fillStyle = "rgba(0,0,0,0.45)";
    g.fillRect(0, 0, c.width, y0); g.fillRect(0, y1, c.width, c.height - y1);
    g.fillRect(0, y0, x0, y1 - y0); g.fillRect(x1, y0, c.width - x1, y1 - y0);
    g.strokeStyle = "#ffd200"; g.lineWidth = 2; g.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  $("crop-text").textContent = state.crop ? `crop ${state.crop.map(Math.round).join(",")}` : "whole photo";
}

function toImage(ev) {
  const r = $("canvas").getBoundingClientRect();
  const k = state.image.naturalWidth / r.width;
  const x = Math.max(0, Math.min(state.image.naturalWidth, (ev.clientX - r.left) * k));
  const y = Math.max(0, Math.min(state.image.naturalHeight, (ev.clientY - r.top) * k));
  return [x, y];
}

function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

function setupCanvas() {
  const c = $("canvas");
  let start = null;
  c.addEventListener("mousedown", (ev) => { if (!state.image) return; start = toImage(ev); state.drag = null; ev.preventDefault(); });
  window.addEventListener("mousemove", (ev) => { if (!start) return; state.drag = boxOf(start, toImage(ev)); draw(); });
  window.addEventListener("mouseup", (ev) => {
    if (!start) return;
    const b = boxOf(start, toImage(ev));
    start = null; state.drag = null;
    if (b[2] - b[0] >= 8 && b[3] - b[1] >= 8) state.crop = b;  // a click is not a crop
    draw();
  });
  $("clear-crop").addEventListener("click", () => { state.crop = null; draw(); });
  window.addEventListener("resize", draw);
}

function setupDrop() {
  const d = $("drop");
  d.addEventListener("click", () => $("file").click());
  d.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
  $("file").addEventListener("change", (ev) => setFile(ev.target.files[0]));
  d.addEventListener("dragover", (ev) => { ev.preventDefault(); d.classList.add("over"); });
  d.addEventListener("dragleave", () => d.classList.remove("over"));
  d.addEventListener("drop", (ev) => { ev.preventDefault(); d.classList.remove("over"); setFile(ev.dataTransfer.files[0]); });
}

async function search(ev) {
  ev.preventDefault();
  if (!state.file) { showMessage("Pick a query photo first."); return; }
  const top = Number($("top").value);
  if (!Number.isInteger(top) || top < 1 || top > state.maxTop) {
    showMessage(`${STATUS_TEXT[422]} Results must be a whole number from 1 to ${state.maxTop}.`);
    return;
  }
  const fd = new FormData();
  fd.append("image", state.file, state.file.name || "query.jpg");
  fd.append("top", String(top));
  fd.append("rerank", $("rerank").value);
  if (state.crop) fd.append("crop", state.crop.map((v) => v.toFixed(1)).join(","));
  $("search").disabled = true;
  showMessage("Searching...", "info");
  try {
    const r = await fetch("/api/search", { method: "POST", body: fd });
    if (!r.ok) { showMessage(await apiError(r)); return; }
    const body = await r.json();
    showMessage("");
    state.query = body.query;
    renderResults(body);
  } catch (e) {
    showMessage("The service is not reachable: " + e.message);
  } finally {
    $("search").disabled = false;
  }
}

function renderResults(body) {
  const grid = $("results");
  grid.innerHTML = "";
  $("summary").textContent = `${body.results.length} results in ${Math.round(body.timing_ms)} ms (model ${body.model}, re-ranking ${body.rerank}${body.crop ? ", crop " + body.crop.map(Math.round).join(",") : ""})`;
  for (const hit of body.results) {
    const b = document.createElement("button");
    b.type = "button"; b.className = "result"; b.dataset.id = hit.id;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = hit.path; img.src = `/api/images/${hit.id}?size=256`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const sc = document.createElement("div");
    sc.className = "score"; sc.textContent = `#${hit.rank}  ${hit.score.toFixed(4)}`;
    const p = document.createElement("div");
    p.className = "path"; p.textContent = hit.path; p.title = hit.path;
    meta.append(sc, p); b.append(img, meta);
    b.addEventListener("click", () => openViewer(hit));
    grid.appendChild(b);
  }
}

async function openViewer(hit) {
  $("viewer").hidden = false;
  $("viewer-title").textContent = `#${hit.rank} ${hit.path} (score ${hit.score.toFixed(4)})`;
  $("viewer-status").textContent = "computing the heat map...";
  const img = $("heatmap");
  img.removeAttribute("src");
  img.hidden = true;
  try {
    const r = await fetch(`/api/images/${hit.id}/explain?query=${encodeURIComponent(state.query)}`);
    if (!r.ok) { $("viewer-status").textContent = await apiError(r); return; }
    const blob = await r.blob();
    img.onload = () => { $("viewer-status").textContent = "co-attention heat map of this result for your query"; img.hidden = false; };
    img.src = URL.createObjectURL(blob);
  } catch (e) {
    $("viewer-status").textContent = "The service is not reachable: " + e.message;
  }
}

function closeViewer() { $("viewer").hidden = true; }

window.addEventListener("DOMContentLoaded", () => {
  setupDrop();
  setupCanvas();
  $("options").addEventListener("submit", search);
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) closeViewer(); });
  window.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeViewer(); });
  loadStats();
});
