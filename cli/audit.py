"""``gradcam-batch audit``: a run's heatmaps -> per-class summaries, SpRAy clusters, flags, one HTML report."""

from __future__ import annotations

import click

from gradcam_batch.cli.options import BadInvocation, parse_int_list


def _clusters(text: str) -> int | None:
    t = text.strip().lower()
    if t == "auto":
        return None
    if t.isdigit() and int(t) >= 1:
        return int(t)
    raise click.BadParameter(f"{text!r}: expected auto or a positive integer", param_hint="--clusters")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "report_dir", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--classes", "classes_text", metavar="3,17,42", help="Audit only these classes.")
@click.option("--method", help="Audit only this method's rows. [default: every method, each on its own]")
@click.option(
    "--rows",
    type=click.Choice(["auto", "label", "top1", "all"]),
    default="auto",
    show_default=True,
    help="Which heatmap of an image: the label's, the top-1 prediction's, or all. auto: label when the run has one.",
)
@click.option("--clusters", "clusters_text", default="auto", show_default=True, help="auto (eigengap) or a fixed K.")
@click.option(
    "--max-per-class", default=5000, show_default=True, type=click.IntRange(min=3), help="SpRAy subsample per class."
)
@click.option(
    "--images",
    multiple=True,
    metavar="INPUT",
    help="Where the run's input Parquet files are now, for overlays. [default: the paths in the manifest]",
)
@click.option("--overlays/--no-overlays", default=True, show_default=True, help="Show heatmaps over their images.")
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=2), help="SpRAy map size (SxS).")
@click.option("--neighbors", default=10, show_default=True, type=click.IntRange(min=1), help="kNN graph neighbours.")
@click.option("--eigenvalues", default=32, show_default=True, type=click.IntRange(min=2), help="Eigenvalues computed.")
@click.option("--max-clusters", default=30, show_default=True, type=click.IntRange(min=1), help="Largest k (eigengap).")
@click.option("--view", type=click.Choice(["auto", "tsne", "umap", "spectral"]), default="auto", show_default=True,
              help="The 2-D view. auto: t-SNE up to 5,000 maps and 50 classes, else spectral (the eigenvectors); "
                   "umap needs umap-learn.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="Subsample, k-means and t-SNE seed.")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False), help="File: one class name per line.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=0), help="SpRAy threads (0: all).")
def audit(out_dir, report_dir, classes_text, method, rows, clusters_text, max_per_class, images, overlays, size,
          neighbors, eigenvalues, max_clusters, view, seed, class_names, threads) -> None:  # fmt: skip
    """Audit a run's heatmaps: per-class summaries, SpRAy clusters, flags, and REPORT_DIR/index.html."""
    from pathlib import Path

    from gradcam_batch.engine.audit import AuditConfig, AuditError, SprayParams, run_audit

    names = None
    if class_names:
        try:
            text = Path(class_names).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInvocation(f"--class-names {class_names}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise BadInvocation(f"--class-names {class_names}: {exc.strerror or exc}") from None
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
    classes = parse_int_list(classes_text, what="--classes")
    cfg = AuditConfig(
        out_dir=out_dir,
        report_dir=report_dir,
        classes=tuple(classes) if classes else None,
        method=method,
        rows=rows,
        max_per_class=max_per_class,
        images=tuple(images) or None,
        overlays=overlays,
        class_names=names,
        threads=threads or None,
        spray=SprayParams(
            size=size,
            neighbors=neighbors,
            eigenvalues=eigenvalues,
            max_clusters=max_clusters,
            clusters=_clusters(clusters_text),
            view=view,
            seed=seed,
        ),
    )
    try:
        result = run_audit(cfg)
    except AuditError as exc:
        raise BadInvocation(str(exc)) from None
    echo_findings(result)


def echo_findings(result) -> None:
    from gradcam_batch.engine.audit import partial_line

    if result.summary["run"]["partial"]:
        click.echo(partial_line(result.summary["run"]["partial"]))
    t = result.summary["totals"]
    click.echo(
        f"audited {t['audited_rows']:,} heatmaps in {t['classes']} classes: {t['clusters']} clusters, "
        f"{t['flagged_clusters']} flagged"
    )
    for cls, k in result.flagged:
        click.echo(
            f"  flagged, strength {k.strength or 0:.2f} ({k.evidence}): {cls.title}, cluster {k.cluster} "
            f"({k.size} of {cls.sampled} heatmaps): {k.flags[0]}"
        )
    for note in result.summary["notes"]:
        click.echo(f"note: {note}")
    if result.index_html is not None:
        click.echo(f"report: {result.index_html}")
