"""``index.html``: one self-contained page (inline CSS and script, pictures as data URIs, no network).

Every value from the run (ids, methods, class names, paths, the model) is escaped, in text and in
attributes alike, and reaches the script as JSON with ``<``, ``>`` and ``&`` escaped: a run
directory may come from someone else.

Top to bottom: a banner when the run is partial, the findings (``report_findings.py``: every flagged
finding, strongest first, with its evidence), the colormap legend, a sortable per-class table with flagged classes
first and 95% intervals under the metric means, then one section per class: its mean heatmap, the
eigenvalues with the chosen gap, the interactive 2-D view (``scatter.js``: hover for overlays,
switch clusterings, select and copy ids), and a card per cluster (flagged first) with its
prototype and a strip of sample overlays. ``page_points`` and the caps beside it keep the page's
size in hand on big runs.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from gradcam_batch.engine.audit import flags as flag_rules
from gradcam_batch.engine.audit import render, report_findings
from gradcam_batch.engine.audit.run_output import BOOL_METRICS, partial_line

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;background:#f6f6f8}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 6px}h3{font-size:15px;margin:0 0 4px}
.sub{color:#555;margin:0 0 14px}.muted{color:#666}
.box{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px 16px;margin:14px 0}
.findings{border-left:6px solid #D55E00}.findings.none{border-left-color:#009E73}
.partial{border-left:6px solid #E69F00;background:#fff8e6}
.finding{display:flex;gap:14px;align-items:center;padding:8px 0;border-top:1px solid #eee}
.finding:first-of-type{border-top:0}
.flag{color:#a33b00;font-weight:600}
.legend{display:flex;align-items:center;gap:8px;font-size:12px;color:#444}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:5px 8px;border-bottom:1px solid #e6e6e6;text-align:right;vertical-align:middle}
th{cursor:pointer;background:#fafafa;position:sticky;top:0;user-select:none}
th:first-child,td:first-child{text-align:left}
tr.flagged td{background:#fff3ec}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;background:#D55E00;color:#fff;font-size:12px}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0}figcaption{font-size:12px;color:#555;max-width:300px}
.cards{display:flex;flex-direction:column;gap:10px;margin-top:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 12px;background:#fff;display:flex;gap:14px}
.card.flagged{border:2px solid #D55E00;background:#fffaf6}
.swatch{display:inline-block;width:11px;height:11px;border-radius:50%;margin-right:5px;vertical-align:-1px}
.strip{display:flex;gap:4px;flex-wrap:wrap;margin-top:6px}.strip img{border-radius:3px}
img.px{image-rendering:pixelated}
.stats{font-size:12.5px;color:#333}
section.cls{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px 16px;margin:16px 0}
section.cls.flagged{border-color:#D55E00}
code{background:#eee;padding:0 3px;border-radius:3px}
.ci{font-size:11px;color:#666;white-space:nowrap}
"""

_JS = """
window.auditErrors=[];window.addEventListener('error',function(e){window.auditErrors.push(String(e.message));
document.body.setAttribute('data-errors',window.auditErrors.length);});
function sortTable(th){var t=th.closest('table'),i=Array.prototype.indexOf.call(th.parentNode.children,th);
var asc=th.getAttribute('data-dir')!=='asc';
th.parentNode.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-dir')});
th.setAttribute('data-dir',asc?'asc':'desc');var rows=Array.prototype.slice.call(t.tBodies[0].rows);
rows.sort(function(a,b){var x=a.cells[i].getAttribute('data-v'),y=b.cells[i].getAttribute('data-v');
var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
return asc?c:-c;});rows.forEach(function(r){t.tBodies[0].appendChild(r)});}
document.addEventListener('DOMContentLoaded',function(){document.querySelectorAll('th').forEach(function(th){
th.addEventListener('click',function(){sortTable(th)})});document.body.setAttribute('data-ready','1');});
"""

_SCATTER_JS = (Path(__file__).parent / "scatter.js").read_text(encoding="utf-8")

# Page weight on big runs: the scatter keeps at most POINTS_PER_PAGE points in all (each class at
# least MIN_POINTS_PER_CLASS, or all it has), and hover overlays for THUMBS_PER_CLASS of a class's
# points (THUMBS_PER_PAGE in all) besides the cluster cards' samples. The page says so where it cuts.
POINTS_PER_PAGE = 100_000
MIN_POINTS_PER_CLASS = 500
THUMBS_PER_PAGE = 2_000
THUMBS_PER_CLASS = 48
SAMPLES_PER_PAGE = 4_000  # the cluster cards' sample overlays, all cards together (at least 2 a card)
FINDING_SAMPLES = 6  # overlays and attended crops per finding card, and as many of its contrast cluster
HOVER_PX = 112
_BASE36 = np.array(list("0123456789abcdefghijklmnopqrstuvwxyz"))


def page_points(n: int, groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the points of a class of ``n`` that its scatter shows, those of them that get a hover overlay):
    sorted indices, a seeded uniform sample where the caps above cut."""
    rng = np.random.default_rng([seed, n])
    shown_cap = max(MIN_POINTS_PER_CLASS, POINTS_PER_PAGE // max(groups, 1))
    shown = np.arange(n) if n <= shown_cap else np.sort(rng.choice(n, shown_cap, replace=False))
    thumbs = min(THUMBS_PER_CLASS, THUMBS_PER_PAGE // max(groups, 1), len(shown))
    return shown, np.sort(rng.choice(shown, thumbs, replace=False)) if thumbs else np.zeros(0, np.int64)


def card_samples(result) -> int:
    """How many of its samples each cluster card shows: ``samples`` (8), fewer on pages of many clusters."""
    clusters = sum(len(c.clusters) for c in result.classes)
    per = max((len(k.sample_ids) for c in result.classes for k in c.clusters), default=0)
    return min(per, max(2, SAMPLES_PER_PAGE // max(clusters, 1)))


def overlay_ids(result) -> list:
    """The ids whose images the page shows: findings' and cards' samples, the worst-localized, the hover sample."""
    per = card_samples(result)
    ids = [i for c, k in result.flagged for i in k.sample_ids[:FINDING_SAMPLES]]
    ids += [i for c, _ in result.flagged for i in report_findings.contrast_ids(c, FINDING_SAMPLES)]
    ids += [i for c in result.classes for k in c.clusters for i in k.sample_ids[:per]]
    ids += [i for c in result.classes for i in c.worst_ids]
    ids += [c.ids[i] for c in result.classes for i in c.hover]
    return list(dict.fromkeys(ids))


_METRIC_LABELS = {
    "deletion_auc": "deletion AUC",
    "insertion_auc": "insertion AUC",
    "confidence_drop": "avg drop",
    "confidence_increase": "increase rate",
    "pointing_hit": "pointing",
    "box_energy": "box energy",
    "box_iou": "box IoU",
}


def _e(x) -> str:
    return html.escape(str(x))


def _img(uri: str, alt: str, cls: str = "", title: str = "", width: int | None = None, data_id=None) -> str:
    t = f' title="{_e(title)}"' if title else ""
    c = f' class="{_e(cls)}"' if cls else ""
    w = f" width={int(width)}" if width else ""
    d = f' data-id="{_e(data_id)}"' if data_id is not None else ""
    return f'<img src="{_e(uri)}" alt="{_e(alt)}"{c}{t}{w}{d}>'


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _anchor(c) -> str:
    """The class section's id: the method's characters outside [A-Za-z0-9-] as ``_hex_``, so any two
    methods give two different ids, with no space or quote in them."""
    method = "".join(ch if ch.isascii() and (ch.isalnum() or ch == "-") else f"_{ord(ch):x}_" for ch in c.method)
    return f"class-{int(c.class_index)}-{method}"


def _interval(c, m: str) -> str:
    """The metric mean's 95% interval under it, with how it was computed and from how many rows."""
    ci = c.metric_intervals.get(m)
    if ci is None:
        return ""
    how = "Wilson score interval of a share" if m in BOOL_METRICS else "normal interval of a mean (Student's t)"
    n = c.metric_rows.get(m, 0)
    lo, hi = (round(v, 3) + 0.0 for v in ci)  # + 0.0: no "-0.000"
    return f'<br><span class=ci title="95% {how}, from {n:,} rows">{lo:.3f}–{hi:.3f}</span>'


def write_report(path: Path, result, images: dict) -> None:
    s = result.summary
    classes = result.classes
    metric_names = list(s["run"]["metric_columns"])
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>Grad-CAM audit: {_e(Path(s['run']['out_dir']).name)}</title>",
        f"<style>{_CSS}{_SCATTER_CSS}{report_findings.CSS}</style><script>{_JS}</script><script>{_SCATTER_JS}</script></head><body><main>",
    ]
    run = s["run"]
    sel = s["selection"]
    what = {
        "label": (
            "the heatmap of each positive class of each image (a positive label, or a class of the true mask)"
            if run.get("truth") == "positive"
            else "the true label's heatmap of each image"
        ),
        "top1": "the top-1 prediction's heatmap of each image",
        "all": "every explained class of each image",
    }[sel["rows"]]
    parts.append("<h1>Grad-CAM audit</h1>")
    if run.get("partial"):
        parts.append(f'<div class="box partial" id=partial><b>{_e(partial_line(run["partial"]))}</b></div>')
    parts.append(
        f'<p class=sub>Run <code title="{_e(run["out_dir"])}">{_e(Path(run["out_dir"]).name)}</code> · '
        f"model <code>{_e(run.get('model') or '–')}</code> · "
        f"method {_e(run.get('method') or '')} · {s['totals']['audited_rows']:,} heatmaps audited ({_e(what)}) "
        f"in {s['totals']['classes']} classes · {run['error_rows']:,} error rows</p>"
    )

    # -- findings (report_findings.py) --
    parts.append(report_findings.findings_section(result, images, _anchor, FINDING_SAMPLES))
    parts.append(
        f"<div class=legend>{_img(render.png_uri(render.legend_image()), 'viridis colormap')}"
        "<span>low → high saliency (viridis; each heatmap min-max normalized; prototypes scaled to their "
        "maximum)</span></div>"
    )
    for note in s["notes"]:
        if not note.startswith("pattern evidence skipped"):  # said in the findings box
            parts.append(f"<p class=muted>Note: {_e(note)}.</p>")
    per = card_samples(result)
    most = max((len(k.sample_ids) for c in classes for k in c.clusters), default=0)
    if per < most:
        parts.append(
            f"<p class=muted>Note: this page has {sum(len(c.clusters) for c in classes):,} clusters, so each "
            f"card shows {per} of its {most} samples (the page keeps {SAMPLES_PER_PAGE:,} sample overlays); "
            "summary.json lists them all.</p>"
        )

    # -- class table --
    head = ["class", "rows", "errors", "clusters", "flagged", "mean heatmap", "mean prob."]
    head += [_METRIC_LABELS.get(m, m) for m in metric_names]
    parts.append(
        "<div class=box><h2>Classes</h2><p class=muted>Click a column to sort. Flagged classes come "
        "first. Under each metric mean, its 95% interval (a normal interval with Student's t for a mean, "
        "Wilson's for a share), from the rows that hold the metric.</p><table id=classes><thead><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    )
    for c in classes:
        mean = render.heat_uri(render.shrink(c.mean_heatmap, 16))  # shown 40 px wide
        n_flag = len(c.flagged)
        cells = [
            (
                c.title,
                f'<a href="#{_e(_anchor(c))}">{_e(c.title)}</a>'
                + (f" · {_e(c.method)}" if len({x.method for x in classes}) > 1 else ""),
            ),
            (c.rows, f"{c.rows:,}"),
            (c.error_share if c.error_share is not None else -1, _fmt(c.error_share, pct=True)),
            (c.k, str(c.k)),
            (n_flag, f"<span class=badge>{n_flag} flagged</span>" if n_flag else "0"),
            (0, _img(mean, "mean heatmap", "", width=40)),
            (c.probability if c.probability is not None else -1, _fmt(c.probability)),
        ]
        for m in metric_names:
            v = c.metrics.get(m)
            cells.append((v if v is not None else -1, _fmt(v) + _interval(c, m)))
        cls = " class=flagged" if n_flag else ""
        row = "".join(f'<td data-v="{_e(v)}">{h}</td>' for v, h in cells)
        parts.append(f'<tr{cls} data-flagged="{_e(n_flag)}">{row}</tr>')
    parts.append("</tbody></table></div>")

    # -- one section per class --
    for c in classes:
        parts.append(_class_section(c, images, s, per))

    parts.append("</main></body></html>")
    path.write_text("\n".join(parts))


def _class_section(c, images: dict, s: dict, per: int) -> str:
    flagged = {k.cluster for k in c.flagged}
    out = [f'<section class="cls{" flagged" if flagged else ""}" id="{_e(_anchor(c))}">']
    sub = f" (SpRAy on a uniform subsample of {c.sampled:,})" if c.sampled < c.rows else ""
    es = f", {c.error_share:.1%} of its images could not be explained" if c.error_share else ""
    extra = c.k - c.spray_k if c.spray_k else 0
    split = f": SpRAy's {c.spray_k}, and {extra} that evidence split off" if extra > 0 else ""
    out.append(f"<h2>{_e(c.title)} <span class=muted>· {_e(c.method)}</span></h2>")
    out.append(
        f"<p class=stats>{c.rows:,} heatmaps{sub}{es}. {c.k} cluster{'s' if c.k != 1 else ''}"
        f" ({'fixed' if s['spray']['clusters'] else 'eigengap'}{split}).</p>"
    )
    out.append("<div class=row>")
    out.append(
        f"<figure>{_img(render.heat_uri(c.mean_heatmap), 'mean heatmap', '', width=150)}"
        "<figcaption>mean heatmap of all rows</figcaption></figure>"
    )
    if len(c.eigenvalues):
        ev = render.png_uri(render.eigen_image(c.eigenvalues, c.eigengap_k, 260, 120))
        gap = (
            f"the gap (red line) after the {c.eigengap_k} smallest gives {c.eigengap_k} clusters"
            if c.eigengap_k > 1
            else "no eigenvalue is 3x its predecessor: one cluster"
        )
        out.append(
            f"<figure>{_img(ev, 'eigenvalues')}<figcaption>the smallest eigenvalues of the kNN graph's "
            f"Laplacian; {gap}</figcaption></figure>"
        )
    out.append("</div>")
    if c.embedding is not None and len(c.embedding):
        out.append(_scatter(c, images, flagged))
    out.append("<div class=cards>")
    for k in c.clusters:
        proto = render.heat_uri(k.prototype)
        mets = [f"{_METRIC_LABELS.get(m, m)} {_fmt(v)}" for m, v in k.metrics.items() if v is not None]
        where = flag_rules.where(k.regions)
        strip = []
        maps = k.sample_maps if k.sample_maps is not None else []
        for rid, m in list(zip(k.sample_ids, maps, strict=False))[:per]:
            uri = render.map_uri(images.get(rid), m, 72)
            strip.append(_img(uri, "sample", "", str(rid), width=72, data_id=str(rid)))
        out.append(
            f'<div class="card{" flagged" if k.flagged else ""}" data-cluster="{_e(k.cluster)}">'
            f"<div>{_img(proto, 'prototype', '', width=110)}</div><div>"
            f'<h3><span class=swatch style="background:{_e(render.cluster_colour(k.cluster))}"></span>'
            f"cluster {k.cluster} · {k.size:,} heatmaps ({k.share:.0%})</h3>"
            + "".join(f"<div class=flag>⚑ {_e(r)}</div>" for r in k.flags)
            + f"<div class=stats>spread {k.spread:.3f} · most mass in the {_e(where[0])} ({where[1]:.0%})"
            + (" · " + " · ".join(_e(x) for x in mets) if mets else "")
            + "</div>"
            + f"<div class=strip>{''.join(strip)}</div></div></div>"
        )
    out.append("</div>")
    if c.worst_ids and c.worst_maps is not None:
        label = "box energy" if s["run"]["metric_columns"] and "box_energy" in s["run"]["metric_columns"] else "box IoU"
        imgs = "".join(
            f"<figure>{_img(render.png_uri(render.overlay_image(images.get(i), m / 255.0, 72)), 'worst', 'px', str(i))}"
            f"<figcaption>{_e(label)} {v:.2f}</figcaption></figure>"
            for i, m, v in zip(c.worst_ids, c.worst_maps, c.worst_values, strict=True)
        )
        out.append(f"<h3 style='margin-top:12px'>Worst-localized images</h3><div class=strip>{imgs}</div>")
    out.append("</section>")
    return "\n".join(out)


_SCATTER_CSS = """
.scatter{margin-top:12px;border-top:1px solid #eee;padding-top:10px}
.scatter .ks{font-size:12.5px;margin-bottom:6px}.scatter .ks button,.scatter .chip{font:inherit;font-size:12px;
border:1px solid #ccc;background:#fafafa;border-radius:10px;padding:1px 8px;margin:0 3px 3px 0;cursor:pointer}
.scatter .ks button.on{background:#1d1d1f;color:#fff;border-color:#1d1d1f}
.scatter-row{display:flex;gap:14px;align-items:flex-start}.scatter canvas{cursor:crosshair;background:#fff}
.hover{width:170px;font-size:12px;word-break:break-all}.hover img{width:150px;height:auto;border-radius:4px}
.selection{font-size:12.5px;margin-top:6px}.selection textarea{display:block;width:100%;max-width:520px;
height:4.5em;font:12px ui-monospace,monospace;margin-top:4px}
"""


def _json_script(data) -> str:
    """JSON inside a <script> element: no ``<``, ``>`` or ``&`` survives to close it."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scatter(c, images: dict, flagged: set[int]) -> str:
    """The interactive 2-D view (``scatter.js``): points, the clusterings to switch between, overlays on hover."""
    n = len(c.embedding)
    shown = c.points if c.points is not None else np.arange(n)
    xy = np.asarray(c.embedding, np.float64)[shown]
    lo, hi = xy.min(0), xy.max(0)
    q = np.round((xy - lo) / np.where(hi - lo > 0, hi - lo, 1.0) * 1000).astype(int)
    ks = {k: v for k, v in sorted(c.clusterings.items()) if k <= len(_BASE36)}
    ks[c.k] = c.labels  # the chosen clustering as the audit finished it
    labels = {str(k): "".join(_BASE36[np.minimum(v[shown], len(_BASE36) - 1)]) for k, v in sorted(ks.items())}
    where = {int(i): j for j, i in enumerate(shown.tolist())}
    thumbs = {}
    for i, m in c.hover.items():
        if i in where:
            thumbs[str(where[i])] = render.map_uri(images.get(c.ids[i]), m.astype(np.float32), HOVER_PX)
    ids = [i if isinstance(i, (int, str)) else str(i) for i in (c.ids[j] for j in shown.tolist())]
    cut = len(shown) < n
    thumb_note = f"the page keeps overlays for {len(thumbs):,} of these {len(shown):,} points and the cluster samples"
    data = {
        "x": q[:, 0].tolist(),
        "y": q[:, 1].tolist(),
        "ids": ids,
        "k": int(c.k),
        "labels": labels,
        "flagged": sorted(int(f) for f in flagged),
        "thumbs": thumbs,
        "thumb_note": thumb_note,
        "colours": list(render.CLUSTER_COLOURS),
    }
    buttons = "".join(
        f'<button type=button data-k="{k}">k = {k}{" (chosen)" if k == c.k else ""}</button>' for k in sorted(ks)
    )
    what = {"tsne": "t-SNE", "umap": "UMAP", "spectral": "spectral"}.get(c.view, c.view)
    caption = (
        f"{_e(what)} view of the spectral embedding, one dot per heatmap, coloured by cluster (flagged: ringed). "
        "Hover or click a dot for its overlay; drag a rectangle (shift: add) or click a cluster below to select; "
        "the selection's ids can be copied."
    )
    if cut:
        caption += (
            f" The view shows a uniform sample of {len(shown):,} of the {n:,} heatmaps SpRAy saw (the page keeps "
            f"{POINTS_PER_PAGE:,} points in all); clusters.parquet has every one."
        )
    return (
        f'<div class=scatter data-points="{len(shown)}">'
        f'<script type="application/json" class=scatter-data>{_json_script(data)}</script>'
        f"<div class=ks>clusterings: {buttons}</div>"
        "<div class=scatter-row><canvas width=300 height=300></canvas>"
        "<div class=hover hidden><img alt=overlay><div class=hover-text></div></div></div>"
        "<div class=legend-k></div>"
        "<div class=selection><span class=sel-count></span> <button type=button class=sel-copy>Copy ids</button> "
        "<button type=button class=sel-clear>Clear</button> <span class=sel-status></span>"
        "<textarea readonly aria-label='selected ids, one a line'></textarea></div>"
        f"<p class=stats>{caption} Other clusterings than the chosen one recolour the view only: the cards "
        "below are those of the chosen k.</p></div>"
    )


__all__ = [
    "MIN_POINTS_PER_CLASS",
    "POINTS_PER_PAGE",
    "THUMBS_PER_CLASS",
    "THUMBS_PER_PAGE",
    "page_points",
    "write_report",
]
