// ARM console: the little the pages need beyond HTML forms. No external code.
(function () {
  "use strict";

  // Escape closes an open drawer (its close link).
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape") {
      var close = document.querySelector(".drawer [data-close]");
      if (close) { window.location.href = close.getAttribute("href"); }
    }
  });

  // Buttons with data-confirm ask before their form is sent.
  document.addEventListener("submit", function (e) {
    var button = e.submitter;
    var text = button && button.getAttribute("data-confirm");
    if (text && !window.confirm(text)) { e.preventDefault(); }
  });

  // Countdowns: elements with data-expires (ISO time) show the time left, every second.
  function pad(n) { return n < 10 ? "0" + n : "" + n; }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      var left = Math.floor((Date.parse(el.getAttribute("data-expires")) - now) / 1000);
      if (isNaN(left)) { return; }
      if (left <= 0) { el.textContent = "expired"; el.classList.add("soon"); return; }
      var h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      el.textContent = (h > 0 ? h + "h " + pad(m) + "m " : m + "m ") + pad(s) + "s";
      el.classList.toggle("soon", left < 600);
    });
  }
  tick();
  setInterval(tick, 1000);

  // Live regions: a page with [data-live-src] follows that server-sent event stream; on each
  // "changed" event it fetches itself again and swaps every element marked data-live (by id),
  // leaving forms being filled in alone.
  var source = document.querySelector("[data-live-src]");
  if (source && window.EventSource) {
    var dot = document.querySelector(".live-dot");
    var busy = false, again = false;
    var refresh = function () {
      if (busy) { again = true; return; }
      busy = true;
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html", "X-Live-Refresh": "1" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) { return; }
          var doc = new DOMParser().parseFromString(html, "text/html");
          document.querySelectorAll("[data-live]").forEach(function (el) {
            var fresh = doc.getElementById(el.id);
            if (!fresh) { return; }
            // A form someone is filling in stays as it is.
            var typing = el.contains(document.activeElement) && document.activeElement !== document.body;
            var typed = Array.prototype.some.call(el.querySelectorAll("textarea, input:not([type=hidden])"),
                                                  function (i) { return i.value !== ""; });
            if (typing || typed) { return; }
            el.replaceWith(document.importNode(fresh, true));
          });
          document.body.setAttribute("data-live-updated", String(Date.now()));
          tick();
        })
        .catch(function () {})
        .finally(function () { busy = false; if (again) { again = false; refresh(); } });
    };
    var es = new EventSource(source.getAttribute("data-live-src"));
    es.addEventListener("open", function () { if (dot) { dot.classList.add("on"); } });
    es.addEventListener("error", function () { if (dot) { dot.classList.remove("on"); } });
    es.addEventListener("changed", refresh);
  }
})();
