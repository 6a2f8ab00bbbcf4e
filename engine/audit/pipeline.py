"""``audit(out_dir, ...)``: from a run's heatmaps to per-class summaries, SpRAy clusters and flags.

The stages: ``reader.scan`` (counts, metric sums, the subsample) -> ``reader.gather`` (the maps,
streamed, a chunk of groups at a time) -> per group ``spray.spray`` and ``class_evidence.measure``
(where the maps look) -> per chunk ``class_evidence.read_crops`` (what they look at, from the input
images) -> per group ``class_evidence.judge`` and ``carve`` (findings; a flagged subset becomes its
own cluster), ``_clusters`` (prototypes, spread, metric means) and the box rule -> the files:
``clusters.parquet``, ``summary.json`` and ``index.html`` (``report.py``). The README's "Auditing a
model" section is the user's guide.

One module past 500 lines: the result types (``ClusterAudit``, ``ClassAudit``, ``AuditResult``, the
``clusters.parquet`` schema) and the stages that fill them change together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from gradcam_batch.engine.audit import class_evidence as cev
from gradcam_batch.engine.audit import flags as flag_rules
from gradcam_batch.engine.audit import report
from gradcam_batch.engine.audit.evidence import window_side
from gradcam_batch.engine.audit.flags import Finding, FlagParams
from gradcam_batch.engine.audit.images import InputImages, InputsUnavailable
from gradcam_batch.engine.audit.reader import Grouper, RunOutput, Selection, gather, scan
from gradcam_batch.engine.audit.report_files import FORMAT, ReportFiles
from gradcam_batch.engine.audit.run_output import row_groups
from gradcam_batch.engine.audit.spray import SprayParams, resolve_view, spray, tsne_library


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
    flags: list[str] = field(default_factory=list)  # the flagged findings' sentences
    sample_ids: list = field(default_factory=list)  # the members closest to the prototype
    sample_maps: np.ndarray | None = None
    sample_points: np.ndarray | None = None  # (k, 2) the samples' attention points, small-map pixels (NaN: none)
    strength: float | None = None  # the strongest flagged finding's strength
    finding: Finding | None = None  # that finding

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def evidence(self) -> str | None:
        return None if self.finding is None else self.finding.kind

    def to_dict(self) -> dict:
        return {
            "cluster": self.cluster,
            "size": self.size,
            "share": round(self.share, 4),
            "spread": round(self.spread, 4),
            "flagged": self.flagged,
            "strength": None if self.strength is None else round(self.strength, 4),
            "evidence": self.evidence,
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
    k: int  # clusters, those that evidence split off included
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
    spray_k: int = 0  # SpRAy's clusters, before evidence split any off
    findings: list[Finding] = field(default_factory=list)  # every candidate, flagged or not, strongest first
    scale: tuple[float, float] = (1.0, 1.0)  # small-map pixels -> the stored map's pixels
    ids: list = field(default_factory=list)  # (sampled,) the ids of the rows SpRAy saw, in ``labels``' order
    clusterings: dict[int, np.ndarray] = field(default_factory=dict)  # SpRAy's k -> (sampled,) labels; the switch
    metric_intervals: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # 95%, ``intervals.py``
    metric_rows: dict[str, int] = field(default_factory=dict)  # rows behind each metric mean
    points: np.ndarray | None = None  # the sampled rows the report's scatter shows (``report.page_points``)
    hover: dict[int, np.ndarray] = field(default_factory=dict)  # sampled row -> its map, for a hover overlay

    @property
    def flagged(self) -> list[ClusterAudit]:
        return sorted((c for c in self.clusters if c.flagged), key=lambda c: (-(c.strength or 0), c.cluster))

    @property
    def strength(self) -> float:
        return max((c.strength or 0.0 for c in self.flagged), default=0.0)

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
            "metric_intervals": {
                m: None if v is None else [round(float(v[0]), 4), round(float(v[1]), 4)]
                for m, v in self.metric_intervals.items()
            },
            "metric_rows": self.metric_rows,
            "k": self.k,
            "spray_k": self.spray_k,
            "eigengap_k": self.eigengap_k,
            "eigenvalues": np.round(self.eigenvalues, 5).tolist(),
            "view": self.view,
            "clusterings": sorted(self.clusterings),
            "flagged_clusters": [c.cluster for c in self.flagged],
            "mean_heatmap": np.round(self.mean_heatmap, 4).tolist(),
            "worst_localized": [
                {"id": i, "value": round(v, 4)} for i, v in zip(self.worst_ids, self.worst_values, strict=True)
            ],
            "clusters": [c.to_dict() for c in self.clusters],
            "findings": [f.to_dict(self.scale) for f in self.findings],
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
        """The flagged (class, cluster) pairs, strongest first."""
        pairs = [(c, k) for c in self.classes for k in c.flagged]
        return sorted(pairs, key=lambda p: (-(p[1].strength or 0), p[0].class_index, p[0].method, p[1].cluster))

    @property
    def clusters(self) -> pa.Table:
        """``clusters.parquet``: one row per audited map (``CLUSTER_SCHEMA``)."""
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
        # The evidence, per image: class-relative score and its kind, the raw scores, where the map looks.
        ("shortcut_score", pa.float32()),
        ("evidence", pa.string()),
        ("position_score", pa.float32()),
        ("pattern_score", pa.float32()),
        ("attention_y", pa.float32()),
        ("attention_x", pa.float32()),
    ]
)


def _round(d: dict) -> dict:
    return {k: (None if v is None or not np.isfinite(v) else round(float(v), 4)) for k, v in d.items()}


def _clusters(cls: ClassAudit, maps: np.ndarray, metrics: dict[str, np.ndarray], samples: int, ids: list,
              points: np.ndarray) -> None:  # fmt: skip
    """Fill ``cls.clusters``: size, prototype, spread, regions, metric means, samples and their attention points."""
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
                sample_points=points[closest],
            )
        )


def _apply_findings(cls: ClassAudit, ce: cev.ClassEvidence, metrics: dict, params: FlagParams, size, map_shape,
                    rng: np.random.Generator) -> None:  # fmt: skip
    """Sentences for every candidate; the flagged ones mark their clusters; then the box rule on the rest."""
    by_id = {c.cluster: c for c in cls.clusters}
    for f in ce.findings:
        f.sentence = flag_rules.describe(f, cls.sampled, size, cls.scale, map_shape)
        if not f.flagged:
            continue
        targets = cls.clusters if f.whole_class else [by_id[f.cluster]] if f.cluster in by_id else []
        for cl in targets:
            cl.flags.append(f.sentence)
            if cl.strength is None or f.strength > cl.strength:
                cl.strength, cl.finding = f.strength, f
    energy = metrics.get("box_energy")
    if energy is not None:
        for cl in cls.clusters:
            f = cev.box_finding(energy, cls.labels == cl.cluster, params, rng)
            if f is None:
                continue
            if cl.finding is not None and not cl.finding.whole_class:  # the same rows: one finding, one more kind
                flag_rules.add_kind(cl.finding, f, params)
                f = cl.finding
                f.sentence = flag_rules.describe(f, cls.sampled, size, cls.scale, map_shape)
                cl.flags[-1] = f.sentence
                cl.strength = f.strength
                continue
            f.cluster = cl.cluster
            f.sentence = flag_rules.describe(f, cls.sampled, size, cls.scale, map_shape)
            cls.findings.append(f)
            if f.flagged:
                cl.flags.append(f.sentence)
                cl.strength, cl.finding = f.strength, f
    cls.findings.sort(key=lambda f: -f.strength)
    cls.clusters.sort(key=lambda c: (not c.flagged, -(c.strength or 0), -c.size, c.cluster))


def _class_audit(cfg, stats, g, gm, res, ce, rng, names, size, scale, map_shape, n_groups) -> ClassAudit:
    """One group's ClassAudit: findings judged, flagged subsets carved into clusters, clusters filled."""
    class_index, method = stats.keys[g]
    pointing = gm.metrics.get("pointing_hit")
    cev.judge(ce, pointing, cfg.flags, rng)
    labels = cev.carve(res.labels, ce.findings)
    cls = ClassAudit(
        class_index=class_index,
        class_name=names.get(class_index),
        method=method,
        rows=int(stats.rows[g]) - gm.nonfinite,
        errors=int(stats.errors[g]),
        sampled=len(gm.maps),
        mean_heatmap=gm.mean,
        metrics=stats.metric_means(g),
        metric_intervals=stats.metric_intervals(g),
        metric_rows={m: int(stats.metric_n[m][g]) for m in stats.metric_n},
        probability=float(stats.prob_sum[g] / stats.rows[g]) if stats.rows[g] else None,
        k=int(labels.max()) + 1 if len(labels) else res.k,
        eigengap_k=res.eigengap_k,
        eigenvalues=res.eigenvalues,
        view=res.view,
        clusters=[],
        nonfinite=gm.nonfinite,
        embedding=res.embedding,
        labels=labels,
        worst_ids=gm.worst_ids,
        worst_maps=gm.worst_maps,
        worst_values=gm.worst_values,
        spray_k=res.k,
        findings=ce.findings,
        scale=scale,
        ids=gm.ids,
        clusterings=res.clusterings,
    )
    _clusters(cls, gm.maps, gm.metrics, cfg.samples, gm.ids, ce.points)
    _apply_findings(cls, ce, gm.metrics, cfg.flags, size, map_shape, rng)
    cls.points, hover = report.page_points(len(gm.maps), n_groups, cfg.spray.seed)
    cls.hover = {int(i): gm.maps[i].astype(np.float16) for i in hover}
    return cls


def _cluster_rows(cls: ClassAudit, ids: list, ce: cev.ClassEvidence, res, schema: pa.Schema, scale) -> pa.Table:
    n = len(ids)
    flagged = np.zeros(n, bool)
    kind = np.full(n, "", object)
    for cl in cls.clusters:
        if cl.flagged:
            rows = cls.labels == cl.cluster
            flagged |= rows
            kind[rows] = cl.evidence
    score, kinds = cev.row_scores(ce, kind)
    att = np.where(ce.ok[:, None], ce.points * np.asarray(scale), np.nan)

    def f32(x):
        x = np.asarray(x, np.float64)
        return pa.array(x.astype(np.float32), pa.float32(), mask=~np.isfinite(x))

    return pa.table(
        {
            "id": pa.array(ids, schema.field("id").type),
            "class_index": pa.array(np.full(n, cls.class_index), pa.int32()),
            "method": pa.array([cls.method] * n, pa.string()),
            "cluster": pa.array(cls.labels, pa.int32()),
            "embedding_x": pa.array(res.embedding[:, 0], pa.float32()),
            "embedding_y": pa.array(res.embedding[:, 1], pa.float32()),
            "flagged": pa.array(flagged, pa.bool_()),
            "shortcut_score": f32(score),
            "evidence": pa.array(kinds.tolist(), pa.string()),
            "position_score": f32(ce.position),
            "pattern_score": f32(ce.pattern if ce.pattern is not None else np.full(n, np.nan)),
            "attention_y": f32(att[:, 0]),
            "attention_x": f32(att[:, 1]),
        },
        schema=schema,
    )


def _cam_side(run: RunOutput) -> int | None:
    """The cam's side (its cells set the attention window), when the run stored the cam."""
    if "cam" not in run.schema.names:
        return None
    shape = getattr(run.schema.field("cam").type, "shape", None)
    return int(shape[0]) if shape else None


def _class_names(cfg: AuditConfig, run: RunOutput) -> dict[int, str]:
    if cfg.class_names:
        return dict(enumerate(cfg.class_names))
    if "class_name" not in run.schema.names or run.truth != "label":
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
            images: dict = {}
            if cfg.overlays:
                from gradcam_batch.engine.audit.images import load_images

                wanted = report.overlay_ids(result)
                images, note = load_images(run.config, wanted, cfg.images, max_side=2 * report.HOVER_PX)
                if note:
                    result.summary["notes"].append(note)
            result.summary["seconds"] = round(time.perf_counter() - t0, 3)
            files.tmp("summary.json").write_text(summary_json(result.summary))
            report.write_report(files.tmp("index.html"), result, images)
            files.publish()
        else:
            result.summary["seconds"] = round(time.perf_counter() - t0, 3)
    return result


CLUSTER_ROWS = 1 << 16  # clusters rows per row group: one per class would make a thousand-class file slow


def _write_clusters(files: ReportFiles, schema: pa.Schema, writer, pending: list[pa.Table], last: bool = False):
    """Write the pending clusters rows once there are ``CLUSTER_ROWS`` (or at the ``last`` call); returns the writer."""
    if not pending or (not last and sum(t.num_rows for t in pending) < CLUSTER_ROWS):
        return writer
    if writer is None:
        writer = pq.ParquetWriter(files.tmp("clusters.parquet"), schema, compression="zstd")
    writer.write_table(pa.concat_tables(pending))
    pending.clear()
    return writer


def summary_json(summary: dict) -> str:
    """``summary.json``'s text: indented at the top, one line per class (an indented dump of a thousand
    classes' maps takes Python's pure-Python encoder half a minute; the compact one, a second)."""
    top = {k: v for k, v in summary.items() if k != "classes"}
    text = json.dumps(top, indent=1)
    classes = ",\n".join(json.dumps(c, separators=(",", ":")) for c in summary.get("classes", []))
    return text[:-2] + f',\n "classes": [\n{classes}\n ]\n}}\n'


def _cluster_schema(run: RunOutput) -> pa.Schema:
    id_type = run.schema.field("id").type if "id" in run.schema.names else pa.string()
    return pa.schema([pa.field("id", id_type), *CLUSTER_SCHEMA])


def _audit(cfg, run, grouper, stats, names, size, files: ReportFiles | None) -> AuditResult:
    """SpRAy, evidence and findings per group, and the summary; with ``files``, each group's rows go to
    ``clusters.parquet`` as soon as the group is done."""
    view, view_note = resolve_view(cfg.spray.view, sum(len(p) for p in stats.picked), len(stats.keys))
    sp, fp = dataclasses.replace(cfg.spray, view=view), cfg.flags
    schema = _cluster_schema(run)
    cam_side = _cam_side(run)
    scale = (run.map_shape[0] / size[0], run.map_shape[1] / size[1])
    notes: list[str] = [view_note] if view_note else []
    source = None
    if not cfg.overlays:
        notes.append("pattern evidence skipped: --no-overlays reads no input image (position and box evidence only)")
    else:
        try:
            source = InputImages.open(run.config, cfg.images)
        except InputsUnavailable as exc:
            notes.append(
                f"pattern evidence skipped: the input images cannot be read ({exc}); pass --images where they are "
                "now (position and box evidence only)"
            )
    read = {"images": 0, "missing": 0}
    classes: list[ClassAudit] = []
    writer = None
    pending: list[pa.Table] = []  # clusters rows, written in row groups of at least CLUSTER_ROWS
    # One BLAS/OpenMP limit for the whole loop: entering it costs milliseconds (it scans the loaded
    # libraries), which a run of 1,000 classes paid a thousand times.
    with threadpool_limits(limits=cfg.threads), contextlib.ExitStack() as closing:
        closing.callback(lambda: writer is not None and writer.close())
        for chunk in gather(run, grouper, stats, size=size, memory_mb=cfg.memory_mb):
            work = []
            for g, gm in sorted(chunk.items()):
                class_index, method = stats.keys[g]
                rng = np.random.default_rng([fp.seed, class_index & 0xFFFFFFFF, zlib.crc32(method.encode())])
                res = spray(gm.maps, sp)
                ce = cev.measure(gm.maps, cam_side, fp, rng)
                work.append((g, gm, res, ce, rng))
            if source is not None:
                window = window_side(min(run.map_shape), cam_side, fp) * size[0] / min(run.map_shape)
                for _, gm, _, ce, rng in work:
                    cev.plan_elsewhere(ce, gm.mean, window, rng)
                done, missing = cev.read_crops(source, [(gm.ids, ce) for _, gm, _, ce, _ in work], size, cam_side, fp)
                read["images"] += done
                read["missing"] += missing
            for g, gm, res, ce, rng in work:
                cls = _class_audit(cfg, stats, g, gm, res, ce, rng, names, size, scale, run.map_shape, len(stats.keys))
                classes.append(cls)
                if files is not None and len(gm.maps):
                    pending.append(_cluster_rows(cls, gm.ids, ce, res, schema, scale))
                    writer = _write_clusters(files, schema, writer, pending)
        if files is not None:
            writer = _write_clusters(files, schema, writer, pending, last=True)
    if files is not None and writer is None:
        pq.write_table(schema.empty_table(), files.tmp("clusters.parquet"))
    if source is not None and read["missing"]:
        notes.append(
            f"{read['missing']:,} audited image{'s' if read['missing'] != 1 else ''} could not be read back from the "
            "inputs: their rows have no pattern score"
        )
    classes.sort(key=lambda c: (not c.flagged, -c.strength, -c.rows, c.class_index, c.method))
    views = {c.view for c in classes}
    if "tsne" in views and tsne_library() != "openTSNE":
        notes.append(
            "t-SNE by scikit-learn, since openTSNE is not installed (pip install openTSNE: 2 to 3 times faster)"
        )
    if cfg.spray.view == "umap" and "umap" not in views and "tsne" in views:
        notes.append("the 2-D view is t-SNE, since umap-learn is not installed (pip install umap-learn)")

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
            "task": run.config.get("task_resolved", "softmax"),
            "truth": run.truth,  # where --rows label reads the ground truth: "label", "positive" or None
        },
        "selection": {
            "rows": grouper.rows,
            "classes": None if cfg.classes is None else list(cfg.classes),
            "method": cfg.method,
            "max_per_class": cfg.max_per_class,
        },
        "spray": {**cfg.spray.to_dict(), "size": list(size), "view_used": view},
        "flag_rules": cfg.flags.to_dict(),
        "evidence": {
            "kinds": [
                "position",
                *(["pattern"] if source is not None else []),
                *(["boxes"] if "box_energy" in run.metrics or "pointing_hit" in run.metrics else []),
            ],
            "window": round(window_side(min(run.map_shape), cam_side, fp) / min(run.map_shape), 4),
            "images_read": read["images"],
            "images_missing": read["missing"],
        },
        "findings": [
            {"class_index": c.class_index, "class_name": c.class_name, "method": c.method, **f.to_dict(c.scale)}
            for c in classes
            for f in c.findings
            if f.flagged
        ],
        "totals": {
            "classes": len(classes),
            "audited_rows": int(sum(c.rows for c in classes)),
            "sampled_rows": int(sum(c.sampled for c in classes)),
            "nonfinite_maps": int(nonfinite),
            "clusters": int(sum(len(c.clusters) for c in classes)),
            "flagged_clusters": int(sum(len(c.flagged) for c in classes)),
            "flagged_classes": int(sum(1 for c in classes if c.flagged)),
            "flagged_rows": int(sum(int(f.members.sum()) for c in classes for f in c.findings if f.flagged)),
        },
        "notes": notes,
        "classes": [c.to_dict() for c in classes],
    }
    return AuditResult(classes=classes, summary=summary, report_dir=None if files is None else files.dir)


__all__ = ["AuditConfig", "AuditResult", "ClassAudit", "ClusterAudit", "audit", "run_audit"]
