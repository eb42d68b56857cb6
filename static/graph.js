// An attribution graph (circuit-tracer's graph JSON from /api/v1/graphs/{slug}) as SVG, no library:
// nodes by layer (rows, embeddings at the bottom, logits on top) x token position (columns), edges
// coloured by sign and as wide as their weight; a slider keeps nodes up to a share of cumulative
// influence (the nodes' stored `influence`); hover shows a feature's explanation and top
// activations when its layer's transcoder is published; click pins, shift-click opens the feature
// page; pinned nodes group into supernodes; pins and supernodes live in the URL's fragment (a graph
// stored with qParams.pinnedIds / supernodes opens with those when the URL names none).
(function () {
  "use strict";
  const svg = document.getElementById("graphsvg");
  if (!svg) return;
  const NS = "http://www.w3.org/2000/svg";
  const tip = document.getElementById("graphtip");
  const prune = document.getElementById("graphprune"), pruneOut = document.getElementById("graphprunev");
  const edgeCut = document.getElementById("graphedge"), count = document.getElementById("graphcount");
  const pinnedList = document.getElementById("graphpinned"), superList = document.getElementById("graphsupernodes");
  const saes = JSON.parse(svg.dataset.saes || "{}");
  const COL = 90, ROW = 46, PAD = 40;
  let nodes = [], links = [], byId = new Map(), nLayers = 0, nPos = 0, tokens = [];
  const pinned = new Set();
  let supernodes = []; // [{name, ids: [...]}]
  const cache = new Map();

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function rowOf(n) {
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return nLayers + 1;
    return Number(n.layer) + 1;
  }
  function featureRef(n) { // [published SAE name, latent index] of a transcoder feature, or null
    if (n.feature_type !== "cross layer transcoder") return null;
    const parts = n.node_id.split("_"), name = saes[parts[0]];
    return name ? [name, Number(parts[1])] : null;
  }
  function label(n) {
    if (n.clerp) return n.clerp;
    const p = n.node_id.split("_");
    if (n.feature_type === "embedding") return "token " + JSON.stringify(tokens[n.ctx_idx] || "") + " @" + n.ctx_idx;
    if (n.feature_type === "mlp reconstruction error") return "error L" + n.layer + " @" + n.ctx_idx;
    return "L" + p[0] + " #" + p[1] + " @" + p[2];
  }

  function layout() {
    const cells = new Map();
    for (const n of nodes) {
      const key = rowOf(n) + ":" + n.ctx_idx;
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    for (const group of cells.values()) {
      group.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
      group.forEach((n, i) => {
        const spread = Math.min(COL - 16, 12 * (group.length - 1));
        const off = group.length > 1 ? -spread / 2 + spread * i / (group.length - 1) : 0;
        n.x = PAD + n.ctx_idx * COL + COL / 2 + off;
        n.y = PAD + (nLayers + 1 - rowOf(n)) * ROW + ((i % 2) ? 6 : -6) * (group.length > 1);
      });
    }
  }

  function kept() {
    const t = Number(prune.value);
    const keep = new Set();
    for (const n of nodes) {
      const always = n.feature_type === "embedding" || n.feature_type === "logit" || pinned.has(n.node_id);
      if (always || n.influence === null || n.influence === undefined || n.influence <= t) keep.add(n.node_id);
    }
    return keep;
  }

  function draw() {
    pruneOut.textContent = Number(prune.value).toFixed(2);
    const keep = kept();
    const maxW = links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 0) || 1;
    const cut = Number(edgeCut.value) * maxW;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const w = PAD * 2 + nPos * COL, h = PAD * 2 + (nLayers + 2) * ROW;
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("width", w);
    svg.setAttribute("height", h);
    const grid = el("g", { class: "grid" }, svg);
    tokens.forEach((t, i) => {
      const x = PAD + i * COL + COL / 2;
      el("text", { x: x, y: h - 8, class: "tok", "text-anchor": "middle" }, grid).textContent = t.length > 10 ? t.slice(0, 9) + "…" : t;
    });
    for (let r = 0; r <= nLayers + 1; r++) {
      const y = PAD + (nLayers + 1 - r) * ROW;
      el("text", { x: 4, y: y + 4, class: "lay" }, grid).textContent = r === 0 ? "E" : r === nLayers + 1 ? "logit" : "L" + (r - 1);
    }
    const edges = el("g", { class: "edges" }, svg);
    let nEdges = 0;
    for (const l of links) {
      if (!keep.has(l.source) || !keep.has(l.target) || Math.abs(l.weight) < cut) continue;
      const s = byId.get(l.source), t = byId.get(l.target);
      el("line", { x1: s.x, y1: s.y, x2: t.x, y2: t.y, class: l.weight >= 0 ? "pos" : "neg",
        "stroke-width": (0.4 + 4 * Math.abs(l.weight) / maxW).toFixed(2), "data-source": l.source, "data-target": l.target }, edges);
      nEdges++;
    }
    const group = el("g", { class: "nodes" }, svg);
    const inSuper = new Map();
    supernodes.forEach((s, i) => s.ids.forEach((id) => inSuper.set(id, i)));
    let nNodes = 0;
    for (const n of nodes) {
      if (!keep.has(n.node_id)) continue;
      const cls = "node " + n.feature_type.replace(/ /g, "-") + (pinned.has(n.node_id) ? " pinned" : "") +
        (inSuper.has(n.node_id) ? " super k" + (inSuper.get(n.node_id) % 10) : "");
      const shape = n.feature_type === "cross layer transcoder" || n.feature_type === "logit"
        ? el("circle", { cx: n.x, cy: n.y, r: 6, class: cls }, group)
        : el("rect", { x: n.x - 5, y: n.y - 5, width: 10, height: 10, class: cls }, group);
      shape.dataset.id = n.node_id;
      nNodes++;
    }
    count.textContent = nNodes + " nodes, " + nEdges + " edges shown";
  }

  // --- hover, pins, supernodes --------------------------------------------------------------
  function showTip(n, evt) {
    tip.hidden = false;
    tip.replaceChildren();
    const head = document.createElement("b");
    head.textContent = label(n);
    tip.appendChild(head);
    const meta = document.createElement("div");
    meta.className = "small";
    meta.textContent = n.node_id + (n.activation !== null && n.activation !== undefined ? " · act " + n.activation.toFixed(3) : "") +
      (n.influence !== null && n.influence !== undefined ? " · cumulative influence " + n.influence.toFixed(3) : "");
    tip.appendChild(meta);
    const rect = svg.parentElement.getBoundingClientRect();
    tip.style.left = Math.min(rect.width - 260, evt.clientX - rect.left + 12) + "px";
    tip.style.top = (evt.clientY - rect.top + 12) + "px";
    const ref = featureRef(n);
    if (!ref) return;
    const url = "/api/v1/saes/" + encodeURIComponent(ref[0]) + "/features/" + ref[1];
    const fill = (f) => {
      if (tip.hidden || tip.dataset.for !== n.node_id) return;
      const ex = document.createElement("div");
      ex.textContent = f.explanation || "(no explanation yet)";
      tip.appendChild(ex);
      for (const e of ((f.examples && f.examples.top) || []).slice(0, 3)) {
        const row = document.createElement("div");
        row.className = "ex small";
        const lo = Math.max(0, e.peak - 6);
        row.textContent = e.activation.toFixed(2) + "  " + e.tokens.slice(lo, e.peak + 3).join("");
        tip.appendChild(row);
      }
    };
    tip.dataset.for = n.node_id;
    if (cache.has(url)) { fill(cache.get(url)); return; }
    fetch(url, { headers: { Accept: "application/json" } }).then((r) => r.ok ? r.json() : null)
      .then((f) => { if (f) { cache.set(url, f); fill(f); } }).catch(() => {});
  }

  function saveHash() {
    const parts = [];
    if (pinned.size) parts.push("pinned=" + [...pinned].map(encodeURIComponent).join(","));
    if (supernodes.length) parts.push("supernodes=" + supernodes.map((s) => encodeURIComponent(s.name) + ":" + s.ids.map(encodeURIComponent).join("|")).join(";"));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
  }
  function loadHash(preset) {
    if (!location.hash.slice(1) && preset) { // the stored graph's own pins and supernodes (circuit-tracer's qParams)
      (preset.pinnedIds || []).filter((id) => byId.has(id)).forEach((id) => pinned.add(id));
      supernodes = (preset.supernodes || []).map((s) => ({ name: String(s[0] || "supernode"), ids: s.slice(1).filter((id) => byId.has(id)) }))
        .filter((s) => s.ids.length);
      return;
    }
    const h = new URLSearchParams(location.hash.slice(1));
    (h.get("pinned") || "").split(",").filter((id) => byId.has(id)).forEach((id) => pinned.add(id));
    supernodes = (h.get("supernodes") || "").split(";").filter(Boolean).map((s) => {
      const [name, ids] = s.split(":");
      return { name: name || "supernode", ids: (ids || "").split("|").filter((id) => byId.has(id)) };
    }).filter((s) => s.ids.length);
  }
  function renderLists() {
    pinnedList.replaceChildren();
    for (const id of pinned) {
      const li = document.createElement("li");
      li.textContent = label(byId.get(id));
      pinnedList.appendChild(li);
    }
    superList.replaceChildren();
    supernodes.forEach((s, i) => {
      const li = document.createElement("li");
      li.className = "k" + (i % 10);
      li.textContent = s.name + ": " + s.ids.map((id) => label(byId.get(id))).join(", ");
      superList.appendChild(li);
    });
    steerTarget();
  }
  function update() { saveHash(); renderLists(); draw(); }

  svg.addEventListener("mousemove", (evt) => {
    const id = evt.target.dataset && evt.target.dataset.id;
    if (id) showTip(byId.get(id), evt); else tip.hidden = true;
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; });
  svg.addEventListener("click", (evt) => {
    const id = evt.target.dataset && evt.target.dataset.id;
    if (!id) return;
    const ref = featureRef(byId.get(id));
    if ((evt.shiftKey || evt.metaKey || evt.ctrlKey) && ref) {
      location.href = "/saes/" + encodeURIComponent(ref[0]) + "/features/" + ref[1];
      return;
    }
    if (pinned.has(id)) pinned.delete(id); else pinned.add(id);
    update();
  });
  prune.addEventListener("input", draw);
  edgeCut.addEventListener("input", draw);
  document.getElementById("graphclear").addEventListener("click", () => { pinned.clear(); supernodes = []; update(); });
  document.getElementById("graphgroup").addEventListener("click", () => {
    const ids = [...pinned].filter((id) => !supernodes.some((s) => s.ids.includes(id)));
    if (ids.length < 2) { count.textContent = "pin two or more nodes to group them"; return; }
    const name = (window.prompt("Name of the supernode", "supernode " + (supernodes.length + 1)) || "").trim() || "supernode " + (supernodes.length + 1);
    supernodes.push({ name: name.replace(/[:;|]/g, " "), ids: ids });
    update();
  });

  // --- steering -----------------------------------------------------------------------------
  // The pinned feature or error node, changed in the graph's frozen model (its linear prediction)
  // and/or the live one (the real model in the inference service); one column of "after" per model.
  const steerForm = document.getElementById("graphsteer"), steerNode = document.getElementById("steernode");
  const steerOut = document.getElementById("steerresult"), steerHow = document.getElementById("steerhow");
  const STEERABLE = ["cross layer transcoder", "mlp reconstruction error"];
  let steerId = null;
  function steerTarget() {
    steerId = [...pinned].reverse().find((id) => STEERABLE.includes(byId.get(id).feature_type)) || null;
    const n = steerId ? byId.get(steerId) : null;
    const isError = n && n.feature_type === "mlp reconstruction error";
    steerNode.textContent = !n ? "pin a feature or error node first"
      : label(n) + (isError ? "" : " (act " + n.activation.toFixed(3) + ")");
    steerHow.querySelector("option[value=value]").disabled = !!isError;
    if (isError) steerHow.value = "multiplier";
  }
  function cellRow(table, cells, header) {
    const row = table.insertRow();
    cells.forEach((t) => {
      const c = header ? document.createElement("th") : row.insertCell();
      c.textContent = t;
      if (header) row.appendChild(c);
    });
  }
  function showSteer(results) {
    steerOut.replaceChildren();
    const done = results.filter((r) => r.ok);
    results.filter((r) => !r.ok).forEach((r) => {
      const p = document.createElement("p");
      p.className = "muted small steererror";
      p.dataset.mode = r.mode;
      p.textContent = r.mode + ": " + ((r.body.error && r.body.error.message) || "steering failed");
      steerOut.appendChild(p);
    });
    if (!done.length) return;
    const first = done[0].body;
    const table = document.createElement("table");
    table.className = "table small steertop";
    cellRow(table, ["before", "p"].concat(...done.map((r) => ["after, " + r.mode, "p"])), true);
    for (let i = 0; i < first.before.length; i++) {
      const b = first.before[i];
      cellRow(table, [b.token, b.prob.toPrecision(3)].concat(...done.map((r) => {
        const a = r.body.after[i];
        return a ? [a.token, a.prob.toPrecision(3)] : ["", ""];
      })));
    }
    steerOut.appendChild(table);
    if (first.targets && first.targets.length) {
      const t = document.createElement("table");
      t.className = "table small steertargets";
      cellRow(t, ["graph's logit", "p before"].concat(...done.map((r) => ["p after, " + r.mode, "Δ logit"])), true);
      first.targets.forEach((tg, i) => {
        cellRow(t, [tg.token, tg.prob_before.toPrecision(3)].concat(...done.map((r) => {
          const x = r.body.targets[i];
          return [x.prob_after.toPrecision(3), (x.logit_after - x.logit_before).toFixed(3)];
        })));
      });
      steerOut.appendChild(t);
    }
  }
  steerForm.addEventListener("submit", (evt) => {
    evt.preventDefault();
    if (!steerId) return;
    const n = byId.get(steerId);
    const body = { node_id: steerId, kind: n.feature_type === "mlp reconstruction error" ? "error" : "feature" };
    body[steerHow.value] = Number(document.getElementById("steervalue").value);
    const which = document.getElementById("steermode").value;
    const modes = which === "both" ? ["frozen", "live"] : [which];
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    steerOut.textContent = "steering…";
    Promise.all(modes.map((mode) => fetch(svg.dataset.steer, { method: "POST", headers: headers, credentials: "same-origin",
      body: JSON.stringify(Object.assign({ mode: mode }, body)) })
      .then((r) => r.json().then((b) => ({ ok: r.ok, body: b, mode: mode })))
      .catch(() => ({ ok: false, body: {}, mode: mode }))))
      .then(showSteer);
  });

  fetch(svg.dataset.src, { headers: { Accept: "application/json" } }).then((r) => r.json()).then((body) => {
    const g = body.graph;
    if (!g) return;
    nodes = g.nodes;
    links = g.links;
    tokens = g.metadata.prompt_tokens || [];
    nPos = Math.max(tokens.length, 1 + nodes.reduce((m, n) => Math.max(m, n.ctx_idx), 0));
    nLayers = nodes.reduce((m, n) => n.feature_type === "logit" ? Math.max(m, Number(n.layer) - 1) : m, 0);
    nodes.forEach((n) => byId.set(n.node_id, n));
    const caption = document.getElementById("graphcaption");
    if (caption && g.metadata.caption) { caption.textContent = g.metadata.caption; caption.hidden = false; }
    layout();
    loadHash(g.qParams);
    renderLists();
    draw();
    svg.dataset.ready = "1";
  });
})();
