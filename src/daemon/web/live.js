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
  // A page an action answered: reloading it must not post again.
  if (location.pathname === "/action") {
    history.replaceState(null, "", token ? "/?token=" + encodeURIComponent(token) : "/");
  }
  var pending = null;
  function busy() {
    // A list being chosen from is not swapped under the pointer.
    var a = document.activeElement;
    return a && a.tagName === "SELECT" && view.contains(a);
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
  var source = new EventSource("/live" + (token ? "?token=" + encodeURIComponent(token) : ""));
  source.addEventListener("view", function (e) {
    show(e.data);
    mark.textContent = "Live";
    mark.className = "on";
  });
  source.onerror = function () {
    mark.textContent = "Reconnecting\u2026";
    mark.className = "";
  };
})();
