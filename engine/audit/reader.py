"""Streaming read of a run's output for the audit: two passes over the part files, bounded memory.

1. ``scan``: the small columns only (class, rank, label, method, status, metrics; never the maps).
   It counts rows and errors per group (a group is one class, or one (class, method) pair),
   sums the metric columns, and picks the rows SpRAy will see: above ``max_per_group`` rows,
   the ``max_per_group`` rows with the smallest hash of (seed, row position) -- a fixed-seed
   uniform subsample that does not depend on the order the files are read in.
2. ``gather``: the map column (``heatmap``, or the low-resolution ``cam`` where the run stored no
   heatmap), a row group at a time. Every audited row's map is resampled to ``size`` x ``size``
   and added to its group's sum (the mean heatmap covers all rows, not only the subsample);
   the picked rows' small maps and ids are kept. When the picked maps of all groups would not
   fit ``memory_mb``, the groups are split into chunks and the map column is read once per chunk.

Memory is the row-group batch plus the picked small maps, whatever the number of rows.

A map with a NaN or an Inf (which a run never writes as ``ok``, but a damaged or foreign output
can hold) is skipped in pass 2 and counted per group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradcam_batch.engine.audit.intervals import mean_interval, share_interval
from gradcam_batch.engine.audit.run_output import (
    BOOL_METRICS,
    BOX_METRICS,
    METRICS,
    AuditInputError,
    RunOutput,
    row_groups,
)

SELECTIONS = ("auto", "label", "top1", "all")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def row_keys(positions: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, global row position): the subsample's order, independent of batching."""
    with np.errstate(over="ignore"):
        z = positions.astype(np.uint64) + np.uint64(seed) * _MIX + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: area averaging when shrinking, bilinear (half-pixel centres) when growing."""
    m = np.zeros((n_out, n_in), np.float64)
    if n_out <= n_in:
        edges = np.arange(n_out + 1) * (n_in / n_out)
        for i in range(n_out):
            lo, hi = edges[i], edges[i + 1]
            for j in range(int(np.floor(lo)), int(np.ceil(hi))):
                m[i, j] = min(hi, j + 1) - max(lo, j)
        return m / m.sum(1, keepdims=True)
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    centres = np.clip(centres, 0, n_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = centres - lo
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


@dataclass(frozen=True)
class Selection:
    """Which rows are audited, and how they are grouped."""

    rows: str = "auto"  # label | top1 | all; auto: label when the run has a label column, else top1
    classes: tuple[int, ...] | None = None
    method: str | None = None  # None: every method, each its own group

    def resolved_rows(self, run: RunOutput) -> str:
        if self.rows == "auto":
            return "label" if run.has_label else "top1"
        if self.rows == "label" and not run.has_label:
            raise AuditInputError(
                "--rows label needs a run with ground truth (run --label-column, or --mask-column for segmentation)"
            )
        return self.rows


@dataclass
class GroupStats:
    """Per-group figures of the first pass (arrays indexed by group)."""

    keys: list[tuple[int, str]]  # (class_index, method)
    rows: np.ndarray  # audited rows
    errors: np.ndarray  # error rows attributed to the group's class (by label), or 0
    metric_sum: dict[str, np.ndarray]
    metric_n: dict[str, np.ndarray]  # rows that hold a value (a run may compute its metrics on a share of them)
    prob_sum: np.ndarray
    picked: list[np.ndarray]  # per group: the picked row positions, sorted
    worst: list[np.ndarray]  # per group: the worst-localized row positions, worst first
    worst_metric: str | None
    errors_total: int
    rows_total: int
    methods: tuple[str, ...] = ()  # the run's methods (from its manifest, else those its rows name)

    metric_sq: dict[str, np.ndarray] = field(default_factory=dict)  # sums of squares, for the intervals

    def metric_means(self, g: int) -> dict[str, float | None]:
        return {
            m: (float(self.metric_sum[m][g] / self.metric_n[m][g]) if self.metric_n[m][g] else None)
            for m in self.metric_sum
        }

    def metric_intervals(self, g: int) -> dict[str, tuple[float, float] | None]:
        """95% intervals of ``metric_means`` (``intervals.py``): Wilson for the boolean shares, else normal."""
        out = {}
        for m in self.metric_sum:
            n, total = int(self.metric_n[m][g]), float(self.metric_sum[m][g])
            if m in BOOL_METRICS:
                out[m] = share_interval(n, total)
            else:
                # Every audited metric is a share or an AUC in [0, 1] (engine/job/columns.py).
                out[m] = mean_interval(n, total, float(self.metric_sq[m][g]), bounds=(0.0, 1.0))
        return out


class _BottomK:
    """Per group, the ``k`` entries with the smallest keys, kept in bounded buffers."""

    def __init__(self, k: int):
        self.k = k
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0

    def add(self, group: np.ndarray, key: np.ndarray, pos: np.ndarray) -> None:
        if len(group):
            self.parts.append((group, key, pos))
            self.size += len(group)
        if self.size > 4 * self.k + (1 << 16):
            self._prune()

    def _prune(self) -> None:
        if not self.parts:
            return
        g, key, pos = (np.concatenate(a) for a in zip(*self.parts, strict=True))
        order = np.lexsort((pos, key, g))
        g, key, pos = g[order], key[order], pos[order]
        first = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
        rank = np.arange(len(g)) - np.repeat(first, np.diff(np.r_[first, len(g)]))
        keep = rank < self.k
        self.parts = [(g[keep], key[keep], pos[keep])]
        self.size = int(keep.sum())

    def result(self, n_groups: int, *, sort_by_key: bool) -> list[np.ndarray]:
        self._prune()
        out = [np.zeros(0, np.int64) for _ in range(n_groups)]
        if not self.parts:
            return out
        g, _, pos = self.parts[0]  # sorted by group, then key
        for gi in np.unique(g):
            sel = pos[g == gi]
            out[int(gi)] = sel if sort_by_key else np.sort(sel)
        return out


class Grouper:
    """Maps the rows of a batch to audited groups (-1: not audited)."""

    def __init__(self, run: RunOutput, sel: Selection):
        self.run = run
        self.rows = sel.resolved_rows(run)
        self.classes = None if sel.classes is None else np.asarray(sorted(set(sel.classes)), np.int64)
        self.method = sel.method
        # A one-method run has no method column: its rows are keyed by the manifest's method.
        self.single_method = None if run.has_method else run.methods[0]
        self.index: dict[tuple[int, str], int] = {}

    @property
    def columns(self) -> list[str]:
        cols = ["class_index", "class_rank", "status"]
        cols += [self.run.truth] if self.run.truth else []
        cols += ["method"] if self.run.has_method else []
        return cols

    def methods(self, t: pa.Table) -> np.ndarray:
        """Each row's method ("" for an error row, which has none)."""
        if self.run.has_method:
            return np.asarray(t.column("method").fill_null("").to_numpy(zero_copy_only=False), object)
        return np.full(t.num_rows, self.single_method, object)

    def check(self, stats: GroupStats) -> None:
        """A ``--method`` or ``--classes`` that the run lacks is an error, not an audit of nothing."""
        if self.method is not None and self.method not in stats.methods:
            raise AuditInputError(
                f"the run has no heatmaps of method {self.method!r}; its methods: {', '.join(stats.methods) or 'none'}"
            )
        if self.classes is not None:
            missing = sorted(set(self.classes.tolist()) - {c for c, _ in stats.keys})
            if missing:
                what = {"label": "its label's heatmap", "top1": "its top-1 heatmap", "all": "every heatmap"}[self.rows]
                raise AuditInputError(
                    f"the run has no heatmaps of class {', '.join(map(str, missing))} among those audited "
                    f"(--rows {self.rows}: {what} of each image)"
                )

    def audited(self, t: pa.Table) -> np.ndarray:
        """Bool mask of the rows the audit looks at."""
        ok = pc.equal(t.column("status"), "ok").to_numpy(zero_copy_only=False)
        cls = t.column("class_index").fill_null(-1).to_numpy().astype(np.int64)
        mask = ok & (cls >= 0)
        if self.rows == "label" and self.run.truth == "positive":  # every positive label, each in its class
            mask &= t.column("positive").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        elif self.rows == "label":
            lab = t.column("label").fill_null(-1).to_numpy().astype(np.int64)
            mask &= cls == lab
        elif self.rows == "top1":
            mask &= t.column("class_rank").fill_null(-1).to_numpy() == 0
        if self.classes is not None:
            mask &= np.isin(cls, self.classes)
        if self.method is not None and self.run.has_method:
            mask &= self.methods(t) == self.method
        return mask

    def groups(self, t: pa.Table, *, add: bool) -> np.ndarray:
        mask = self.audited(t)
        out = np.full(t.num_rows, -1, np.int64)
        if not mask.any():
            return out
        cls = t.column("class_index").fill_null(-1).to_numpy().astype(np.int64)
        meth = self.methods(t)
        for i in np.flatnonzero(mask):
            key = (int(cls[i]), str(meth[i]))
            g = self.index.get(key)
            if g is None:
                if not add:
                    continue
                g = self.index[key] = len(self.index)
            out[i] = g
        return out


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) >= n:
        return a
    return np.concatenate([a, np.zeros(n - len(a) + 16, a.dtype)])


def scan(run: RunOutput, grouper: Grouper, *, max_per_group: int, seed: int, worst_n: int = 8) -> GroupStats:
    """Pass 1: counts, metric sums and the picked rows of every group (the small columns only)."""
    metrics = list(run.metrics)
    worst_metric = next((m for m in ("box_energy", "box_iou") if m in metrics), None)
    columns = grouper.columns + metrics + ["probability"] * ("probability" in run.schema.names)
    rows = np.zeros(0, np.int64)
    errors = np.zeros(0, np.int64)
    prob = np.zeros(0, np.float64)
    msum = {m: np.zeros(0, np.float64) for m in metrics}
    msq = {m: np.zeros(0, np.float64) for m in metrics}
    mn = {m: np.zeros(0, np.int64) for m in metrics}
    picker, worst = _BottomK(max_per_group), _BottomK(worst_n)
    errors_total = rows_total = 0
    label_errors: dict[int, int] = {}
    seen_methods: dict[str, None] = {}
    with contextlib.closing(row_groups(run.files, columns)) as batches:
        for _, _, base, t in batches:
            rows_total += t.num_rows
            g = grouper.groups(t, add=True)
            n_groups = len(grouper.index)
            rows, prob = _grow(rows, n_groups), _grow(prob, n_groups)
            is_err = pc.equal(t.column("status"), "error").to_numpy(zero_copy_only=False)
            errors_total += int(is_err.sum())
            if is_err.any() and run.truth == "label" and grouper.rows == "label":
                # An error row has no class; with labels it counts against its label's class.
                for c in t.column("label").fill_null(-1).to_numpy()[is_err].astype(np.int64).tolist():
                    label_errors[c] = label_errors.get(c, 0) + 1
            if run.has_method:
                seen_methods.update(dict.fromkeys(m for m in pc.unique(t.column("method")).to_pylist() if m))
            sel = g >= 0
            if not sel.any():
                continue
            gs = g[sel]
            rows[:n_groups] += np.bincount(gs, minlength=n_groups)
            if "probability" in t.column_names:
                p = t.column("probability").fill_null(0).to_numpy()[sel].astype(np.float64)
                prob[:n_groups] += np.bincount(gs, p, minlength=n_groups)
            for m in metrics:
                col = t.column(m)
                valid = col.is_valid().to_numpy(zero_copy_only=False)[sel]
                if pa.types.is_boolean(col.type):  # pointing_hit, confidence_increase: shares of True
                    col = pc.cast(col, pa.float64())
                vals = col.fill_null(0).to_numpy(zero_copy_only=False)[sel].astype(np.float64)
                msum[m] = _grow(msum[m], n_groups)
                msq[m] = _grow(msq[m], n_groups)
                mn[m] = _grow(mn[m], n_groups)
                present = np.where(valid, vals, 0.0)
                msum[m][:n_groups] += np.bincount(gs, present, minlength=n_groups)
                msq[m][:n_groups] += np.bincount(gs, present * present, minlength=n_groups)
                mn[m][:n_groups] += np.bincount(gs, valid.astype(np.float64), minlength=n_groups).astype(np.int64)
                if m == worst_metric:
                    pos = base + np.flatnonzero(sel)[valid]
                    worst.add(gs[valid], vals[valid], pos)
            pos = base + np.flatnonzero(sel)
            picker.add(gs, row_keys(pos, seed), pos)
    methods = run.methods or tuple(seen_methods)
    # An error row has no method either: it counts against the group of its label for every audited method.
    audited_methods = methods if grouper.method is None else [m for m in methods if m == grouper.method]
    for c, n in sorted(label_errors.items()):
        if c >= 0 and (grouper.classes is None or c in grouper.classes):
            for m in audited_methods:
                g = grouper.index.setdefault((c, m), len(grouper.index))
                errors = _grow(errors, g + 1)
                errors[g] += n
    n_groups = len(grouper.index)
    rows, errors, prob = _grow(rows, n_groups), _grow(errors, n_groups), _grow(prob, n_groups)
    return GroupStats(
        keys=list(grouper.index),
        rows=rows[:n_groups],
        errors=errors[:n_groups],
        metric_sum={m: _grow(msum[m], n_groups)[:n_groups] for m in metrics},
        metric_n={m: _grow(mn[m], n_groups)[:n_groups] for m in metrics},
        metric_sq={m: _grow(msq[m], n_groups)[:n_groups] for m in metrics},
        prob_sum=prob[:n_groups],
        picked=picker.result(n_groups, sort_by_key=False),
        worst=worst.result(n_groups, sort_by_key=True) if worst_metric else [np.zeros(0, np.int64)] * n_groups,
        worst_metric=worst_metric,
        errors_total=errors_total,
        rows_total=rows_total,
        methods=methods,
    )


@dataclass
class GroupMaps:
    """Pass 2's result for one group."""

    maps: np.ndarray  # (n, s, s) float32 in [0, 1]: the picked rows, in row order
    ids: list  # the picked rows' ids
    positions: np.ndarray  # the picked rows' global positions
    mean: np.ndarray  # (s, s) float64: the mean map over all audited rows of the group with finite maps
    nonfinite: int = 0  # the group's rows whose map holds a NaN or an Inf: skipped
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # the picked rows' metric values (NaN: null)
    worst_ids: list = field(default_factory=list)
    worst_maps: np.ndarray | None = None  # (w, H, W) uint8 at the stored resolution
    worst_values: list = field(default_factory=list)  # the worst rows' values of ``GroupStats.worst_metric``


def _maps_of(t: pa.Table, column: str, shape: tuple[int, int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The selected rows' maps as float32 in [0, 1], and which are finite (the others are zeros here).

    A cam is min-max normalized like a heatmap.
    """
    col = t.column(column).take(pa.array(rows, pa.int64())).combine_chunks()
    storage = col.storage if isinstance(col, pa.ExtensionArray) else col
    flat = storage.flatten().to_numpy(zero_copy_only=False)
    maps = flat.reshape(len(rows), *shape).astype(np.float32)
    if column == "heatmap" and storage.type.value_type == pa.uint8():
        return maps / 255.0, np.ones(len(rows), bool)
    finite = np.isfinite(maps).all(axis=(1, 2))
    maps[~finite] = 0.0
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    rng = hi - lo
    maps = np.where(rng > 1e-5 * np.maximum(hi, 1e-30), (maps - lo) / np.where(rng > 0, rng, 1), 0.0)
    return maps.astype(np.float32), finite


def gather(
    run: RunOutput,
    grouper: Grouper,
    stats: GroupStats,
    *,
    size: tuple[int, int],
    memory_mb: int,
) -> Iterator[dict[int, GroupMaps]]:
    """Pass 2, yielding the groups' maps a chunk of groups at a time (bounded by ``memory_mb``)."""
    h, w = run.map_shape
    mh, mw = resample_matrix(h, size[0]).astype(np.float32), resample_matrix(w, size[1]).astype(np.float32)
    per_map = size[0] * size[1] * 4
    budget = max(1, (memory_mb << 20) // per_map)
    chunks: list[list[int]] = [[]]
    used = 0
    for g in range(len(stats.keys)):
        n = len(stats.picked[g])
        if chunks[-1] and used + n > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(g)
        used += n
    means = np.zeros((len(stats.keys), *size), np.float64)
    nonfinite = np.zeros(len(stats.keys), np.int64)
    row_starts = _row_group_starts(run.row_groups)
    for ci, chunk in enumerate(chunks):
        in_chunk = np.zeros(len(stats.keys), bool)
        in_chunk[chunk] = True
        wanted = np.sort(np.concatenate([stats.picked[g] for g in chunk] + [stats.worst[g] for g in chunk] + [[]]))
        wanted = wanted.astype(np.int64)
        # Later chunks read only the row groups that hold a picked row.
        skip = set()
        if ci > 0:
            for (fi, rg), (lo, hi) in row_starts.items():
                a = np.searchsorted(wanted, lo)
                if a >= len(wanted) or wanted[a] >= hi:
                    skip.add((fi, rg))
        found: dict[int, tuple[list, list, list, list]] = {g: ([], [], [], []) for g in chunk}
        worst_found: dict[int, dict[int, tuple]] = {g: {} for g in chunk}
        worst_sets = {g: set(stats.worst[g].tolist()) for g in chunk}
        picked_sets = {g: set(stats.picked[g].tolist()) for g in chunk}
        columns = [*grouper.columns, "id", run.map_column, *run.metrics]
        with contextlib.closing(row_groups(run.files, columns, skip)) as batches:
            for _, _, base, t in batches:
                g = grouper.groups(t, add=False)
                rows = np.flatnonzero(g >= 0) if ci == 0 else np.flatnonzero((g >= 0) & in_chunk[np.maximum(g, 0)])
                if not len(rows):
                    continue
                # Resampled in slices, so the float32 copy of full-size maps stays small.
                step = max(1, (16 << 20) // (h * w * 4))
                small, finite = [], []
                for a in range(0, len(rows), step):
                    maps, ok = _maps_of(t, run.map_column, (h, w), rows[a : a + step])
                    small.append(mh @ maps @ mw.T)
                    finite.append(ok)
                small, finite = np.concatenate(small), np.concatenate(finite)
                if not finite.all():
                    if ci == 0:
                        np.add.at(nonfinite, g[rows[~finite]], 1)
                    rows, small = rows[finite], small[finite]
                gr = g[rows]
                if ci == 0 and len(gr):
                    _add_by_group(means, gr, small)
                pos = base + rows
                ids = t.column("id").take(pa.array(rows, pa.int64())).to_pylist()
                mvals = np.stack(
                    [
                        t.column(m).take(pa.array(rows, pa.int64())).cast(pa.float64()).fill_null(np.nan).to_numpy()
                        for m in run.metrics
                    ]
                    or [np.zeros(len(rows))],
                    axis=1,
                )
                for i, (gi, p) in enumerate(zip(gr.tolist(), pos.tolist(), strict=True)):
                    if gi not in found:
                        continue
                    if p in picked_sets[gi]:
                        found[gi][0].append(small[i])
                        found[gi][1].append(ids[i])
                        found[gi][2].append(p)
                        found[gi][3].append(mvals[i])
                    if p in worst_sets[gi]:
                        raw = _maps_of(t, run.map_column, (h, w), np.asarray([rows[i]]))[0][0]
                        value = float(mvals[i][run.metrics.index(stats.worst_metric)])
                        worst_found[gi][p] = (ids[i], np.round(raw * 255).astype(np.uint8), value)
        out = {}
        for g in chunk:
            maps, ids, pos, mv = found[g]
            mv_arr = np.stack(mv) if mv else np.zeros((0, max(len(run.metrics), 1)))
            order = [p for p in stats.worst[g].tolist() if p in worst_found[g]]
            out[g] = GroupMaps(
                maps=np.stack(maps).astype(np.float32) if maps else np.zeros((0, *size), np.float32),
                ids=ids,
                positions=np.asarray(pos, np.int64),
                mean=means[g] / max(int(stats.rows[g] - nonfinite[g]), 1),
                nonfinite=int(nonfinite[g]),
                metrics={m: mv_arr[:, j] for j, m in enumerate(run.metrics)},
                worst_ids=[worst_found[g][p][0] for p in order],
                worst_maps=np.stack([worst_found[g][p][1] for p in order]) if order else None,
                worst_values=[worst_found[g][p][2] for p in order],
            )
        yield out


def _add_by_group(total: np.ndarray, groups: np.ndarray, maps: np.ndarray) -> None:
    """``total[g] += maps[groups == g].sum(0)`` for every g: one sort and one ``reduceat`` (``np.add.at`` is slow)."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    total[g[starts]] += np.add.reduceat(maps[order], starts, axis=0)


def _row_group_starts(row_groups: Sequence[tuple[int, ...]]) -> dict[tuple[int, int], tuple[int, int]]:
    out, base = {}, 0
    for fi, sizes in enumerate(row_groups):
        for rg, n in enumerate(sizes):
            out[(fi, rg)] = (base, base + n)
            base += n
    return out


__all__ = [
    "BOX_METRICS",
    "METRICS",
    "SELECTIONS",
    "AuditInputError",
    "GroupMaps",
    "GroupStats",
    "Grouper",
    "RunOutput",
    "Selection",
    "gather",
    "resample_matrix",
    "row_keys",
    "scan",
]
