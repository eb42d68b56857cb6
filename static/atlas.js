// Progressive enhancement only: every page works without this file.
// - A tooltip that shows a token and its activation when the pointer (or focus) is over it.
//   Active tokens carry their value in `title` (the browser's own tooltip without JavaScript);
//   it moves to data-a here so that the two tooltips do not overlap. Inactive tokens read 0.
// - Keys: [ and ] walk to the previous / next latent, / focuses the search box.
(function () {
  "use strict";
  var tipEl = null;
  function tip() { return tipEl || (tipEl = document.getElementById("tip")); }
  function token(ev) { return ev.target && ev.target.closest ? ev.target.closest(".extext .t") : null; }
  function value(el) {
    var t = el.getAttribute("title");
    if (t !== null) { el.setAttribute("data-a", t); el.removeAttribute("title"); }
    return el.getAttribute("data-a") || "0";
  }
  function show(el, x, y) {
    var t = tip();
    if (!t) return;
    t.textContent = "";
    t.appendChild(document.createTextNode(el.textContent + "  "));
    var b = document.createElement("b");
    b.textContent = value(el);
    t.appendChild(b);
    t.hidden = false;
    var left = Math.max(4, Math.min(x + 12, window.innerWidth - t.offsetWidth - 8));
    var top = y + 16;
    if (top + t.offsetHeight > window.innerHeight - 4) top = y - t.offsetHeight - 10;
    t.style.left = left + "px";
    t.style.top = top + "px";
  }
  function hide() { var t = tip(); if (t) t.hidden = true; }
  document.addEventListener("mouseover", function (ev) { var el = token(ev); if (el) show(el, ev.clientX, ev.clientY); });
  document.addEventListener("mousemove", function (ev) { var el = token(ev); if (el) show(el, ev.clientX, ev.clientY); });
  document.addEventListener("mouseout", function (ev) { if (token(ev)) hide(); });
  window.addEventListener("scroll", hide, { passive: true });
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target.closest && ev.target.closest("input, select, textarea, button")) return;
    if (ev.key === "/") {
      var box = document.querySelector(".topsearch input");
      if (box) { ev.preventDefault(); box.focus(); }
      return;
    }
    var rel = ev.key === "[" ? "prev" : ev.key === "]" ? "next" : null;
    var link = rel && document.querySelector('.prevnext a[rel="' + rel + '"]');
    if (link) window.location.href = link.href;
  });
})();
