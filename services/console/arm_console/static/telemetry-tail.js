// ARM console, Telemetry → Live tail: follows the page's server-sent event stream and adds a row
// per new event at the top (text only, never HTML from the stream). No external code.
(function () {
  "use strict";
  var table = document.querySelector("[data-tail-src]");
  if (!table || !window.EventSource) { return; }
  var rows = table.querySelector("[data-tail-rows]");
  var empty = document.querySelector("[data-tail-empty]");
  var state = document.querySelector("[data-tail-state]");
  var counter = document.querySelector("[data-tail-count]");
  var dot = document.querySelector(".tail-status .live-dot");
  var MAX_ROWS = 500, seen = 0;

  function cell(text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text || "—";
    return td;
  }

  function add(e) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-event-id", e.id);
    tr.className = "fresh";
    tr.appendChild(cell(e.time, "small nowrap"));
    var type = document.createElement("td");
    var badge = document.createElement("span");
    badge.className = "badge tag";
    badge.textContent = e.type.replace(/_/g, " ");
    type.appendChild(badge);
    tr.appendChild(type);
    tr.appendChild(cell(e.instance, "mono small"));
    var run = cell("", "mono small");
    if (e.run) {
      run.textContent = "";
      var a = document.createElement("a");
      a.href = "/telemetry/runs/" + encodeURIComponent(e.run);
      a.textContent = e.run;
      run.appendChild(a);
    }
    tr.appendChild(run);
    tr.appendChild(cell(e.tool_call, "mono small"));
    tr.appendChild(cell(e.payload, "mono small clip"));
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > MAX_ROWS) { rows.removeChild(rows.lastChild); }
    seen += 1;
    if (empty) { empty.hidden = true; }
    if (counter) { counter.textContent = seen + (seen === 1 ? " event" : " events") + " since this page opened"; }
  }

  var es = new EventSource(table.getAttribute("data-tail-src"));
  es.addEventListener("ready", function () {
    if (state) { state.textContent = "Live"; }
    if (dot) { dot.classList.add("on"); }
    table.setAttribute("data-tail-ready", "yes");
  });
  es.addEventListener("op_event", function (msg) { add(JSON.parse(msg.data)); });
  es.addEventListener("failed", function (msg) {
    if (state) { state.textContent = "The stream failed: " + JSON.parse(msg.data).message; }
    es.close();
  });
  es.addEventListener("error", function () {
    if (dot) { dot.classList.remove("on"); }
    if (state && es.readyState !== EventSource.CLOSED) { state.textContent = "Reconnecting…"; }
  });
  window.addEventListener("pagehide", function () { es.close(); });
})();
