// meshctl ui: keeps a trace page current. Every second it asks
// /api/trace/<id> for the trace's digest (its steps and decisions); when
// that changed, it fetches the server-rendered tree (escaped on the server)
// and swaps it in, keeping open steps open. No reload, no framework.
(function () {
  "use strict";
  var section = document.getElementById("tree");
  var live = document.getElementById("live");
  if (!section || !live) {
    return;
  }
  var trace = section.getAttribute("data-trace");
  var digest = section.getAttribute("data-digest");
  var PERIOD_MS = 1000;

  function openSteps() {
    var open = [];
    section.querySelectorAll("li.step > details[open]").forEach(function (d) {
      open.push(d.parentElement.id);
    });
    return open;
  }

  function reopen(ids) {
    ids.forEach(function (id) {
      var li = document.getElementById(id);
      var details = li && li.querySelector(":scope > details");
      if (details) {
        details.open = true;
      }
    });
  }

  function poll() {
    fetch("/api/trace/" + trace, { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) {
          throw new Error("HTTP " + r.status);
        }
        return r.json();
      })
      .then(function (state) {
        if (state.digest === digest) {
          return null;
        }
        return fetch("/trace/" + trace + "/tree", { cache: "no-store" }).then(function (r) {
          if (!r.ok) {
            throw new Error("HTTP " + r.status);
          }
          return r.text().then(function (html) {
            var open = openSteps();
            section.innerHTML = html;
            reopen(open);
            digest = state.digest;
            section.setAttribute("data-digest", digest);
          });
        });
      })
      .then(function () {
        live.textContent = "live: checked " + new Date().toLocaleTimeString();
        live.className = "live";
      })
      .catch(function (e) {
        live.textContent = "live: " + e.message + "; retrying";
        live.className = "live failing";
      })
      .then(function () {
        setTimeout(poll, PERIOD_MS);
      });
  }

  setTimeout(poll, PERIOD_MS);
})();
