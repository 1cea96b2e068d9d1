// Keeps the web view of mirrorvol serve --http live: the server sends the
// view again (HTML it renders from status --json) on /live whenever it
// changes. Without this script the page is complete, only static.
(function () {
  "use strict";
  var view = document.getElementById("view");
  var mark = document.getElementById("live");
  if (!view || !mark || !window.EventSource || document.getElementById("confirm")) {
    return;
  }
  var token = view.getAttribute("data-token");
  // A page an action or the unlock form answered: reloading it must not
  // post again. The token stays out of the address (and the history).
  if (location.pathname === "/action" || location.pathname === "/unlock") {
    history.replaceState(null, "", "/");
  }
  var pending = null;
  function busy() {
    // A list being chosen from, or a field being typed in, is not swapped
    // under the pointer.
    var a = document.activeElement;
    return a && (a.tagName === "SELECT" || a.tagName === "INPUT") && view.contains(a);
  }
  function show(html) {
    if (busy()) {
      pending = html;
      return;
    }
    pending = null;
    view.innerHTML = html;
  }
  view.addEventListener("focusout", function () {
    if (pending !== null) {
      setTimeout(function () { if (pending !== null) { show(pending); } }, 0);
    }
  });
  var url = "/live" + (token ? "?token=" + encodeURIComponent(token) : "");
  var wait = 1000;
  function connect() {
    var source = new EventSource(url);
    source.addEventListener("view", function (e) {
      wait = 1000;
      show(e.data);
      mark.textContent = "Live";
      mark.className = "on";
    });
    source.onerror = function () {
      mark.textContent = "Reconnecting\u2026";
      mark.className = "";
      // The browser retries a dropped stream itself, but not one refused
      // (a 503 when too many pages are open, serve restarting): this does,
      // waiting longer each time, up to half a minute.
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(connect, wait);
        wait = Math.min(wait * 2, 30000);
      }
    };
  }
  connect();
})();
