"""The page at GET /: pick or drop a photo -> top-5 with bars, the CAM overlay, similar training images, and for a
calibrated model the plain answer: "one of: A, B (95%)", or "not one of the N classes I know".

Self-contained: one HTML document with its CSS and JS inline, no CDN, no font or script from elsewhere (the
Content-Security-Policy sent with it forbids them), so it works offline. It talks to the API with relative URLs
(`model`, `predict`, `gallery/N`), so it also works behind a path prefix. Text from the API is inserted with
textContent only. `body[data-state]` is idle | loading | done | error, for people and for the browser test.
"""

from __future__ import annotations

PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'"
)

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2329;background:#f4f6f8}
header{background:#1f3a4d;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
#model-info{opacity:.8;font-size:13px}
main{max-width:980px;margin:0 auto;padding:20px}
#drop{display:block;border:2px dashed #8aa1b1;border-radius:10px;padding:28px;text-align:center;background:#fff;
  cursor:pointer}
#drop.over{border-color:#1f7a4d;background:#eef8f2}
#drop input{display:block;margin:10px auto 0}
#error{display:none;margin:14px 0;padding:10px 14px;border-radius:8px;background:#fde8e8;color:#8a1c1c;
  border:1px solid #f1b5b5}
body[data-state=error] #error{display:block}
#status{margin:10px 0;color:#4a5a66;min-height:1.4em}
#result{display:none;gap:20px;margin-top:10px;grid-template-columns:260px 1fr}
body[data-state=done] #result{display:grid}
figure{margin:0}
figure img{width:100%;border-radius:8px;background:#dde3e8}
figcaption{font-size:12px;color:#4a5a66}
#top{list-style:none;padding:0;margin:0}
#top li{display:grid;grid-template-columns:2fr 3fr 4em;gap:8px;align-items:center;margin:6px 0}
#top .name{overflow-wrap:anywhere}
#top li:first-child .name{font-weight:600}
.bar{background:#dde3e8;border-radius:4px;height:14px;overflow:hidden}
.fill{background:#2f7fb5;height:100%}
#top li:first-child .fill{background:#1f7a4d}
.pct{text-align:right;font-variant-numeric:tabular-nums}
#neighbours{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:10px}
#nn-note{font-size:13px;color:#4a5a66}
h2{font-size:16px;margin:18px 0 8px}
#answer{display:none;margin:0 0 10px;padding:8px 12px;border-radius:8px;background:#eef4f8;font-weight:600}
#answer.unknown{background:#fff4e0;color:#7a4a00}
#photo{position:relative}
#photo img{display:block}
#zoombox{display:none;position:absolute;border:3px solid #f0b400;border-radius:3px;pointer-events:none}
"""

_BODY = """
<header><h1>finegrain</h1><div id="model-info">loading the model description...</div></header>
<main>
  <label id="drop" for="file">Drop a photo here, or choose one
    <input id="file" type="file" accept="image/*">
  </label>
  <div id="error" role="alert"></div>
  <div id="status" role="status"></div>
  <div id="result">
    <div>
      <figure><div id="photo"><img id="preview" alt="your photo"><div id="zoombox"></div></div>
        <figcaption id="photo-caption">your photo</figcaption></figure>
      <figure id="cam-figure"><img id="cam" alt="where the model looks (CAM)">
        <figcaption id="cam-caption">where the model looks</figcaption></figure>
    </div>
    <div>
      <p id="answer" role="status"></p>
      <h2>Top 5</h2>
      <ol id="top"></ol>
      <h2>Similar training images</h2>
      <div id="neighbours"></div>
      <p id="nn-note"></p>
    </div>
  </div>
</main>
"""

_JS = r"""
const $ = (id) => document.getElementById(id);
let maxBytes = 20 * 1024 * 1024;
let calibrated = false, nClasses = 0;
const COVERAGE = 0.95;
const pretty = (c) => c.replace(/^\d+[._-]/, "").replace(/_/g, " ");
function setState(s) { document.body.dataset.state = s; }
function showError(msg) {
  $("error").textContent = msg; $("status").textContent = ""; setState("error");
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
fetch("model").then((r) => r.json()).then((m) => {
  $("model-info").textContent =
    `${m.name || "model"}: ${m.num_classes} classes, ${m.kind}, ${m.backbone || ""}`;
  if (m.limits) maxBytes = m.limits.max_upload_bytes;
  calibrated = !!m.prediction_sets; nClasses = m.num_classes;
}).catch(() => { $("model-info").textContent = "model description unavailable"; });

function renderTop(top) {
  const ol = $("top"); ol.replaceChildren();
  for (const t of top) {
    const li = el("li"); li.dataset.class = t.class;
    const name = el("span", "name", pretty(t.class)); name.title = t.class;
    const bar = el("div", "bar"), fill = el("div", "fill");
    fill.style.width = (100 * t.probability).toFixed(1) + "%"; bar.append(fill);
    li.append(name, bar, el("span", "pct", (100 * t.probability).toFixed(1) + "%"));
    ol.append(li);
  }
}
function renderAnswer(body) {
  const a = $("answer");
  a.className = ""; a.style.display = body.set ? "block" : "none";
  if (!body.set) return;
  const pct = Math.round(100 * body.coverage) + "%";
  if (body.unknown) {
    a.className = "unknown";
    a.textContent = `Not one of the ${nClasses} classes I know (closest: ${pretty(body.top[0].class)})`;
  } else if (body.set.length === 1) {
    a.textContent = `${pretty(body.set[0].class)} (${pct} sure)`;
  } else {
    a.textContent = `One of: ${body.set.map((s) => pretty(s.class)).join(", ")} (${pct})`;
  }
}
function renderZoom(zoom) {
  const z = $("zoombox");
  z.style.display = zoom ? "block" : "none";
  $("photo-caption").textContent = zoom ? "your photo, and where the model looked closer" : "your photo";
  if (!zoom) return;
  const [x0, y0, x1, y1] = zoom.box;
  Object.assign(z.style, { left: `${100 * x0}%`, top: `${100 * y0}%`, width: `${100 * (x1 - x0)}%`,
    height: `${100 * (y1 - y0)}%` });
}
function renderCam(cam) {
  $("cam-figure").style.display = cam && cam.image ? "" : "none";
  if (cam && cam.image) {
    $("cam").src = cam.image;
    $("cam-caption").textContent = `where the model looks (${cam.method}, ${pretty(cam.class)})`;
  }
}
function renderNeighbours(list, note) {
  const box = $("neighbours"); box.replaceChildren();
  for (const n of list || []) {
    const f = el("figure");
    if (n.image) { const img = el("img"); img.src = `gallery/${n.row}`; img.alt = n.class; f.append(img); }
    f.append(el("figcaption", "", `${pretty(n.class)} (similarity ${n.similarity.toFixed(3)})`));
    box.append(f);
  }
  $("nn-note").textContent = list && list.length ? (list[0].image ? "" : note) : (note || "");
}
async function send(file) {
  $("error").textContent = "";
  if (!file) return;
  if (file.size > maxBytes) {
    return showError(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB: the limit is ${maxBytes / 1048576} MB`);
  }
  setState("loading"); $("status").textContent = `classifying ${file.name}...`;
  $("preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [k, v] of [["k", "5"], ["cam", "true"], ["neighbours", "true"]]) form.append(k, v);
  if (calibrated) form.append("coverage", String(COVERAGE));
  let r, body;
  try { r = await fetch("predict", { method: "POST", body: form }); }
  catch (e) { return showError(`upload failed: ${e.message}`); }
  try { body = await r.json(); }
  catch (e) { return showError(`the server answered ${r.status} without a readable body`); }
  if (!r.ok) return showError(`${file.name}: ${body.error || "error " + r.status}`);
  renderAnswer(body); renderZoom(body.zoom); renderTop(body.top); renderCam(body.cam);
  renderNeighbours(body.neighbours, body.neighbours_note);
  $("status").textContent = `${pretty(body.top[0].class)}: ${(100 * body.top[0].probability).toFixed(1)}%` +
    ` (${body.time_ms} ms)`;
  setState("done");
}
$("file").addEventListener("change", (e) => send(e.target.files[0]));
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => send(e.dataTransfer.files[0]));
setState("idle");
"""


def page_html() -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>finegrain</title><style>{_CSS}</style></head>\n"
        f'<body data-state="loading">{_BODY}<script>{_JS}</script></body></html>\n'
    )
