// Steering page: stream the default and steered continuations token by token.
// Progressive enhancement only: without this file the form posts and the answer is a whole page.
// The API answers POST /api/v1/steer with server-sent events (event: start | token | done | error).
(function () {
  "use strict";
  var form = document.getElementById("steerform");
  if (!form || !window.fetch || !window.TextDecoder || !window.AbortController) return;
  var out = { "default": document.getElementById("steer-default"), "steered": document.getElementById("steer-steered") };
  var errorEl = document.getElementById("steer-error");
  var statusEl = document.getElementById("steer-status");
  var button = form.querySelector("button[type=submit]");
  var running = null;

  function num(v) { v = (v || "").trim(); return v === "" ? null : Number(v); }
  function showError(message) { errorEl.textContent = message; errorEl.hidden = false; }
  function status(text) { statusEl.textContent = text; }

  function body() {
    var fd = new FormData(form);
    var sae = fd.getAll("sae"), index = fd.getAll("index"), strength = fd.getAll("strength");
    var features = [];
    for (var i = 0; i < sae.length; i++) {
      if (!sae[i] && !(index[i] || "").trim()) continue;
      var s = num(strength[i]);
      features.push({ sae: sae[i], index: num(index[i]), strength: s === null ? 0 : s });
    }
    return {
      prompt: fd.get("prompt") || "", features: features, method: fd.get("method") || "add",
      max_new_tokens: num(fd.get("max_new_tokens")), temperature: num(fd.get("temperature")),
      seed: num(fd.get("seed")), chat_template: fd.get("chat_template") === "1", stream: true
    };
  }

  function handle(event, data, counts) {
    if (event === "start") {
      out["default"].textContent = ""; out.steered.textContent = "";
      status("generating with " + (data.model || "the model") + "…");
    } else if (event === "token") {
      var el = out[data.row];
      if (el) { el.appendChild(document.createTextNode(data.text)); counts[data.row] += 1; }
      status("generating… " + counts["default"] + " / " + counts.steered + " tokens");
    } else if (event === "done") {
      out["default"].textContent = data["default"].text; out.steered.textContent = data.steered.text;
      status(data["default"].token_ids.length + " and " + data.steered.token_ids.length + " new tokens.");
    } else if (event === "error") {
      showError((data.error && data.error.message) || "steering failed");
      status("");
    }
  }

  function parseBlock(block, counts) {
    var event = "message", data = "";
    block.split("\n").forEach(function (line) {
      if (line.indexOf("event: ") === 0) event = line.slice(7);
      else if (line.indexOf("data: ") === 0) data += line.slice(6);
    });
    if (data) handle(event, JSON.parse(data), counts);
  }

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (running) running.abort();
    var controller = new AbortController();
    running = controller;
    errorEl.hidden = true;
    button.disabled = true;
    status("waiting for the model…");
    var counts = { "default": 0, "steered": 0 };
    fetch("/api/v1/steer", {
      method: "POST", signal: controller.signal, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(body())
    }).then(function (resp) {
      if (!resp.ok) {
        return resp.json().then(function (e) { showError(e.error ? e.error.message : "error " + resp.status); status(""); },
                                function () { showError("error " + resp.status); status(""); });
      }
      var reader = resp.body.getReader(), decoder = new TextDecoder(), buffer = "";
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          buffer += decoder.decode(chunk.value, { stream: true });
          var cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            parseBlock(buffer.slice(0, cut), counts);
            buffer = buffer.slice(cut + 2);
          }
          return pump();
        });
      }
      return pump();
    }).catch(function (err) {
      if (err.name !== "AbortError") showError("the connection failed: " + err.message);
    }).then(function () {
      if (running === controller) { running = null; button.disabled = false; }
    });
  });
})();
