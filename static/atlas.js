// Progressive enhancement only: every page works without this file.
// A tooltip that shows a token and its activation when the pointer is over it.
(function () {
  "use strict";
  function tip() { return document.getElementById("tip"); }
  function show(el, x, y) {
    var t = tip();
    if (!t) return;
    t.textContent = el.textContent + "  " + el.getAttribute("data-a");
    t.hidden = false;
    t.style.left = Math.min(x + 12, window.innerWidth - t.offsetWidth - 8) + "px";
    t.style.top = (y + 14) + "px";
  }
  document.addEventListener("mouseover", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".t") : null;
    if (el) { show(el, ev.clientX, ev.clientY); el.removeAttribute("title"); }
  });
  document.addEventListener("mousemove", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".t") : null;
    if (el) show(el, ev.clientX, ev.clientY);
  });
  document.addEventListener("mouseout", function (ev) {
    var el = ev.target.closest ? ev.target.closest(".t") : null;
    if (el && tip()) tip().hidden = true;
  });
  // Keyboard: [ and ] walk to the previous / next latent on a feature page.
  document.addEventListener("keydown", function (ev) {
    if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
    var rel = ev.key === "[" ? "prev" : ev.key === "]" ? "next" : null;
    var link = rel && document.querySelector('a[rel="' + rel + '"]');
    if (link) window.location.href = link.href;
  });
})();
