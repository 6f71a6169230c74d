/* moescope token viewer.
 * Reads the JSON next to each [data-moescope-viewer] section (layout: moescope/report/viewer.py)
 * and draws it with textContent only: token text never reaches an HTML parser. */
(function () {
  "use strict";

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A token's text as the tooltip shows it: quoted, with whitespace made visible.
  function shown(text) {
    if (text === null) return "(text not recorded)";
    return "\u201c" + text.replace(/\n/g, "\\n").replace(/\t/g, "\\t").replace(/\r/g, "\\r") + "\u201d";
  }

  var PHASES = { p: "prompt", g: "generated" };

  function initViewer(root) {
    var data = JSON.parse(root.querySelector("script.viewer-data").textContent);
    var k = data.k;
    var seqSelect = root.querySelector(".seq-select");
    var layerSelect = root.querySelector(".layer-select");
    var box = root.querySelector(".tokens");
    var meta = root.querySelector(".seq-meta");
    var chipBox = root.querySelector(".chips");
    var tip = root.querySelector(".tooltip");
    var state = { seq: 0, layer: 0, current: null, pinned: null, expert: -1 };
    var spans = [];
    var chips = [];

    data.seqs.forEach(function (s, i) {
      var preview = s.text.map(function (t) { return t === null ? "\u00b7" : t; }).join("");
      preview = preview.replace(/\s+/g, " ").trim();
      if (preview.length > 48) preview = preview.slice(0, 47) + "\u2026";
      var label = "#" + s.id + (s.meta ? " \u00b7 " + s.meta : "") + (preview ? " \u00b7 " + preview : "");
      seqSelect.add(new Option(label, String(i)));
    });

    data.colors.forEach(function (colour, e) {
      var chip = el("button", "chip", String(e));
      chip.type = "button";
      chip.style.backgroundColor = colour;
      chip.style.color = data.ink[e];
      chip.setAttribute("aria-pressed", "false");
      chip.dataset.expert = String(e);
      chipBox.appendChild(chip);
      chips.push(chip);
    });

    function fillText(span, text, tid) {
      if (text === null) { span.dataset.placeholder = "#" + tid; return; }
      if (text === "") { span.dataset.placeholder = "\u2205"; return; }
      // Newlines stay real "\n" characters (a line break under pre-wrap); the arrow is CSS, not text.
      text.split("\n").forEach(function (part, j) {
        if (j > 0) span.appendChild(el("span", "nl", "\n"));
        if (part) span.appendChild(document.createTextNode(part));
      });
    }

    function drawSequence() {
      var s = data.seqs[state.seq];
      hideTip(true);
      box.replaceChildren();
      spans = [];
      meta.textContent = "seq_id " + s.id + (s.meta ? " \u00b7 " + s.meta : "") + " \u00b7 " + s.n + " tokens";
      var previous = null;
      for (var i = 0; i < s.n; i++) {
        var phase = s.phase.charAt(i);
        if (phase === "g" && previous !== "g") box.appendChild(el("span", "gen-start"));
        previous = phase;
        var span = el("span", phase === "g" ? "tok gen" : "tok");
        span.tabIndex = 0;
        span.dataset.i = String(i);
        fillText(span, s.text[i], s.tid[i]);
        box.appendChild(span);
        spans.push(span);
      }
      colour();
    }

    function colour() {
      var s = data.seqs[state.seq];
      var ids = s.e[state.layer];
      var used = new Array(data.colors.length).fill(0);
      spans.forEach(function (span, i) {
        var top1 = ids[i * k];
        span.dataset.top1 = String(top1);
        span.style.backgroundColor = top1 >= 0 ? data.colors[top1] : data.none;
        span.style.color = top1 >= 0 ? data.ink[top1] : "#1f2328";
        if (top1 >= 0) used[top1] += 1;
      });
      chips.forEach(function (chip, e) {
        chip.classList.toggle("unused", used[e] === 0);
        chip.title = "expert " + e + ": top-1 for " + used[e] + " token" + (used[e] === 1 ? "" : "s") +
          " here; click to outline every token routed to it at this layer";
      });
      highlight();
      if (state.current) showTip(state.current);
    }

    // Outline the tokens whose top-k at this layer includes the chosen expert; fade the rest.
    function highlight() {
      var ids = data.seqs[state.seq].e[state.layer];
      spans.forEach(function (span, i) {
        var hit = false;
        if (state.expert >= 0) for (var r = 0; r < k; r++) if (ids[i * k + r] === state.expert) hit = true;
        span.classList.toggle("hit", state.expert >= 0 && hit);
        span.classList.toggle("dim", state.expert >= 0 && !hit);
      });
      chips.forEach(function (chip, e) { chip.setAttribute("aria-pressed", String(e === state.expert)); });
    }

    function showTip(span) {
      var s = data.seqs[state.seq];
      var i = Number(span.dataset.i);
      var phase = PHASES[s.phase.charAt(i)] || "phase unknown";
      tip.replaceChildren();
      tip.appendChild(el("div", "tip-tok", shown(s.text[i])));
      tip.appendChild(el("div", "tip-meta",
        "pos " + i + " \u00b7 token id " + (s.tid[i] >= 0 ? s.tid[i] : "?") + " \u00b7 " + phase));
      tip.appendChild(el("div", "tip-layer", "layer " + data.layers[state.layer] + " \u00b7 top-" + k + " experts"));
      var table = el("table", "tip-table");
      var ids = s.e[state.layer];
      var weights = s.w ? s.w[state.layer] : null;
      var rows = 0;
      for (var r = 0; r < k; r++) {
        var e = ids[i * k + r];
        if (e < 0) continue;
        rows += 1;
        var tr = el("tr");
        var name = el("td");
        var sw = el("span", "swatch");
        sw.style.backgroundColor = data.colors[e];
        name.appendChild(sw);
        name.appendChild(document.createTextNode("expert " + e));
        tr.appendChild(name);
        var w = weights ? weights[i * k + r] : -1;
        tr.appendChild(el("td", "w", w >= 0 ? (w / 1000).toFixed(3) : "\u2013"));
        var barCell = el("td", "barcell");
        if (w >= 0) {
          var bar = el("span", "bar");
          bar.style.width = Math.max(2, Math.min(100, w / 10)) + "%";
          barCell.appendChild(bar);
        }
        tr.appendChild(barCell);
        table.appendChild(tr);
      }
      if (rows) tip.appendChild(table);
      else tip.appendChild(el("div", "tip-note", "no route recorded at this layer"));
      if (!weights) tip.appendChild(el("div", "tip-note", "weights not recorded"));
      tip.hidden = false;
      state.current = span;
      span.setAttribute("aria-describedby", tip.id);
      place(span);
    }

    // Below the token, or above it when there is no room; always inside the viewport.
    function place(span) {
      var r = span.getBoundingClientRect();
      var t = tip.getBoundingClientRect();
      var gap = 6, margin = 8;
      var top = r.bottom + gap;
      if (top + t.height > window.innerHeight - margin) top = Math.max(margin, r.top - gap - t.height);
      var left = Math.min(Math.max(margin, r.left), window.innerWidth - t.width - margin);
      tip.style.left = Math.max(margin, left) + "px";
      tip.style.top = top + "px";
    }

    function hideTip(force) {
      if (state.pinned && !force) return;
      if (state.pinned) state.pinned.classList.remove("pinned");
      if (state.current) state.current.removeAttribute("aria-describedby");
      state.pinned = null;
      state.current = null;
      tip.hidden = true;
    }

    function tokenOf(target) {
      return target && target.closest ? target.closest(".tok") : null;
    }

    tip.id = "tip-" + Math.random().toString(36).slice(2);
    box.addEventListener("mouseover", function (ev) {
      var span = tokenOf(ev.target);
      if (span && !state.pinned) showTip(span);
    });
    box.addEventListener("mouseout", function (ev) {
      if (!tokenOf(ev.relatedTarget)) hideTip(false);
    });
    box.addEventListener("focusin", function (ev) {
      var span = tokenOf(ev.target);
      if (span && (!state.pinned || state.pinned === span)) showTip(span);
    });
    box.addEventListener("focusout", function (ev) {
      if (!tokenOf(ev.relatedTarget)) hideTip(false);
    });
    // A click (or tap) pins the tooltip; a second click on the same token, Escape or a click elsewhere unpins it.
    box.addEventListener("click", function (ev) {
      var span = tokenOf(ev.target);
      if (!span) return;
      var same = state.pinned === span;
      hideTip(true);
      if (!same) {
        state.pinned = span;
        span.classList.add("pinned");
        showTip(span);
      }
    });
    document.addEventListener("click", function (ev) {
      if (state.pinned && !root.contains(ev.target)) hideTip(true);
    });
    root.addEventListener("keydown", function (ev) {
      if (ev.key === "Escape") hideTip(true);
    });
    window.addEventListener("scroll", function () { if (state.current) place(state.current); }, { passive: true });
    box.addEventListener("scroll", function () { if (state.current) place(state.current); }, { passive: true });
    window.addEventListener("resize", function () { if (state.current) place(state.current); });

    chipBox.addEventListener("click", function (ev) {
      var chip = ev.target.closest ? ev.target.closest(".chip") : null;
      if (!chip) return;
      var e = Number(chip.dataset.expert);
      state.expert = state.expert === e ? -1 : e;
      highlight();
    });
    seqSelect.addEventListener("change", function () {
      state.seq = Number(seqSelect.value);
      drawSequence();
    });
    layerSelect.addEventListener("change", function () {
      state.layer = Math.max(0, data.layers.indexOf(Number(layerSelect.value)));
      colour();
    });

    // A reload may keep the layer the reader chose (form state restore): start from it.
    state.layer = Math.max(0, data.layers.indexOf(Number(layerSelect.value)));
    drawSequence();
  }

  document.querySelectorAll("[data-moescope-viewer]").forEach(initViewer);
})();
