// The map of an SAE's latents on a canvas: pan (drag), zoom (wheel), hover (explanation),
// click (the latent's page), search (highlight matching explanations), colour by cluster or density.
// No library: 16k points are a few thousand fillRect calls per frame, batched by colour.
(function () {
  "use strict";
  const canvas = document.getElementById("atlasmap");
  if (!canvas) return;
  const tip = document.getElementById("maptip");
  const status = document.getElementById("mapstatus");
  const search = document.getElementById("mapsearch");
  const colourSel = document.getElementById("mapcolour");
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
  const GREY = "#c9ced6";
  const DENSITY = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b", "#041a3a"]; // log10 density -7 .. -1
  const ctx = canvas.getContext("2d");
  let n = 0, xs, ys, idx, cluster, density, expl, lower, clusters = [];
  let view = { s: 1, tx: 0, ty: 0 }, fitView = null, matches = null, hover = -1;
  const focus = canvas.dataset.focus !== undefined ? Number(canvas.dataset.focus) : null;
  let focusAt = -1, queued = false;

  function size() {
    const r = canvas.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(r.width * dpr));
    canvas.height = Math.max(1, Math.round(r.height * dpr));
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return r;
  }
  function fit() {
    const r = canvas.getBoundingClientRect();
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < n; i++) { x0 = Math.min(x0, xs[i]); x1 = Math.max(x1, xs[i]); y0 = Math.min(y0, ys[i]); y1 = Math.max(y1, ys[i]); }
    const s = 0.92 * Math.min(r.width / ((x1 - x0) || 1), r.height / ((y1 - y0) || 1));
    return { s: s, tx: r.width / 2 - s * (x0 + x1) / 2, ty: r.height / 2 + s * (y0 + y1) / 2 };
  }
  const sx = (i) => view.tx + view.s * xs[i];
  const sy = (i) => view.ty - view.s * ys[i];
  function colourOf(i) {
    if (colourSel && colourSel.value === "density") {
      const d = density[i] > 0 ? Math.log10(density[i]) : -8;
      return DENSITY[Math.max(0, Math.min(DENSITY.length - 1, Math.floor(d + 7)))];
    }
    return cluster[i] >= 0 ? PALETTE[cluster[i] % 10] : GREY;
  }
  function draw() {
    queued = false;
    const r = canvas.getBoundingClientRect();
    ctx.clearRect(0, 0, r.width, r.height);
    const sz = Math.max(1.5, Math.min(6, 1.2 * Math.sqrt(view.s / fitView.s) + 1));
    const buckets = new Map();
    for (let i = 0; i < n; i++) {
      const x = sx(i), y = sy(i);
      if (x < -5 || y < -5 || x > r.width + 5 || y > r.height + 5) continue;
      const c = matches && !matches[i] ? "#e6e9ee" : colourOf(i);
      let b = buckets.get(c);
      if (!b) { b = []; buckets.set(c, b); }
      b.push(x, y);
    }
    for (const [c, b] of buckets) {
      ctx.fillStyle = c;
      for (let k = 0; k < b.length; k += 2) ctx.fillRect(b[k] - sz / 2, b[k + 1] - sz / 2, sz, sz);
    }
    if (matches) {  // matches on top, outlined
      ctx.strokeStyle = "#111";
      for (let i = 0; i < n; i++) if (matches[i]) { ctx.fillStyle = colourOf(i); ctx.fillRect(sx(i) - 3, sy(i) - 3, 6, 6); ctx.strokeRect(sx(i) - 3, sy(i) - 3, 6, 6); }
    }
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "center";
    for (const c of clusters.slice(0, 24)) {  // labels of the largest clusters
      const x = view.tx + view.s * c.x, y = view.ty - view.s * c.y;
      ctx.lineWidth = 3; ctx.strokeStyle = "rgba(255,255,255,.85)"; ctx.strokeText(c.label, x, y);
      ctx.fillStyle = "#222"; ctx.fillText(c.label, x, y);
    }
    ctx.lineWidth = 2;
    for (const [i, col] of [[focusAt, "#d00"], [hover, "#111"]]) {
      if (i < 0) continue;
      ctx.strokeStyle = col; ctx.beginPath(); ctx.arc(sx(i), sy(i), 7, 0, 2 * Math.PI); ctx.stroke();
    }
  }
  function redraw() { if (!queued) { queued = true; requestAnimationFrame(draw); } }
  function nearest(px, py, radius) {
    let best = -1, bd = radius * radius;
    for (let i = 0; i < n; i++) {
      const dx = sx(i) - px, dy = sy(i) - py, d = dx * dx + dy * dy;
      if (d < bd && (!matches || matches[i])) { bd = d; best = i; }
    }
    return best;
  }
  function local(e) { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }

  let drag = null;
  canvas.addEventListener("pointerdown", (e) => { const [x, y] = local(e); drag = { x: x, y: y, tx: view.tx, ty: view.ty, moved: 0 }; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointermove", (e) => {
    const [x, y] = local(e);
    if (drag) {
      drag.moved = Math.max(drag.moved, Math.abs(x - drag.x) + Math.abs(y - drag.y));
      if (drag.moved > 3) { canvas.classList.add("dragging"); view.tx = drag.tx + x - drag.x; view.ty = drag.ty + y - drag.y; redraw(); return; }
    }
    const i = nearest(x, y, 8);
    if (i !== hover) { hover = i; redraw(); }
    if (i >= 0) {
      tip.hidden = false;
      tip.textContent = "#" + idx[i] + (expl[i] ? " · " + expl[i] : "") + (cluster[i] >= 0 && clusters[cluster[i]] ? "  [" + clusters[cluster[i]].label + "]" : "");
      tip.style.left = Math.min(x + 14, canvas.clientWidth - 200) + "px";
      tip.style.top = (y + 14) + "px";
    } else tip.hidden = true;
  });
  canvas.addEventListener("pointerup", (e) => {
    const [x, y] = local(e);
    const wasDrag = drag && drag.moved > 3;
    drag = null; canvas.classList.remove("dragging");
    if (!wasDrag) { const i = nearest(x, y, 8); if (i >= 0) window.location.href = canvas.dataset.feature + idx[i]; }
  });
  canvas.addEventListener("pointerleave", () => { tip.hidden = true; if (hover >= 0) { hover = -1; redraw(); } });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const [x, y] = local(e), k = Math.exp(-e.deltaY * 0.0015);
    const s = Math.max(fitView.s * 0.5, Math.min(fitView.s * 400, view.s * k));
    view.tx = x - (x - view.tx) * (s / view.s); view.ty = y - (y - view.ty) * (s / view.s); view.s = s;
    redraw();
  }, { passive: false });
  if (search) search.addEventListener("input", () => {
    const q = search.value.trim().toLowerCase();
    if (!q) { matches = null; status.textContent = n.toLocaleString() + " latents"; redraw(); return; }
    matches = new Uint8Array(n); let m = 0;
    for (let i = 0; i < n; i++) if (lower[i].includes(q)) { matches[i] = 1; m++; }
    status.textContent = m.toLocaleString() + " of " + n.toLocaleString() + " latents match";
    redraw();
  });
  document.getElementById("mapbar").addEventListener("submit", (e) => e.preventDefault());
  if (colourSel) colourSel.addEventListener("change", redraw);
  document.getElementById("mapreset").addEventListener("click", () => { view = Object.assign({}, fitView); redraw(); });
  window.addEventListener("resize", () => { size(); redraw(); });

  fetch(canvas.dataset.src, { headers: { Accept: "application/json" } }).then((r) => {
    if (!r.ok) throw new Error("the map could not be loaded (" + r.status + ")");
    return r.json();
  }).then((data) => {
    const p = data.points;
    n = p.index.length; idx = p.index; xs = Float64Array.from(p.x); ys = Float64Array.from(p.y);
    cluster = Int32Array.from(p.cluster.map((c) => (c === null ? -1 : c))); density = Float64Array.from(p.density);
    expl = p.explanation.map((e) => e || ""); lower = expl.map((e) => e.toLowerCase());
    clusters = data.clusters;
    size();
    fitView = fit(); view = Object.assign({}, fitView);
    if (focus !== null) {
      focusAt = idx.indexOf(focus);
      if (focusAt >= 0) { view.s = fitView.s * 4; const r = canvas.getBoundingClientRect(); view.tx = r.width / 2 - view.s * xs[focusAt]; view.ty = r.height / 2 + view.s * ys[focusAt]; }
    }
    status.textContent = n.toLocaleString() + " latents · " + clusters.length + " clusters";
    draw();
    canvas.dataset.ready = "1";
    // for tests and scripts: where a latent is drawn, in CSS pixels relative to the canvas
    window.atlasMap = { firstPaintMs: performance.now(), screenOf: (latent) => { const i = idx.indexOf(latent); return i < 0 ? null : [sx(i), sy(i)]; } };
  }).catch((err) => { status.textContent = String(err.message || err); });
})();
