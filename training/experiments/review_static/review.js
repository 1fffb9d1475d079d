// simgen review: the page over the JSON API of training/experiments/review_app.py.
// Plain JavaScript, no build step. Image coordinates: (x, y) px, pixel centres at integers.
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  images: [], index: 0, state: null, pixels: null, shape: null, sorted: null,
  scale: 1, ox: 0, oy: 0, selected: null, addMode: false, hidden: new Set(),
  maxProb: 1, lowList: [], lowPos: -1, bitmap: null, drag: null,
};

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function say(text, ok) {
  const el = $("status");
  el.textContent = text || "";
  el.className = ok ? "ok" : "";
}

// ---- loading ----------------------------------------------------------------------------
async function loadList() {
  const data = await api("/api/images");
  S.images = data.images;
  const sel = $("image-select");
  sel.innerHTML = "";
  for (const im of S.images) {
    const o = document.createElement("option");
    o.value = im.index;
    o.textContent = `${im.name}${im.edits ? ` (${im.edits} edits)` : ""}`;
    sel.appendChild(o);
  }
  sel.value = S.index;
}

async function loadImage(i) {
  S.index = Math.max(0, Math.min(S.images.length - 1, i));
  $("image-select").value = S.index;
  S.selected = null;
  S.lowPos = -1;
  S.state = await api(`/api/images/${S.index}`);
  S.pixels = null;
  S.bitmap = null;
  const res = await fetch(`/api/images/${S.index}/pixels`);
  if (res.ok) {
    const [h, w] = res.headers.get("X-Shape").split(",").map(Number);
    S.pixels = new Float32Array(await res.arrayBuffer());
    S.shape = [h, w];
    S.sorted = Float32Array.from(S.pixels.filter(Number.isFinite)).sort();
    say("");
  } else {
    S.shape = S.state.shape;
    say((await res.json()).error + " (columns are shown on a blank image)");
  }
  buildControls();
  renderBitmap();
  fit();
  refresh();
}

// ---- image and contrast ---------------------------------------------------------------------
function quantile(q) {
  const a = S.sorted;
  if (!a || !a.length) return 0;
  return a[Math.min(a.length - 1, Math.max(0, Math.round((q / 100) * (a.length - 1))))];
}

function renderBitmap() {
  const [h, w] = S.shape;
  const off = document.createElement("canvas");
  off.width = w;
  off.height = h;
  const ctx = off.getContext("2d");
  const img = ctx.createImageData(w, h);
  if (S.pixels) {
    let lo = quantile(+$("lo").value), hi = quantile(+$("hi").value);
    if (!(hi > lo)) hi = lo + 1e-6;
    const g = 1 / +$("gamma").value;
    for (let k = 0; k < S.pixels.length; k++) {
      let t = (S.pixels[k] - lo) / (hi - lo);
      t = t < 0 ? 0 : t > 1 ? 1 : t;
      const v = Math.round(255 * Math.pow(t, g));
      img.data[4 * k] = img.data[4 * k + 1] = img.data[4 * k + 2] = v;
      img.data[4 * k + 3] = 255;
    }
  } else {
    for (let k = 0; k < w * h; k++) { img.data[4 * k + 2] = 40; img.data[4 * k + 3] = 255; }
  }
  ctx.putImageData(img, 0, 0);
  S.bitmap = off;
}

// ---- view transform ---------------------------------------------------------------------------
function canvasSize() {
  const c = $("canvas");
  const r = c.getBoundingClientRect();
  if (c.width !== Math.round(r.width) || c.height !== Math.round(r.height)) {
    c.width = Math.round(r.width);
    c.height = Math.round(r.height);
  }
  return [c.width, c.height];
}

function fit() {
  const [cw, ch] = canvasSize();
  const [h, w] = S.shape;
  S.scale = Math.min(cw / w, ch / h);
  S.ox = (cw - w * S.scale) / 2;
  S.oy = (ch - h * S.scale) / 2;
  draw();
}

// image px (x, y) -> canvas px; the pixel centred at (0, 0) spans [-0.5, 0.5]
function toScreen(x, y) { return [S.ox + (x + 0.5) * S.scale, S.oy + (y + 0.5) * S.scale]; }
function toImage(cx, cy) { return [(cx - S.ox) / S.scale - 0.5, (cy - S.oy) / S.scale - 0.5]; }

// ---- drawing --------------------------------------------------------------------------------
function visible(c) {
  if (S.hidden.has(c.class_id)) return false;
  const p = c.probability === null ? 1 : c.probability;
  return p <= S.maxProb + 1e-9;
}

function draw() {
  const c = $("canvas");
  const [cw, ch] = canvasSize();
  const ctx = c.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, cw, ch);
  if (!S.bitmap || !S.state) return;
  const [h, w] = S.shape;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(S.bitmap, S.ox, S.oy, w * S.scale, h * S.scale);
  if (!$("overlay").checked) return;
  const colour = {};
  for (const k of S.state.classes) colour[k.id] = k.colour;
  const r = Math.max(2, (+$("marker").value / S.state.pixel_size_A) * S.scale);
  ctx.lineWidth = Math.max(1.5, r / 4);
  for (const col of S.state.columns) {
    if (!visible(col)) continue;
    const [sx, sy] = toScreen(col.x, col.y);
    if (sx < -r || sy < -r || sx > cw + r || sy > ch + r) continue;
    ctx.beginPath();
    ctx.arc(sx, sy, r, 0, 2 * Math.PI);
    if (col.detected) {
      ctx.fillStyle = colour[col.class_id] + "b0";
      ctx.fill();
    } else {
      ctx.strokeStyle = colour[col.class_id];
      ctx.stroke();
    }
    if (col.review) {
      ctx.beginPath();
      ctx.arc(sx, sy, r + ctx.lineWidth, 0, 2 * Math.PI);
      ctx.strokeStyle = col.review === "added" ? "#0ff" : "#fff";
      ctx.stroke();
    }
    if (S.selected === col.column) {
      ctx.beginPath();
      ctx.arc(sx, sy, r + 3 * ctx.lineWidth, 0, 2 * Math.PI);
      ctx.strokeStyle = "#ff0";
      ctx.stroke();
    }
  }
}

// ---- side panel -------------------------------------------------------------------------------
function classById(id) { return S.state.classes.find((k) => k.id === id); }
function swatch(colour) { return `<span class="swatch" style="background:${colour}"></span>`; }
function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Math.abs(v) >= 1e4 ? v.toExponential(2) : v.toFixed(digits);
}

function buildControls() {
  const filters = $("class-filters");
  filters.innerHTML = "";
  const add = $("add-class");
  const previous = add.value;
  add.innerHTML = "";
  for (const k of S.state.classes) {
    const lab = document.createElement("label");
    lab.innerHTML = `<input type="checkbox" data-class="${k.id}" ${S.hidden.has(k.id) ? "" : "checked"}>${swatch(k.colour)}${k.name}`;
    lab.querySelector("input").addEventListener("change", (ev) => {
      if (ev.target.checked) S.hidden.delete(k.id); else S.hidden.add(k.id);
      refresh();
    });
    filters.appendChild(lab);
    const o = document.createElement("option");
    o.value = k.name;
    o.textContent = `add as ${k.name}`;
    add.appendChild(o);
  }
  if ([...add.options].some((o) => o.value === previous)) add.value = previous;
}

function selectedColumn() {
  return S.state.columns.find((c) => c.column === S.selected) || null;
}

function refresh() {
  const st = S.state;
  $("image-name").textContent = `${st.name}  (${S.index + 1}/${S.images.length})`;
  $("dirty").textContent = st.dirty ? "unsaved changes" : "";
  // lowest confidence first
  S.lowList = st.columns.filter((c) => visible(c) && c.probability !== null)
    .sort((a, b) => a.probability - b.probability).slice(0, 200);
  const low = $("low-list");
  low.innerHTML = "";
  S.lowList.forEach((c, pos) => {
    const li = document.createElement("li");
    const k = classById(c.class_id);
    li.dataset.column = c.column;
    li.innerHTML = `${swatch(k.colour)}#${c.column} ${k.name} p=${c.probability.toFixed(3)} (${c.site})`;
    if (c.column === S.selected) li.className = "sel";
    li.addEventListener("click", () => { S.lowPos = pos; select(c.column, true); });
    low.appendChild(li);
  });
  // selected column and its allowed classes
  const col = selectedColumn();
  const buttons = $("class-buttons");
  buttons.innerHTML = "";
  if (col) {
    const k = classById(col.class_id);
    $("selected").innerHTML = `#${col.column} at (${col.x.toFixed(1)}, ${col.y.toFixed(1)}) px, ${col.site} site: ${swatch(k.colour)}<b>${k.name}</b>` +
      (col.probability !== null ? `, p=${col.probability.toFixed(3)}` : "") +
      (col.variance ? `, var=${col.variance.toExponential(1)}` : "") +
      (col.review ? ` <i>(${col.review})</i>` : "");
    st.allowed[col.site].forEach((name, pos) => {
      const b = document.createElement("button");
      const kk = st.classes.find((q) => q.name === name);
      b.innerHTML = `${pos < 9 ? pos + 1 + " " : ""}${swatch(kk.colour)}${name}`;
      b.dataset.class = name;
      if (name === k.name) b.className = "current";
      b.addEventListener("click", () => changeClass(name));
      buttons.appendChild(b);
    });
  } else {
    $("selected").textContent = "click a column";
  }
  // counts
  const body = document.querySelector("#counts tbody");
  body.innerHTML = "";
  for (const [name, c] of Object.entries(st.counts.classes)) {
    const k = st.classes.find((q) => q.name === name);
    const tr = document.createElement("tr");
    tr.dataset.class = name;
    if (k && k.defect) tr.className = "defect";
    tr.innerHTML = `<td>${k ? swatch(k.colour) : ""}${name}</td><td class="count">${c.count}</td><td>${fmt(c.per_cm2, 0)}</td><td>${fmt(c.per_site, 4)}</td>`;
    body.appendChild(tr);
  }
  const d = st.counts.defects;
  $("totals").innerHTML = `defects <b id="defect-count">${d.count}</b> (${fmt(d.per_cm2, 0)} cm⁻², ${fmt(d.per_nm2, 4)} nm⁻²) · columns ${st.counts.n_columns} · empty sites ${st.counts.n_empty_sites} · area ${fmt(st.counts.area_nm2, 2)} nm²`;
  // journal
  $("n-edits").textContent = `(${st.edits.length})`;
  const list = $("edit-list");
  list.innerHTML = "";
  for (const e of st.edits) {
    const li = document.createElement("li");
    li.textContent = `${e.action} #${e.column} ${e.old_class || "∅"} → ${e.new_class || "∅"}`;
    list.appendChild(li);
  }
  list.scrollTop = list.scrollHeight;
  $("add-mode").classList.toggle("active", S.addMode);
  $("hint").textContent = S.addMode ? "add mode: click where the missed column is" : "";
  draw();
}

function select(column, centre) {
  S.selected = column;
  const col = selectedColumn();
  if (col && centre) {
    const [cw, ch] = canvasSize();
    const [sx, sy] = toScreen(col.x, col.y);
    if (sx < 0 || sy < 0 || sx > cw || sy > ch) { S.ox += cw / 2 - sx; S.oy += ch / 2 - sy; }
  }
  refresh();
}

// ---- edits ----------------------------------------------------------------------------------
async function post(path, body, message) {
  try {
    S.state = await api(path, body);
    if (S.selected !== null && !selectedColumn()) S.selected = null;
    say(message || "", true);
  } catch (err) {
    say(err.message);
  }
  refresh();
}

function changeClass(name) {
  if (S.selected === null) { say("select a column first"); return; }
  return post(`/api/images/${S.index}/edits`, { action: "change", column: S.selected, class: name });
}

function deleteSelected() {
  if (S.selected === null) { say("select a column first"); return; }
  const column = S.selected;
  S.selected = null;
  return post(`/api/images/${S.index}/edits`, { action: "delete", column });
}

function addAt(x, y) {
  S.addMode = false;
  return post(`/api/images/${S.index}/edits`, { action: "add", x, y, class: $("add-class").value })
    .then(() => { S.selected = S.state.next_column - 1; refresh(); });
}

function undo() { return post(`/api/images/${S.index}/undo`, {}, "undone"); }

async function save() {
  try {
    const r = await api("/api/save", {});
    say(r.written.length ? `saved: ${r.written.join(", ")}` : "nothing to save", true);
    S.state = await api(`/api/images/${S.index}`);
    await loadList();
  } catch (err) {
    say(err.message);
  }
  refresh();
}

function nearest(x, y) {
  let best = null, bestD = Infinity;
  for (const c of S.state.columns) {
    if (!visible(c)) continue;
    const d = Math.hypot(c.x - x, c.y - y);
    if (d < bestD) { bestD = d; best = c; }
  }
  const reach = Math.max(1.0 / S.state.pixel_size_A, 6 / S.scale);
  return bestD <= reach ? best : null;
}

// ---- events ---------------------------------------------------------------------------------
function setup() {
  const c = $("canvas");
  c.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const f = Math.exp(-ev.deltaY * 0.0015);
    const r = c.getBoundingClientRect();
    const mx = ev.clientX - r.left, my = ev.clientY - r.top;
    S.ox = mx - (mx - S.ox) * f;
    S.oy = my - (my - S.oy) * f;
    S.scale *= f;
    draw();
  }, { passive: false });
  c.addEventListener("mousedown", (ev) => {
    S.drag = { x: ev.clientX, y: ev.clientY, ox: S.ox, oy: S.oy, moved: false };
  });
  window.addEventListener("mousemove", (ev) => {
    if (!S.drag) return;
    const dx = ev.clientX - S.drag.x, dy = ev.clientY - S.drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) S.drag.moved = true;
    if (S.drag.moved) { S.ox = S.drag.ox + dx; S.oy = S.drag.oy + dy; draw(); }
  });
  window.addEventListener("mouseup", (ev) => {
    const drag = S.drag;
    S.drag = null;
    if (!drag || drag.moved || ev.target !== c) return;
    const r = c.getBoundingClientRect();
    const [x, y] = toImage(ev.clientX - r.left, ev.clientY - r.top);
    if (S.addMode) { addAt(x, y); return; }
    const col = nearest(x, y);
    select(col ? col.column : null, false);
  });
  $("prev").onclick = () => loadImage(S.index - 1);
  $("next").onclick = () => loadImage(S.index + 1);
  $("image-select").onchange = (ev) => loadImage(+ev.target.value);
  for (const id of ["lo", "hi", "gamma"]) $(id).addEventListener("input", () => { renderBitmap(); draw(); });
  $("overlay").onchange = draw;
  $("marker").addEventListener("input", draw);
  $("fit").onclick = fit;
  $("max-prob").addEventListener("input", (ev) => {
    S.maxProb = +ev.target.value;
    $("max-prob-value").textContent = S.maxProb.toFixed(2);
    refresh();
  });
  $("add-mode").onclick = () => { S.addMode = !S.addMode; refresh(); };
  $("delete").onclick = deleteSelected;
  $("undo").onclick = undo;
  $("save").onclick = save;
  window.addEventListener("resize", draw);
  window.addEventListener("beforeunload", (ev) => {
    if (S.state && S.images.some((im) => im.dirty) || (S.state && S.state.dirty)) ev.preventDefault();
  });
  window.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") return;
    const key = ev.key;
    if ((ev.ctrlKey || ev.metaKey) && key === "z") { ev.preventDefault(); undo(); return; }
    if ((ev.ctrlKey || ev.metaKey) && key === "s") { ev.preventDefault(); save(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (key === "n") loadImage(S.index + 1);
    else if (key === "p") loadImage(S.index - 1);
    else if (key === "a") { S.addMode = !S.addMode; refresh(); }
    else if (key === "x" || key === "Delete" || key === "Backspace") deleteSelected();
    else if (key === "u") undo();
    else if (key === "s") save();
    else if (key === "o") { $("overlay").checked = !$("overlay").checked; draw(); }
    else if (key === "f") fit();
    else if (key === "Escape") { S.addMode = false; select(null); }
    else if (key === "j" || key === "k") {
      if (!S.lowList.length) return;
      S.lowPos = Math.max(0, Math.min(S.lowList.length - 1, S.lowPos + (key === "j" ? 1 : -1)));
      select(S.lowList[S.lowPos].column, true);
    } else if (/^[1-9]$/.test(key)) {
      const col = selectedColumn();
      const names = col ? S.state.allowed[col.site] : [];
      if (+key <= names.length) changeClass(names[+key - 1]);
    }
  });
}

// exposed for tests and the console
window.review = { S, toScreen, toImage, loadImage, save, undo };

setup();
loadList().then(() => loadImage(0)).catch((err) => say(err.message));
