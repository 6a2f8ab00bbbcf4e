"""``audit(out_dir, ...)``: from a run's heatmaps to per-class summaries, SpRAy clusters and flags.

The stages, one function each: ``reader.scan`` (counts, metric sums, the subsample) ->
``reader.gather`` (the maps, streamed) -> ``spray.spray`` per group -> ``_clusters`` (prototypes,
spread, metric means) -> ``_flag`` -> the files: ``clusters.parquet``, ``summary.json`` and
``index.html`` (``report.py``). The README's "Auditing a model" section is the user's guide.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from gradcam_batch.engine.audit import flags as flag_rules
from gradcam_batch.engine.audit.flags import FlagParams
from gradcam_batch.engine.audit.reader import Grouper, RunOutput, Selection, gather, scan
from gradcam_batch.engine.audit.report_files import FORMAT, UNFLAGGED, ReportFiles
from gradcam_batch.engine.audit.run_output import row_groups
from gradcam_batch.engine.audit.spray import SprayParams, spray


@dataclass(frozen=True)
class AuditConfig:
    """Everything ``gradcam-batch audit`` takes (see ``gradcam-batch audit --help``)."""

    out_dir: str
    report_dir: str | None = None  # None: compute and return, write nothing
    classes: tuple[int, ...] | None = None
    method: str | None = None
    rows: str = "auto"  # label | top1 | all
    max_per_class: int = 5000
    images: tuple[str, ...] | None = None  # where the run's inputs are now (default: the manifest's)
    overlays: bool = True
    samples: int = 8  # overlays per cluster
    class_names: tuple[str, ...] | None = None
    memory_mb: int = 512  # picked small maps held at once (more groups: more passes)
    threads: int | None = 1  # BLAS/OpenMP threads for SpRAy; one is fastest on a shared machine, None: all
    spray: SprayParams = field(default_factory=SprayParams)
    flags: FlagParams = field(default_factory=FlagParams)


@dataclass
class ClusterAudit:
    cluster: int
    size: int
    share: float  # of the audited rows of the class
    spread: float  # RMS distance of the members' maps to the prototype, per pixel, maps in [0, 1]
    prototype: np.ndarray  # (s, s) mean map of the members
    regions: dict[str, float]  # the prototype's mass share per region
    metrics: dict[str, float | None]
    flags: list[str] = field(default_factory=list)
    sample_ids: list = field(default_factory=list)  # the members closest to the prototype
    sample_maps: np.ndarray | None = None

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        return {
            "cluster": self.cluster,
            "size": self.size,
            "share": round(self.share, 4),
            "spread": round(self.spread, 4),
            "flagged": self.flagged,
            "flags": self.flags,
            "regions": {k: round(v, 4) for k, v in self.regions.items()},
            "metrics": _round(self.metrics),
            "sample_ids": self.sample_ids,
            "prototype": np.round(self.prototype, 4).tolist(),
        }


@dataclass
class ClassAudit:
    class_index: int
    class_name: str | None
    method: str
    rows: int  # audited rows (all, before the subsample)
    errors: int  # error rows with this class as their label
    sampled: int  # rows SpRAy saw
    mean_heatmap: np.ndarray  # (s, s) over all audited rows
    metrics: dict[str, float | None]
    probability: float | None
    k: int
    eigengap_k: int
    eigenvalues: np.ndarray
    view: str
    clusters: list[ClusterAudit]
    nonfinite: int = 0  # rows skipped because their map holds a NaN or an Inf (not in ``rows``)
    embedding: np.ndarray | None = None  # (sampled, 2)
    labels: np.ndarray | None = None  # (sampled,)
    worst_ids: list = field(default_factory=list)
    worst_maps: np.ndarray | None = None
    worst_values: list = field(default_factory=list)

    @property
    def flagged(self) -> list[ClusterAudit]:
        return [c for c in self.clusters if c.flagged]

    @property
    def error_share(self) -> float | None:
        total = self.rows + self.errors
        return self.errors / total if total else None

    @property
    def title(self) -> str:
        return f"{self.class_name} ({self.class_index})" if self.class_name else f"class {self.class_index}"

    def to_dict(self) -> dict:
        return {
            "class_index": self.class_index,
            "class_name": self.class_name,
            "method": self.method,
            "rows": self.rows,
            "errors": self.errors,
            "nonfinite": self.nonfinite,
            "error_share": None if self.error_share is None else round(self.error_share, 4),
            "sampled": self.sampled,
            "subsampled": self.sampled < self.rows,
            "probability_mean": None if self.probability is None else round(self.probability, 4),
            "metrics": _round(self.metrics),
            "k": self.k,
            "eigengap_k": self.eigengap_k,
            "eigenvalues": np.round(self.eigenvalues, 5).tolist(),
            "view": self.view,
            "flagged_clusters": [c.cluster for c in self.flagged],
            "mean_heatmap": np.round(self.mean_heatmap, 4).tolist(),
            "worst_localized": [
                {"id": i, "value": round(v, 4)} for i, v in zip(self.worst_ids, self.worst_values, strict=True)
            ],
            "clusters": [c.to_dict() for c in self.clusters],
        }


@dataclass
class AuditResult:
    """What ``audit`` found; the files hold the same (``summary`` is ``summary.json``)."""

    classes: list[ClassAudit]  # flagged classes first, then by rows
    summary: dict
    report_dir: Path | None
    _clusters: pa.Table | None = None

    @property
    def flagged(self) -> list[tuple[ClassAudit, ClusterAudit]]:
        return [(c, k) for c in self.classes for k in c.flagged]

    @property
    def clusters(self) -> pa.Table:
        """``clusters.parquet``: id, class_index, method, cluster, embedding_x, embedding_y, flagged."""
        if self._clusters is None and self.report_dir is not None:
            self._clusters = pq.read_table(self.report_dir / "clusters.parquet")
        return self._clusters

    @property
    def index_html(self) -> Path | None:
        return None if self.report_dir is None else self.report_dir / "index.html"

    def __getitem__(self, class_index: int) -> ClassAudit:
        for c in self.classes:
            if c.class_index == class_index:
                return c
        raise KeyError(class_index)


CLUSTER_SCHEMA = pa.schema(
    [
        ("class_index", pa.int32()),
        ("method", pa.string()),
        ("cluster", pa.int32()),
        ("embedding_x", pa.float32()),
        ("embedding_y", pa.float32()),
        ("flagged", pa.bool_()),
    ]
)


def _round(d: dict) -> dict:
    return {k: (None if v is None or not np.isfinite(v) else round(float(v), 4)) for k, v in d.items()}


def _clusters(cls: ClassAudit, maps: np.ndarray, metrics: dict[str, np.ndarray], samples: int, ids: list) -> None:
    """Fill ``cls.clusters``: size, prototype, spread, regions, metric means, samples."""
    n = len(maps)
    for c in range(cls.k):
        members = np.flatnonzero(cls.labels == c)
        if not len(members):
            continue
        proto = maps[members].mean(0)
        dist = np.sqrt(((maps[members] - proto) ** 2).mean(axis=(1, 2)))
        closest = members[np.argsort(dist, kind="stable")[:samples]]
        means = {}
        for m, vals in metrics.items():
            v = vals[members]
            v = v[np.isfinite(v)]
            means[m] = float(v.mean()) if len(v) else None
        cls.clusters.append(
            ClusterAudit(
                cluster=c,
                size=len(members),
                share=len(members) / n,
                spread=float(np.sqrt((dist**2).mean())),
                prototype=proto,
                regions=flag_rules.region_shares(proto),
                metrics=means,
                sample_ids=[ids[i] for i in closest],
                sample_maps=maps[closest],
            )
        )


def _flag(classes: list[ClassAudit], params: FlagParams) -> None:
    """Location and box-energy flags, by the rules in ``flags.py``."""
    for cls in classes:
        others = [o for o in classes if o is not cls and o.method == cls.method and o.rows]
        for cl in cls.clusters:
            if cl.size < params.min_rows:
                continue
            rest = [o for o in cls.clusters if o is not cl]
            if rest:
                w = np.array([o.size for o in rest], np.float64)
                rest_map = sum(wi * o.prototype for wi, o in zip(w, rest, strict=True)) / w.sum()
                reason = flag_rules.location_flag(cl.prototype, rest_map, params, "the class's other clusters")
            elif others:
                w = np.array([o.rows for o in others], np.float64)
                rest_map = sum(wi * o.mean_heatmap for wi, o in zip(w, others, strict=True)) / w.sum()
                reason = flag_rules.location_flag(cl.prototype, rest_map, params, "the other classes")
            else:
                reason = None
            if reason:
                cl.flags.append(reason)
            if rest and cl.metrics.get("box_energy") is not None:
                vals = [(o.metrics.get("box_energy"), o.size) for o in rest if o.metrics.get("box_energy") is not None]
                if vals:
                    rest_energy = sum(v * s for v, s in vals) / sum(s for _, s in vals)
                    reason = flag_rules.box_flag(cl.metrics["box_energy"], rest_energy, params)
                    if reason:
                        cl.flags.append(reason)
        cls.clusters.sort(key=lambda c: (not c.flagged, -c.size, c.cluster))


def _class_names(cfg: AuditConfig, run: RunOutput) -> dict[int, str]:
    if cfg.class_names:
        return dict(enumerate(cfg.class_names))
    if "class_name" not in run.schema.names or not run.has_label:
        return {}
    # A kept ``class_name`` column names the image's label: read it off rows whose class is the label.
    names: dict[int, str] = {}
    with contextlib.closing(row_groups(run.files, ["class_index", "label", "class_name"])) as batches:
        for _, _, _, t in batches:
            cls = t.column("class_index").fill_null(-1).to_numpy()
            lab = t.column("label").fill_null(-2).to_numpy()
            nm = t.column("class_name").to_pylist()
            for i in np.flatnonzero(cls == lab):
                if nm[i] is not None:
                    names.setdefault(int(cls[i]), str(nm[i]))
    return names


def audit(out_dir: str | Path, report_dir: str | Path | None = None, **options) -> AuditResult:
    """Audit a run's output directory; write the report into ``report_dir`` when given.

    ``options`` are ``AuditConfig``'s fields; ``spray`` and ``flags`` also take a dict.
    """
    if isinstance(options.get("spray"), dict):
        options["spray"] = SprayParams(**options["spray"])
    if isinstance(options.get("flags"), dict):
        options["flags"] = FlagParams(**options["flags"])
    for key in ("classes", "images", "class_names"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    cfg = AuditConfig(out_dir=str(out_dir), report_dir=None if report_dir is None else str(report_dir), **options)
    return run_audit(cfg)


def run_audit(cfg: AuditConfig) -> AuditResult:
    t0 = time.perf_counter()
    run = RunOutput.open(cfg.out_dir, inputs=cfg.images)
    sel = Selection(rows=cfg.rows, classes=cfg.classes, method=cfg.method)
    grouper = Grouper(run, sel)
    sp = cfg.spray
    size = (min(sp.size, run.map_shape[0]), min(sp.size, run.map_shape[1]))
    stats = scan(run, grouper, max_per_group=cfg.max_per_class, seed=sp.seed)
    grouper.check(stats)
    names = _class_names(cfg, run)
    report_dir = Path(cfg.report_dir) if cfg.report_dir else None
    with contextlib.nullcontext() if report_dir is None else ReportFiles(report_dir) as files:
        result = _audit(cfg, run, grouper, stats, names, size, files)
        if files is not None:
            flagged = {(c.class_index, c.method, k.cluster) for c in result.classes for k in c.flagged}
            files.finish_clusters(flagged, _cluster_schema(run))
            images: dict = {}
            if cfg.overlays:
                from gradcam_batch.engine.audit.images import load_images

                wanted = [i for c in result.classes for k in c.clusters for i in k.sample_ids]
                wanted += [i for c in result.classes for i in c.worst_ids]
                images, note = load_images(run.config, wanted, cfg.images)
                if note:
                    result.summary["notes"].append(note)
            result.summary["seconds"] = round(time.perf_counter() - t0, 3)
            files.tmp("summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
            from gradcam_batch.engine.audit import report

            report.write_report(files.tmp("index.html"), result, images)
            files.publish()
        else:
            result.summary["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _cluster_schema(run: RunOutput) -> pa.Schema:
    id_type = run.schema.field("id").type if "id" in run.schema.names else pa.string()
    return pa.schema([pa.field("id", id_type), *CLUSTER_SCHEMA])


def _audit(cfg, run, grouper, stats, names, size, files: ReportFiles | None) -> AuditResult:
    """SpRAy per group, the flags and the summary; with ``files``, each group's clusters go to a temporary file."""
    sp = cfg.spray
    schema = _cluster_schema(run)
    classes: list[ClassAudit] = []
    writer = None
    try:
        for chunk in gather(run, grouper, stats, size=size, memory_mb=cfg.memory_mb):
            for g, gm in sorted(chunk.items()):
                class_index, method = stats.keys[g]
                with threadpool_limits(limits=cfg.threads):
                    res = spray(gm.maps, sp)
                rows = int(stats.rows[g]) - gm.nonfinite
                cls = ClassAudit(
                    class_index=class_index,
                    class_name=names.get(class_index),
                    method=method,
                    rows=rows,
                    errors=int(stats.errors[g]),
                    sampled=len(gm.maps),
                    mean_heatmap=gm.mean,
                    metrics=stats.metric_means(g),
                    probability=float(stats.prob_sum[g] / stats.rows[g]) if stats.rows[g] else None,
                    k=res.k,
                    eigengap_k=res.eigengap_k,
                    eigenvalues=res.eigenvalues,
                    view=res.view,
                    clusters=[],
                    nonfinite=gm.nonfinite,
                    embedding=res.embedding,
                    labels=res.labels,
                    worst_ids=gm.worst_ids,
                    worst_maps=gm.worst_maps,
                    worst_values=gm.worst_values,
                )
                _clusters(cls, gm.maps, gm.metrics, cfg.samples, gm.ids)
                classes.append(cls)
                if files is not None and len(gm.maps):
                    if writer is None:
                        writer = pq.ParquetWriter(files.tmp(UNFLAGGED), schema, compression="zstd")
                    n = len(gm.maps)
                    writer.write_table(
                        pa.table(
                            {
                                "id": pa.array(gm.ids, schema.field("id").type),
                                "class_index": pa.array(np.full(n, class_index), pa.int32()),
                                "method": pa.array([method] * n, pa.string()),
                                "cluster": pa.array(res.labels, pa.int32()),
                                "embedding_x": pa.array(res.embedding[:, 0], pa.float32()),
                                "embedding_y": pa.array(res.embedding[:, 1], pa.float32()),
                                "flagged": pa.nulls(n, pa.bool_()),
                            },
                            schema=schema,
                        )
                    )
    finally:
        if writer is not None:
            writer.close()
    _flag(classes, cfg.flags)
    classes.sort(key=lambda c: (not c.flagged, -c.rows, c.class_index, c.method))

    notes = []
    sub = [c for c in classes if c.sampled < c.rows]
    if sub:
        notes.append(
            f"{len(sub)} class{'es' if len(sub) != 1 else ''} had more than {cfg.max_per_class:,} rows: SpRAy saw a "
            f"uniform subsample of {cfg.max_per_class:,} each (seed {sp.seed}); counts, means and metric means "
            "cover every row"
        )
    nonfinite = sum(c.nonfinite for c in classes)
    if nonfinite:
        notes.append(
            f"{nonfinite:,} map{'s' if nonfinite != 1 else ''} with NaN or Inf values were skipped: they are left out "
            "of the counts, the mean heatmaps and the clusters (the metric means still include their rows)"
        )
    summary = {
        "format": FORMAT,
        "run": {
            "out_dir": str(run.out_dir),
            "model": run.config.get("model"),
            "method": run.config.get("method"),
            "target_layer": run.config.get("target_layer_resolved"),
            "files": len(run.files),
            "rows": stats.rows_total,
            "error_rows": stats.errors_total,
            "map_column": run.map_column,
            "map_shape": list(run.map_shape),
            "metric_columns": list(run.metrics),
            "partial": run.partial,
        },
        "selection": {
            "rows": grouper.rows,
            "classes": None if cfg.classes is None else list(cfg.classes),
            "method": cfg.method,
            "max_per_class": cfg.max_per_class,
        },
        "spray": {**sp.to_dict(), "size": list(size)},
        "flag_rules": cfg.flags.to_dict(),
        "totals": {
            "classes": len(classes),
            "audited_rows": int(sum(c.rows for c in classes)),
            "sampled_rows": int(sum(c.sampled for c in classes)),
            "nonfinite_maps": int(nonfinite),
            "clusters": int(sum(len(c.clusters) for c in classes)),
            "flagged_clusters": int(sum(len(c.flagged) for c in classes)),
            "flagged_classes": int(sum(1 for c in classes if c.flagged)),
        },
        "notes": notes,
        "classes": [c.to_dict() for c in classes],
    }
    return AuditResult(classes=classes, summary=summary, report_dir=None if files is None else files.dir)


__all__ = ["AuditConfig", "AuditResult", "ClassAudit", "ClusterAudit", "audit", "run_audit"]
