"""Side by side: CoRelAy's reference SpRAy pipeline and this audit's SpRAy, on the same maps.

Two steps, because CoRelAy lives in a venv of its own (it is a benchmark dependency only, and
``pip install corelay`` brings h5py and metrohash-python, which the project does not need):

    # 1. in the project's venv: the maps exactly as the audit clusters them (per class, resampled to
    #    32x32), with the audit's clusters and flags and the truth, into one .npz
    .venv/bin/python benchmarks/corelay_side_by_side.py dump --demo demo-out --out demo-maps.npz
    .venv/bin/python benchmarks/corelay_side_by_side.py dump --planted interior --seed 0 --out int0.npz

    # 2. where corelay is importable (python3 -m venv V && V/bin/pip install corelay): CoRelAy's
    #    pipeline on those maps, and the scores of both
    V/bin/python benchmarks/corelay_side_by_side.py compare demo-maps.npz int0.npz

``--demo DIR`` runs ``gradcam-batch demo -o DIR`` first when DIR holds no run yet; its truth is the
sample's ``watermark`` column. ``--planted CASE`` uses the planted benchmark's cache (run without
boxes, audited with the defaults; ``benchmarks/planted_shortcuts.py`` makes them).

CoRelAy's reference pipeline is the ``spectral`` variant of its ``virelay_analysis.py`` example:
each map divided by its sum (``Normalize``), flattened, Euclidean ``SciPyPDist``,
``SparseKNN(n_neighbors=10, symmetric=True)``, ``SymmetricNormalLaplacian``,
``EigenDecomposition(n_eigval=32)`` (unit-norm rows), then ``KMeans(n_clusters=k)`` on all 32
eigenvector columns. k is the audit's k for the class (its eigengap), so both cut the class into as
many clusters; scikit-learn's k-means gets seeds 0..4 (CoRelAy passes none) and the figures are
their mean. The audit differs on two choices: no per-map sum normalization, and k-means on the first
k eigenvectors. ``compare`` also runs CoRelAy's embedding with each choice switched, to show which
one matters.

Scores, per class that holds marked rows: the cluster that best isolates the marked rows (largest
F1) with its purity (marked share of the cluster) and recall (share of the marked rows in it), for
each pipeline; and the audit's flagged rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEEDS = range(5)


# -- step 1: the audit's maps (project venv) ---------------------------------------------------------


def dump_maps(run_dir: Path, audit_dir: Path, marked_by_id: dict, out: Path) -> dict:
    """The maps the audit clustered, with its cluster and flag per row and ``marked`` per row, into ``out``."""
    import pyarrow.parquet as pq

    from gradcam_batch.engine.audit.reader import Grouper, RunOutput, Selection, gather, scan
    from gradcam_batch.engine.audit.spray import SprayParams

    summary = json.loads((audit_dir / "summary.json").read_text())
    sp = SprayParams(**{k: v for k, v in summary["spray"].items() if k != "size"})
    run = RunOutput.open(run_dir)
    grouper = Grouper(run, Selection(rows=summary["selection"]["rows"]))
    size = tuple(summary["spray"]["size"])
    stats = scan(run, grouper, max_per_group=summary["selection"]["max_per_class"], seed=sp.seed)
    clusters = pq.read_table(audit_dir / "clusters.parquet").to_pydict()
    audit_of = {
        (i, c): (k, f)
        for i, c, k, f in zip(
            clusters["id"], clusters["class_index"], clusters["cluster"], clusters["flagged"], strict=True
        )
    }
    maps, ids, classes, cl, fl = [], [], [], [], []
    for chunk in gather(run, grouper, stats, size=size, memory_mb=512):
        for g, gm in sorted(chunk.items()):
            class_index = stats.keys[g][0]
            for m, i in zip(gm.maps, gm.ids, strict=True):
                k, f = audit_of[(i, class_index)]
                maps.append(m)
                ids.append(str(i))
                classes.append(class_index)
                cl.append(k)
                fl.append(bool(f))
    k_of = {c["class_index"]: c["k"] for c in summary["classes"]}
    np.savez_compressed(
        out,
        maps=np.asarray(maps, np.float32),
        ids=np.asarray(ids),
        class_index=np.asarray(classes, np.int64),
        marked=np.asarray([bool(marked_by_id[i]) for i in ids]),
        audit_cluster=np.asarray(cl, np.int64),
        audit_flagged=np.asarray(fl),
        audit_k=np.asarray([k_of[c] for c in classes], np.int64),
    )
    return {"rows": len(ids), "out": str(out)}


def _demo(args) -> tuple[Path, Path, dict]:
    import pyarrow.parquet as pq

    out = Path(args.demo)
    if not (out / "audit" / "summary.json").exists():
        cmd = [str(Path(sys.executable).parent / "gradcam-batch"), "demo", "-o", str(out), "--device", "cpu"]
        subprocess.run(cmd, check=True)
    t = pq.read_table(sorted(out.glob("part-*.parquet")), columns=["id", "watermark"]).to_pydict()
    return out, out / "audit", dict(zip(t["id"], t["watermark"], strict=True))


def _planted(args) -> tuple[Path, Path, dict]:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(HERE))
    import planted_shortcuts as bench

    r = bench.evaluate(args.planted, args.seed, boxes=False, cache=Path(args.cache))
    d = Path(r["report"]).parent
    t = pq.read_table(d / "truth.parquet", columns=["id", "marked"]).to_pydict()
    return d / "run", d / "audit", dict(zip(t["id"], t["marked"], strict=True))


# -- step 2: CoRelAy (its own venv) ------------------------------------------------------------------


def best_cluster(labels: np.ndarray, marked: np.ndarray) -> tuple[float, float, int]:
    """(purity, recall, size) of the cluster with the largest F1 against ``marked``."""
    total = int(marked.sum())
    best = (-1.0, 0.0, 0.0, 0)
    for c in np.unique(labels):
        sel = labels == c
        tp = int((sel & marked).sum())
        f1 = 2 * tp / (int(sel.sum()) + total)
        if f1 > best[0]:
            best = (f1, tp / int(sel.sum()), tp / total, int(sel.sum()))
    return best[1], best[2], best[3]


def corelay_labels(maps: np.ndarray, k: int, seed: int, *, normalize: bool, first_k: bool) -> np.ndarray:
    """CoRelAy's reference pipeline on (n, s, s) maps; ``normalize``/``first_k`` switch its two choices."""
    from corelay.pipeline.spectral import SpectralEmbedding
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.base import Processor
    from corelay.processor.distance import SciPyPDist
    from corelay.processor.embedding import EigenDecomposition
    from corelay.processor.flow import Sequential
    from corelay.processor.laplacian import SymmetricNormalLaplacian
    from sklearn.cluster import KMeans

    class Normalize(Processor):  # the example's: each map divided by its sum
        def function(self, data):
            return data / data.sum((1, 2), keepdims=True)

    class Flatten(Processor):
        def function(self, data):
            return data.reshape(data.shape[0], -1)

    pipeline = SpectralEmbedding(
        preprocessing=Sequential([Normalize(), Flatten()]) if normalize else Flatten(),
        pairwise_distance=SciPyPDist(metric="euclidean"),
        affinity=SparseKNN(n_neighbors=10, symmetric=True),
        laplacian=SymmetricNormalLaplacian(),
        embedding=EigenDecomposition(n_eigval=32, is_output=True),
    )
    x = maps.astype(np.float64) + (1e-12 if normalize else 0.0)  # an all-zero map would divide by zero
    eigval, eigvec = pipeline(x)
    if first_k:
        # The audit's choice: the k eigenvectors of the smallest Laplacian eigenvalues, rows unit-norm.
        order = np.argsort(eigval, kind="stable")
        u = eigvec[:, order[:k]]
        u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    else:
        u = eigvec
    return KMeans(n_clusters=k, random_state=seed, n_init="auto").fit_predict(u)


def compare(path: Path) -> list[dict]:
    import corelay

    d = np.load(path)
    out = []
    for c in np.unique(d["class_index"]):
        sel = d["class_index"] == c
        marked = d["marked"][sel]
        if not marked.any():
            continue
        maps, k = d["maps"][sel], int(d["audit_k"][sel][0])
        flagged = d["audit_flagged"][sel]
        nf = int(flagged.sum())
        row = {
            "file": path.name,
            "class_index": int(c),
            "rows": int(sel.sum()),
            "marked": int(marked.sum()),
            "k": k,
            "corelay": corelay.__version__ if hasattr(corelay, "__version__") else None,
            "audit_flagged": {
                "rows": nf,
                "purity": (int((flagged & marked).sum()) / nf) if nf else None,
                "recall": int((flagged & marked).sum()) / int(marked.sum()),
            },
            "audit_best_cluster": dict(
                zip(("purity", "recall", "size"), best_cluster(d["audit_cluster"][sel], marked), strict=True)
            ),
        }
        k_eff = max(k, 2)  # with k = 1 nothing can be isolated; CoRelAy's example lists k from 2
        row["k_corelay"] = k_eff
        for name, normalize, first_k in (
            ("corelay_reference", True, False),
            ("corelay_no_normalization", False, False),
            ("corelay_first_k", True, True),
            ("corelay_both_audit_choices", False, True),
        ):
            scores = np.array(
                [
                    best_cluster(corelay_labels(maps, k_eff, s, normalize=normalize, first_k=first_k), marked)
                    for s in SEEDS
                ]
            )
            row[name] = {
                "purity": round(float(scores[:, 0].mean()), 3),
                "recall": round(float(scores[:, 1].mean()), 3),
                "purity_range": [round(float(scores[:, 0].min()), 3), round(float(scores[:, 0].max()), 3)],
                "recall_range": [round(float(scores[:, 1].min()), 3), round(float(scores[:, 1].max()), 3)],
            }
        out.append(row)
    return out


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| maps | class | rows | marked | k | audit: flagged purity, recall | audit: best cluster "
        "| CoRelAy reference | CoRelAy, no normalization | CoRelAy, first k | CoRelAy, both audit choices |",
        "|---|---:|---:|---:|---:|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{_f(r[n]['purity'])}, {_f(r[n]['recall'])}" for n in ("audit_flagged", "audit_best_cluster")]
        cells[0] += f" ({r['audit_flagged']['rows']} rows)"
        for n in ("corelay_reference", "corelay_no_normalization", "corelay_first_k", "corelay_both_audit_choices"):
            cells.append(f"{_f(r[n]['purity'])}, {_f(r[n]['recall'])}")
        k = r["k"] if r["k"] == r["k_corelay"] else f"{r['k']} ({r['k_corelay']} for CoRelAy)"
        lines.append(
            f"| {r['file']} | {r['class_index']} | {r['rows']} | {r['marked']} | {k} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="project venv: the audit's maps, clusters, flags and truth into an .npz")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", metavar="DIR", help="the demo's output (run here first when empty)")
    src.add_argument("--planted", metavar="CASE", help="a planted benchmark case (its cache)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cache", default=str(HERE / ".planted-cache"))
    d.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="corelay venv: CoRelAy's pipeline on dumped maps, and both scores")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "dump":
        run_dir, audit_dir, truth = _demo(args) if args.demo else _planted(args)
        print(json.dumps(dump_maps(run_dir, audit_dir, truth, args.out)))
        return 0
    try:
        import corelay  # noqa: F401
    except ImportError:
        print(
            "Error: corelay is not importable here; run compare in a venv with `pip install corelay`", file=sys.stderr
        )
        return 2
    rows = [r for f in args.files for r in compare(f)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
