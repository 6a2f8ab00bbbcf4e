"""``gradcam-batch demo``: the whole ``run`` job on the embedded sample, then a localization check.

The package ships a sample Parquet file of synthetic shapes (each with its label and bounding
box) and a small CNN trained on such images (``engine/demo/assets.py`` makes both). The demo
explains the sample end to end through the same pipeline as ``gradcam-batch run``, then reads the
output back and reports the pointing game: how often the peak of the top-1 heatmap falls inside
the labelled box. A few overlays (heatmap over image) are written for a person to look at.
Then it audits the output (``gradcam-batch audit``) and prints the report's path and the flagged
clusters: half of the sample's discs carry a corner watermark that the CNN learned as a shortcut.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from gradcam_batch.cli.options import BadInvocation


def _colormap(heat: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8, blue (cold) through green to red (hot)."""
    x = heat.astype(np.float32) / 255.0
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, scale: int = 4) -> np.ndarray:
    """Blend a uint8 heatmap over an RGB image (resized to it), enlarged ``scale`` times."""
    from PIL import Image

    h, w = image.shape[:2]
    heat_img = Image.fromarray(heat).resize((w, h), Image.Resampling.BILINEAR)
    blend = (1 - alpha) * image.astype(np.float32) + alpha * _colormap(np.asarray(heat_img)).astype(np.float32)
    out = Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))
    return np.asarray(out.resize((w * scale, h * scale), Image.Resampling.NEAREST))


@click.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False),
    help="Output directory: the run in OUTPUT/run, overlays and the audit beside it. "
    "[default: gradcam-batch-demo in the system temp directory]",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(min=1), help="Predictions explained.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overlays", default=8, show_default=True, type=click.IntRange(min=0), help="Overlay PNGs to write.")
@click.option("--limit", type=click.IntRange(min=1), help="Explain only the first N sample images.")
@click.option("--audit/--no-audit", "run_audit", default=True, show_default=True, help="Audit the output too.")
@click.option(
    "--metrics/--no-metrics",
    "with_metrics",
    default=True,
    show_default=True,
    help="Faithfulness (deletion, insertion: 10 steps; confidence) and box metrics on every row.",
)
def demo(output, batch_size, top_k, device, overlays, limit, run_audit, with_metrics) -> None:
    """Run the embedded sample through `run`, report throughput and pointing game, then audit it."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    from gradcam_batch.engine.demo import assets as demo_assets
    from gradcam_batch.engine.job.config import RunConfig, RunFailed, RunSetupError
    from gradcam_batch.engine.job.local import run_job

    out_dir = Path(output) if output else Path(tempfile.gettempdir()) / "gradcam-batch-demo"
    # The run gets a directory of its own: its --overwrite on a rerun replaces only a run's own
    # files, and the overlays and the audit report beside it are not.
    run_dir = out_dir / "run"
    prep = demo_assets.PREPROCESS
    config = RunConfig(
        inputs=[str(demo_assets.SAMPLE)],
        output=str(run_dir),
        model=demo_assets.MODEL_SPEC,
        weights=str(demo_assets.CHECKPOINT),
        top_k=top_k,
        label_column="label",
        id_column="image_id",
        keep_columns=["class_name", "box_x0", "box_y0", "box_x1", "box_y1", "watermark"],
        resize=prep["resize"],
        crop=prep["crop"],
        mean=prep["mean"],
        std=prep["std"],
        batch_size=batch_size,
        device=device,
        overwrite=True,
        limit=limit,
        metrics=("deletion", "insertion", "confidence") if with_metrics else (),
        metrics_steps=10,
        metrics_batch=256,
        box_column="box_x0,box_y0,box_x1,box_y1" if with_metrics else None,
        pointing_tolerance=3.0,  # the protocol's 15 px at 224, scaled to the sample's 48 px
    )
    try:
        summary = run_job(config)
    except RunSetupError as exc:
        raise BadInvocation(str(exc)) from None
    except RunFailed as exc:
        raise click.ClickException(f"the demo run stopped: {exc}; {exc.advice}") from None

    files = sorted(run_dir.glob("part-*.parquet"))
    table = pq.read_table(files)
    top1 = table.filter(pc.and_(pc.equal(table["class_rank"], 0), pc.equal(table["status"], "ok")))
    peak_y = top1["peak_y"].to_numpy()
    peak_x = top1["peak_x"].to_numpy()
    x0, y0, x1, y1 = (top1[c].to_numpy() for c in ("box_x0", "box_y0", "box_x1", "box_y1"))
    # Heatmaps are at the input size (48x48), the boxes in image pixels: the same frame.
    cy, cx = peak_y + 0.5, peak_x + 0.5
    hits = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    correct = top1["class_index"].to_numpy() == top1["label"].to_numpy()

    written = []
    if overlays:
        ov_dir = out_dir / "overlays"
        ov_dir.mkdir(exist_ok=True)
        sample = pq.read_table(demo_assets.SAMPLE, columns=["image_id", "image"])
        images = dict(zip(sample["image_id"].to_pylist(), sample["image"].to_pylist(), strict=True))
        heat = top1.slice(0, overlays)
        maps = heat["heatmap"].combine_chunks().to_numpy_ndarray()
        for i, (iid, name, cls) in enumerate(
            zip(heat["id"].to_pylist(), heat["class_name"].to_pylist(), heat["class_index"].to_pylist(), strict=True)
        ):
            img = np.asarray(Image.open(io.BytesIO(images[iid])).convert("RGB"))
            path = ov_dir / f"{i:02d}-{iid}-{name}-pred{cls}.png"
            Image.fromarray(overlay(img, maps[i])).save(path)
            written.append(path)

    click.echo(
        f"explained {summary['images']} images ({summary['rows_out']} rows) in {summary['seconds']:.2f} s: "
        f"{summary['images_per_s']:.1f} img/s on {summary['device']}, target layer {summary['target_layer']!r}"
    )
    click.echo(
        f"top-1 accuracy {correct.mean():.3f}; pointing game (top-1 heatmap peak inside the box) "
        f"{hits.mean():.3f} over {len(hits)} images"
    )
    means = summary.get("metric_means") or {}
    if means:
        click.echo(
            f"faithfulness: deletion AUC {means['deletion_auc']:.3f} (lower is better), insertion AUC "
            f"{means['insertion_auc']:.3f} (higher is better), average drop {means['average_drop']:.1%}, "
            f"increase in confidence {means['increase_rate']:.1%}"
        )
        click.echo(
            f"localization: pointing accuracy {means['pointing_accuracy']:.3f} (within 3 px), localization accuracy "
            f"{means['localization_accuracy']:.3f} (the paper's 15% box with IoU >= 0.5), over every explained row"
        )
    click.echo(f"output: {run_dir} ({len(files)} Parquet file{'' if len(files) == 1 else 's'} + manifest.json)")
    if written:
        click.echo(f"overlays: {len(written)} PNGs in {written[0].parent}")
    if run_audit:
        _audit(run_dir, out_dir / "audit")


def _audit(run_dir: Path, report_dir: Path) -> None:
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:  # the audit extra is not installed
        click.echo(f"audit skipped ({exc}); pip install 'gradcam-batch[audit]'")
        return
    from gradcam_batch.cli.audit import echo_findings
    from gradcam_batch.engine.audit import AuditError, audit

    try:
        result = audit(run_dir, report_dir)
    except AuditError as exc:  # the run and its overlays are written: say why the report is not
        raise click.ClickException(f"the audit of the demo's run failed: {exc}") from None
    echo_findings(result)
