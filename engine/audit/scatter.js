// The report's interactive 2-D views (report.py inlines this file; no library, no network).
// Each <div class="scatter"> holds a canvas and, in a <script type="application/json">, its points:
// x and y scaled to 0..1000, ids, one string of cluster labels per precomputed k (a character per
// point, base 36), the flagged clusters of the chosen k, and overlays for a sample of the points.
// Hover or click a point: its overlay and id. Buttons switch the clustering. Drag a rectangle
// (shift: add to it) or click a cluster in the legend: a selection, copied out as a list of ids.
// Every value from the run reaches the page through textContent, never as markup.
(function () {
  'use strict';
  var PAD = 10, R = 2.6, HIT = 9;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function Scatter(root) {
    var d = JSON.parse(root.querySelector('script.scatter-data').textContent);
    var canvas = root.querySelector('canvas');
    var ctx = canvas.getContext('2d');
    var colours = d.colours, n = d.ids.length, self = this;
    var k = d.k, labels = null, selected = new Uint8Array(n), pinned = -1, hovered = -1, drag = null;
    var card = root.querySelector('.hover'), cardImg = card.querySelector('img');
    var cardText = card.querySelector('.hover-text');
    var legend = root.querySelector('.legend-k'), ksBar = root.querySelector('.ks');
    var out = root.querySelector('textarea'), count = root.querySelector('.sel-count');
    var status = root.querySelector('.sel-status');
    var css = canvas.width, dpr = window.devicePixelRatio || 1;
    canvas.width = canvas.height = Math.round(css * dpr);
    canvas.style.width = canvas.style.height = css + 'px';
    ctx.scale(dpr, dpr);
    var px = new Float32Array(n), py = new Float32Array(n);
    for (var i = 0; i < n; i++) {
      px[i] = PAD + d.x[i] / 1000 * (css - 2 * PAD);
      py[i] = PAD + (1 - d.y[i] / 1000) * (css - 2 * PAD);
    }
    var strip = {};  // the cluster cards' sample overlays, by id: reused, not stored twice
    var section = root.closest('section') || document;
    section.querySelectorAll('.card img[data-id]').forEach(function (im) { strip[im.getAttribute('data-id')] = im; });

    function labelOf(i) { return parseInt(labels.charAt(i), 36); }

    function draw() {
      ctx.clearRect(0, 0, css, css);
      ctx.strokeStyle = '#cccccc'; ctx.lineWidth = 1; ctx.strokeRect(0.5, 0.5, css - 1, css - 1);
      var flagged = k === d.k ? d.flagged : [];
      var order = [], any = false, i;
      for (i = 0; i < n; i++) { if (selected[i]) any = true; }
      for (i = 0; i < n; i++) if (flagged.indexOf(labelOf(i)) < 0) order.push(i);
      for (i = 0; i < n; i++) if (flagged.indexOf(labelOf(i)) >= 0) order.push(i);
      order.forEach(function (j) {
        var c = labelOf(j);
        ctx.globalAlpha = any && !selected[j] ? 0.25 : 1;
        ctx.beginPath(); ctx.arc(px[j], py[j], selected[j] ? R + 1 : R, 0, 2 * Math.PI);
        ctx.fillStyle = colours[c % colours.length]; ctx.fill();
        if (flagged.indexOf(c) >= 0 || selected[j]) {
          ctx.lineWidth = selected[j] ? 1.5 : 1; ctx.strokeStyle = '#222222'; ctx.stroke();
        }
      });
      ctx.globalAlpha = 1;
      if (hovered >= 0 && hovered !== pinned) {
        ctx.beginPath(); ctx.arc(px[hovered], py[hovered], R + 4, 0, 2 * Math.PI);
        ctx.lineWidth = 1.5; ctx.strokeStyle = '#555555'; ctx.stroke();
      }
      if (pinned >= 0) {
        ctx.beginPath(); ctx.arc(px[pinned], py[pinned], R + 4, 0, 2 * Math.PI);
        ctx.lineWidth = 2; ctx.strokeStyle = '#D55E00'; ctx.stroke();
      }
      if (drag) {
        ctx.setLineDash([4, 3]); ctx.strokeStyle = '#333333'; ctx.lineWidth = 1;
        ctx.strokeRect(drag.x0, drag.y0, drag.x1 - drag.x0, drag.y1 - drag.y0); ctx.setLineDash([]);
      }
    }

    function setK(newK) {
      k = newK; labels = d.labels[String(k)];
      ksBar.querySelectorAll('button').forEach(function (b) {
        b.classList.toggle('on', b.getAttribute('data-k') === String(k));
      });
      var sizes = {}, i;
      for (i = 0; i < n; i++) { var c = labelOf(i); sizes[c] = (sizes[c] || 0) + 1; }
      legend.textContent = '';
      Object.keys(sizes).map(Number).sort(function (a, b) { return a - b; }).forEach(function (c) {
        var chip = el('button', 'chip');
        chip.type = 'button'; chip.setAttribute('data-cluster', c);
        var sw = el('span', 'swatch'); sw.style.background = colours[c % colours.length];
        chip.appendChild(sw);
        chip.appendChild(document.createTextNode('cluster ' + c + ' · ' + sizes[c] +
          (k === d.k && d.flagged.indexOf(c) >= 0 ? ' ⚑' : '')));
        chip.title = 'select the points of cluster ' + c + ' (shift: add them)';
        chip.addEventListener('click', function (ev) { selectWhere(function (j) { return labelOf(j) === c; }, ev.shiftKey); });
        legend.appendChild(chip);
      });
      root.setAttribute('data-k', k);
      show(pinned);
      draw();
    }

    function nearest(x, y) {
      var best = -1, bd = HIT * HIT;
      for (var i = 0; i < n; i++) {
        var dx = px[i] - x, dy = py[i] - y, dd = dx * dx + dy * dy;
        if (dd <= bd) { bd = dd; best = i; }
      }
      return best;
    }

    function show(i) {
      if (i < 0) { card.hidden = true; root.removeAttribute('data-shown'); return; }
      var id = String(d.ids[i]), uri = d.thumbs[String(i)];
      if (!uri && strip[id]) uri = strip[id].getAttribute('src');
      card.hidden = false;
      if (uri) { cardImg.src = uri; cardImg.hidden = false; } else { cardImg.removeAttribute('src'); cardImg.hidden = true; }
      cardText.textContent = '';
      cardText.appendChild(el('b', '', id));
      cardText.appendChild(el('div', '', 'cluster ' + labelOf(i) + ' (k = ' + k + ')'));
      if (!uri) cardText.appendChild(el('div', 'muted', 'no overlay kept for this point (' + d.thumb_note + ')'));
      root.setAttribute('data-shown', id);
    }

    function selectWhere(test, add) {
      for (var i = 0; i < n; i++) selected[i] = (add && selected[i]) || test(i) ? 1 : 0;
      listSelection();
      draw();
    }

    function listSelection() {
      var ids = [];
      for (var i = 0; i < n; i++) if (selected[i]) ids.push(String(d.ids[i]));
      out.value = ids.join('\n');
      count.textContent = ids.length + ' selected';
      status.textContent = '';
      root.setAttribute('data-selected', ids.length);
    }

    function pos(ev) {
      var r = canvas.getBoundingClientRect();
      return { x: (ev.clientX - r.left) * css / r.width, y: (ev.clientY - r.top) * css / r.height };
    }

    canvas.addEventListener('mousemove', function (ev) {
      var p = pos(ev);
      if (drag) { drag.x1 = p.x; drag.y1 = p.y; draw(); return; }
      var i = nearest(p.x, p.y);
      show(i >= 0 ? i : pinned);
      canvas.style.cursor = i >= 0 ? 'pointer' : 'crosshair';
      if (i !== hovered) { hovered = i; draw(); }
    });
    canvas.addEventListener('mouseleave', function () { hovered = -1; if (!drag) { show(pinned); draw(); } });
    canvas.addEventListener('mousedown', function (ev) {
      var p = pos(ev);
      drag = { x0: p.x, y0: p.y, x1: p.x, y1: p.y, add: ev.shiftKey };
    });
    window.addEventListener('mouseup', function () {
      if (!drag) return;
      var g = drag; drag = null;
      if (Math.abs(g.x1 - g.x0) < 3 && Math.abs(g.y1 - g.y0) < 3) {  // a click: pin (or unpin) a point
        var i = nearest(g.x0, g.y0);
        pinned = i === pinned ? -1 : i;
        show(pinned); draw(); return;
      }
      var x0 = Math.min(g.x0, g.x1), x1 = Math.max(g.x0, g.x1), y0 = Math.min(g.y0, g.y1), y1 = Math.max(g.y0, g.y1);
      selectWhere(function (j) { return px[j] >= x0 && px[j] <= x1 && py[j] >= y0 && py[j] <= y1; }, g.add);
    });
    ksBar.querySelectorAll('button').forEach(function (b) {
      b.addEventListener('click', function () { setK(parseInt(b.getAttribute('data-k'), 10)); });
    });
    root.querySelector('.sel-clear').addEventListener('click', function () { selectWhere(function () { return false; }, false); });
    root.querySelector('.sel-copy').addEventListener('click', function () {
      var text = out.value;
      function fallback() {
        out.focus(); out.select();
        var ok = false;
        try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
        status.textContent = ok ? 'copied' : 'press Ctrl+C to copy the selected ids';
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () { status.textContent = 'copied'; }, fallback);
      } else {
        fallback();
      }
    });
    self.setK = setK;
    setK(d.k);
    listSelection();
  }

  document.addEventListener('DOMContentLoaded', function () {
    document.querySelectorAll('div.scatter').forEach(function (root) { root.scatter = new Scatter(root); });
  });
})();
