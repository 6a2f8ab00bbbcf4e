"""``index.html``: one self-contained page (inline CSS, a few lines of JS, PNGs as data URIs).

Every value from the run (ids, methods, class names, paths, the model) is escaped, in text and in
attributes alike: a run directory may come from someone else.

Top to bottom: a banner when the run is partial, the findings (``report_findings.py``: every flagged
finding, strongest first, with its evidence), the colormap legend, a sortable per-class table with flagged classes
first, then one section per class: its mean heatmap, the 2-D view coloured by cluster, the
eigenvalues with the chosen gap, and a card per cluster (flagged first) with its prototype and a
strip of sample overlays.
"""

from __future__ import annotations

import html
from pathlib import Path

from gradcam_batch.engine.audit import flags as flag_rules
from gradcam_batch.engine.audit import render, report_findings
from gradcam_batch.engine.audit.run_output import partial_line

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


def _img(uri: str, alt: str, cls: str = "", title: str = "") -> str:
    t = f' title="{_e(title)}"' if title else ""
    c = f' class="{_e(cls)}"' if cls else ""
    return f'<img src="{_e(uri)}" alt="{_e(alt)}"{c}{t}>'


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _anchor(c) -> str:
    """The class section's id: the method's characters outside [A-Za-z0-9-] as ``_hex_``, so any two
    methods give two different ids, with no space or quote in them."""
    method = "".join(ch if ch.isascii() and (ch.isalnum() or ch == "-") else f"_{ord(ch):x}_" for ch in c.method)
    return f"class-{int(c.class_index)}-{method}"


def write_report(path: Path, result, images: dict) -> None:
    s = result.summary
    classes = result.classes
    metric_names = list(s["run"]["metric_columns"])
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>Grad-CAM audit: {_e(Path(s['run']['out_dir']).name)}</title>",
        f"<style>{_CSS}{report_findings.CSS}</style><script>{_JS}</script></head><body><main>",
    ]
    run = s["run"]
    sel = s["selection"]
    what = {
        "label": "the true label's heatmap of each image",
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
    parts.append(report_findings.findings_section(result, images, _anchor))
    parts.append(
        f"<div class=legend>{_img(render.png_uri(render.legend_image()), 'viridis colormap')}"
        "<span>low → high saliency (viridis; each heatmap min-max normalized; prototypes scaled to their "
        "maximum)</span></div>"
    )
    for note in s["notes"]:
        if not note.startswith("pattern evidence skipped"):  # said in the findings box
            parts.append(f"<p class=muted>Note: {_e(note)}.</p>")

    # -- class table --
    head = ["class", "rows", "errors", "clusters", "flagged", "mean heatmap", "mean prob."]
    head += [_METRIC_LABELS.get(m, m) for m in metric_names]
    parts.append(
        "<div class=box><h2>Classes</h2><p class=muted>Click a column to sort. Flagged classes come "
        "first.</p><table id=classes><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
    )
    for c in classes:
        mean = render.png_uri(render.heat_image(c.mean_heatmap, 40))
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
            (0, _img(mean, "mean heatmap", "px")),
            (c.probability if c.probability is not None else -1, _fmt(c.probability)),
        ]
        for m in metric_names:
            v = c.metrics.get(m)
            cells.append((v if v is not None else -1, _fmt(v)))
        cls = " class=flagged" if n_flag else ""
        row = "".join(f'<td data-v="{_e(v)}">{h}</td>' for v, h in cells)
        parts.append(f'<tr{cls} data-flagged="{_e(n_flag)}">{row}</tr>')
    parts.append("</tbody></table></div>")

    # -- one section per class --
    for c in classes:
        parts.append(_class_section(c, images, s))

    parts.append("</main></body></html>")
    path.write_text("\n".join(parts))


def _class_section(c, images: dict, s: dict) -> str:
    flagged = {k.cluster for k in c.flagged}
    out = [f'<section class="cls{" flagged" if flagged else ""}" id="{_e(_anchor(c))}">']
    sub = f" (SpRAy on a uniform subsample of {c.sampled:,})" if c.sampled < c.rows else ""
    es = f", {c.error_share:.1%} of its images could not be explained" if c.error_share else ""
    out.append(f"<h2>{_e(c.title)} <span class=muted>· {_e(c.method)}</span></h2>")
    out.append(
        f"<p class=stats>{c.rows:,} heatmaps{sub}{es}. {c.k} cluster{'s' if c.k != 1 else ''}"
        f" ({'fixed' if s['spray']['clusters'] else 'eigengap'}).</p>"
    )
    out.append("<div class=row>")
    out.append(
        f"<figure>{_img(render.png_uri(render.heat_image(c.mean_heatmap, 150)), 'mean heatmap', 'px')}"
        "<figcaption>mean heatmap of all rows</figcaption></figure>"
    )
    if c.embedding is not None and len(c.embedding):
        sc = render.png_uri(render.scatter_image(c.embedding, c.labels, flagged, 260))
        out.append(
            f"<figure>{_img(sc, 'scatter')}<figcaption>{_e(c.view)} view of the spectral embedding, one dot "
            "per heatmap, coloured by cluster (flagged: ringed)</figcaption></figure>"
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
    out.append("</div><div class=cards>")
    for k in c.clusters:
        proto = render.png_uri(render.heat_image(k.prototype, 110))
        mets = [f"{_METRIC_LABELS.get(m, m)} {_fmt(v)}" for m, v in k.metrics.items() if v is not None]
        where = flag_rules.where(k.regions)
        strip = []
        for rid, m in zip(k.sample_ids, k.sample_maps if k.sample_maps is not None else [], strict=False):
            strip.append(_img(render.png_uri(render.overlay_image(images.get(rid), m, 72)), "sample", "px", str(rid)))
        out.append(
            f'<div class="card{" flagged" if k.flagged else ""}" data-cluster="{_e(k.cluster)}">'
            f"<div>{_img(proto, 'prototype', 'px')}</div><div>"
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


__all__ = ["write_report"]
