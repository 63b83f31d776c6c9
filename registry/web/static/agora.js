// Agora's one script: live progress of a job on the page that shows it. Every page works
// without it; a page opts in with an element carrying data-job-status="URL" (a JSON
// endpoint of the pages). Loaded from this origin only (Content-Security-Policy).
//
// The composition page (docs/web.md, "Compositions"): polls its progress endpoint every
// second, backing off to every 5 seconds, and updates the composition's state, the job's
// status and progress bar, and the result once the composition is ready. It stops when
// the composition is ready or failed, or when the endpoint refuses (gone, withdrawn).
"use strict";

(function () {
  var FIRST_DELAY_MS = 1000;
  var MAX_DELAY_MS = 5000;
  var BACKOFF = 1.5;
  var DONE = { ready: true, failed: true };

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(id, text) {
    var el = byId(id);
    if (el && text !== null && text !== undefined) {
      el.textContent = String(text);
    }
  }

  function setState(id, state) {
    var el = byId(id);
    if (!el) {
      return;
    }
    el.textContent = state;
    el.className = "state " + state;
  }

  function showProgress(job) {
    var bar = byId("job-progress");
    if (!bar) {
      return;
    }
    if (typeof job.total === "number" && job.total > 0 && typeof job.done === "number") {
      bar.max = job.total;
      bar.value = job.done;
      bar.textContent = job.done + " of " + job.total;
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
  }

  function showResult(body) {
    var panel = byId("result");
    if (!body.display || !panel) {
      return;
    }
    setText("result-bpb", body.display.bits_per_byte);
    setText("result-base-bpb", body.display.base_bits_per_byte);
    setText("result-change", body.display.relative_change);
    panel.hidden = false;
  }

  function apply(root, body) {
    root.setAttribute("data-status", body.status);
    setState("composition-state", body.status);
    if (body.job) {
      setState("job-status", body.job.status);
      setText("job-message", body.job.message);
      showProgress(body.job);
    }
    showResult(body);
  }

  function stopWith(root, message) {
    root.removeAttribute("data-job-status");
    setText("job-message", message);
  }

  function watch(root) {
    var url = root.getAttribute("data-job-status");
    var delay = FIRST_DELAY_MS;

    function next() {
      window.setTimeout(poll, delay);
      delay = Math.min(MAX_DELAY_MS, delay * BACKOFF);
    }

    function poll() {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (response.status === 404 || response.status === 451) {
            stopWith(root, "This composition is no longer available: reload the page.");
            return null;
          }
          if (!response.ok) {
            next(); // a busy or restarting server: try again later
            return null;
          }
          return response.json();
        })
        .then(function (body) {
          if (!body) {
            return;
          }
          apply(root, body);
          if (DONE[body.status]) {
            root.removeAttribute("data-job-status");
          } else {
            next();
          }
        })
        .catch(function () {
          next(); // offline for a moment
        });
    }

    next();
  }

  function start() {
    var roots = document.querySelectorAll("[data-job-status]");
    for (var i = 0; i < roots.length; i++) {
      watch(roots[i]);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
