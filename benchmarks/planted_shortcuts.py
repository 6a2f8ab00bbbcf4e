"""The planted-shortcut benchmark of the audit: does it flag the images a model reads by a planted mark, and only those?

    python benchmarks/planted_shortcuts.py                               # every case, the report seeds
    python benchmarks/planted_shortcuts.py --case interior --seed 3 --json out.json
    python benchmarks/planted_shortcuts.py --seeds 10-19 --boxes no     # the calibration seeds, no boxes

Per (case, seed), from ``gradcam_batch.engine.demo.planted`` (the data and its cases):

1. ``prepare``: the training set and the evaluation set (600 images, half of the discs marked where
   the case plants a mark), a ``PlantedCNN`` trained on the first, and the truth per evaluation
   image: ``marked``, the mark's box, the prediction with and without the mark, and ``relies``
   (removing the mark changes the prediction). The evaluation set is written as Parquet (PNG
   images, label, object box, ``marked``, mark box), the model as a state dict that
   ``gradcam-batch run --model gradcam_batch.engine.demo.planted:PlantedCNN --weights model.pt``
   loads.
2. ``explain``: ``run_job`` (what ``gradcam-batch run`` calls) with ``--label-column label``, and with
   ``--box-column box_x0,box_y0,box_x1,box_y1`` when ``boxes`` is true.
3. ``audit``: ``gradcam_batch.audit`` (what ``gradcam-batch audit`` calls) with its defaults and
   overlays, so that it can read the images; ``audit_options`` overrides any ``AuditConfig`` field
   (``{"flags": {...}}`` to tune the flag rule).
4. ``score``: the flagged rows of ``clusters.parquet`` against the marked images and against the
   images the model relies on the mark for (``planted.score_flags``).

``evaluate(case, seed, ...)`` runs all four and returns the figures as a dict; it is the function to
call in a loop while tuning the audit. Steps 1 and 2 are cached under ``--cache`` (default
``benchmarks/.planted-cache/``, which ignores itself in git), keyed by the case, the seed and the
``Setup``; the audit always runs afresh. ``--fresh`` rebuilds the cache of the cases asked for.

Seeds: calibrate the audit on ``CALIBRATION_SEEDS`` and report its figures on ``REPORT_SEEDS``.
A seed fixes the data (training and evaluation sets) and the training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CACHE = Path(__file__).resolve().parent / ".planted-cache"
CACHE_VERSION = 1  # bump when the data, the training or the cached files change
REPORT_SEEDS = (0, 1, 2)
CALIBRATION_SEEDS = tuple(range(10, 20))
MODEL_SPEC = "gradcam_batch.engine.demo.planted:PlantedCNN"
BOX_COLUMN = "box_x0,box_y0,box_x1,box_y1"
AUDIT_THREADS = 1  # SpRAy's BLAS threads, as the audit's default


@dataclass
class Prepared:
    case: str
    seed: int
    dir: Path
    data: Path  # the evaluation set, the run's input
    weights: Path
    truth: Path
    info: dict  # accuracy, reliance, seconds


def _key(case: str, seed: int, setup) -> str:
    from gradcam_batch.engine.demo import planted

    blob = json.dumps(
        {"v": CACHE_VERSION, "case": planted.CASES[case].to_dict(), "seed": seed, "setup": setup.to_dict()},
        sort_keys=True,
    )
    return f"{case}-s{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _cache_root(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by benchmarks/planted_shortcuts.py: the whole cache stays out of git\n*\n")
    return cache


def prepare(case: str, seed: int, *, setup=None, cache: Path = CACHE, fresh: bool = False) -> Prepared:
    """The evaluation set, the trained model and the truth of (case, seed): from the cache, or made now."""
    import torch

    from gradcam_batch.engine.demo import planted

    setup = setup or planted.Setup()
    d = _cache_root(Path(cache)) / _key(case, seed, setup)
    info_path = d / "prepare.json"
    if fresh and d.exists():
        shutil.rmtree(d)
    if info_path.exists():
        return Prepared(
            case, seed, d, d / "data.parquet", d / "model.pt", d / "truth.parquet", json.loads(info_path.read_text())
        )
    tmp = d.with_name(d.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    train = planted.train_set(case, seed, setup)
    held = planted.eval_set(case, seed, setup)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = planted.train(train, seed, setup)
    t_train = time.perf_counter() - t0
    torch.save(model.state_dict(), tmp / "model.pt")
    ids = planted.image_ids(case, seed, len(held))
    pq.write_table(planted.dataset_table(held, ids), tmp / "data.parquet", row_group_size=128)
    rel = planted.mark_reliance(model, held)
    mb = np.where(held.marked[:, None], held.mark_boxes, 0)
    truth = {
        "id": pa.array(ids),
        "label": pa.array(held.labels, pa.int64()),
        "marked": pa.array(held.marked),
    }
    for j, name in enumerate(("mark_x0", "mark_y0", "mark_x1", "mark_y1")):
        truth[name] = pa.array(mb[:, j], pa.int32(), mask=~held.marked)
    truth |= {
        "pred": pa.array(rel["pred"], pa.int64()),
        "pred_unmarked": pa.array(rel["pred_unmarked"], pa.int64()),
        "relies": pa.array(rel["relies"]),
    }
    pq.write_table(pa.table(truth), tmp / "truth.parquet")
    unmarked = ~held.marked
    n_marked = int(held.marked.sum())
    info = {
        "case": case,
        "seed": seed,
        "setup": setup.to_dict(),
        "case_spec": planted.CASES[case].to_dict(),
        "images": len(held),
        "marked": n_marked,
        "relies": int(rel["relies"].sum()),
        "reliance_share": round(float(rel["relies"].sum()) / n_marked, 4) if n_marked else None,
        "marked_predicted_as_mark_class": (
            round(float((rel["pred"][held.marked] == planted.MARK_CLASS).mean()), 4) if n_marked else None
        ),
        "accuracy": round(float((rel["pred"] == held.labels).mean()), 4),
        "accuracy_unmarked_per_class": {
            planted.CLASS_NAMES[c]: round(float((rel["pred"][unmarked & (held.labels == c)] == c).mean()), 4)
            for c in range(len(planted.CLASS_NAMES))
        },
        "seconds": {"data": round(t_data, 2), "train": round(t_train, 2)},
    }
    (tmp / "prepare.json").write_text(json.dumps(info, indent=1) + "\n")
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return Prepared(case, seed, d, d / "data.parquet", d / "model.pt", d / "truth.parquet", info)


def explain(prep: Prepared, *, boxes: bool = True, fresh: bool = False) -> tuple[Path, float]:
    """The run of the evaluation set (``run_job``), cached beside it; returns its directory and seconds."""
    from gradcam_batch.engine.demo.planted import IMAGE_SIZE
    from gradcam_batch.engine.job.config import RunConfig, RunSetupError
    from gradcam_batch.engine.job.local import run_job

    out = prep.dir / ("run-boxes" if boxes else "run")
    config = RunConfig(
        inputs=[str(prep.data)],
        output=str(out),
        model=MODEL_SPEC,
        weights=str(prep.weights),
        top_k=1,
        label_column="label",
        id_column="image_id",
        keep_columns=["class_name"],
        resize=IMAGE_SIZE,
        crop=(IMAGE_SIZE, IMAGE_SIZE),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        batch_size=128,
        device="cpu",
        overwrite=fresh,
        box_column=BOX_COLUMN if boxes else None,
        pointing_tolerance=3.0,  # the protocol's 15 px at 224, scaled to 48 px
    )
    t0 = time.perf_counter()
    try:
        run_job(config)  # resumes: a complete run with the same settings is left as it is
    except RunSetupError as exc:
        if "other settings" not in str(exc):
            raise
        run_job(dataclasses.replace(config, overwrite=True))
    return out, time.perf_counter() - t0


def score(clusters: pa.Table, truth: pa.Table) -> dict:
    """The flagged rows of ``clusters`` (the audit's ``clusters.parquet``) against ``truth``, joined on id."""
    from gradcam_batch.engine.demo.planted import best_cluster, score_flags

    t_ids = truth.column("id").to_pylist()
    pos = {i: k for k, i in enumerate(t_ids)}
    ids = clusters.column("id").to_pylist()
    idx = np.array([pos.get(i, -1) for i in ids], np.int64)
    if (idx < 0).any():
        raise ValueError(f"{int((idx < 0).sum())} audited rows have ids that are not in the truth")
    marked = truth.column("marked").to_numpy(zero_copy_only=False)[idx]
    relies = truth.column("relies").to_numpy(zero_copy_only=False)[idx]
    flagged = clusters.column("flagged").fill_null(False).to_numpy(zero_copy_only=False)
    classes = clusters.column("class_index").to_numpy()
    res = score_flags(flagged, marked, relies, classes)
    if "cluster" in clusters.column_names:
        keys = list(zip(classes.tolist(), clusters.column("cluster").to_pylist(), strict=True))
        res["best_cluster"] = best_cluster(keys, marked)
    res["images_audited"] = len(set(ids))
    res["images"] = len(t_ids)
    return res


def evaluate(
    case: str,
    seed: int,
    *,
    boxes: bool = True,
    setup=None,
    cache: Path = CACHE,
    fresh: bool = False,
    audit_options: dict | None = None,
    report_dir: Path | None = None,
) -> dict:
    """Prepare (cached), run (cached), audit and score one (case, seed); returns the figures.

    ``audit_options``: ``AuditConfig`` fields for ``gradcam_batch.audit`` (e.g. ``{"flags": {...}}``).
    ``report_dir``: where the audit writes its report (default: beside the cached run, replaced each time).
    """
    from gradcam_batch.engine.audit import audit

    prep = prepare(case, seed, setup=setup, cache=cache, fresh=fresh)
    run_dir, t_run = explain(prep, boxes=boxes, fresh=fresh)
    report = Path(report_dir) if report_dir else prep.dir / ("audit-boxes" if boxes else "audit")
    options = {"threads": AUDIT_THREADS, **(audit_options or {})}
    t0 = time.perf_counter()
    result = audit(run_dir, report, **options)
    t_audit = time.perf_counter() - t0
    scores = score(pq.read_table(report / "clusters.parquet"), pq.read_table(prep.truth))
    return {
        "case": case,
        "seed": seed,
        "boxes": boxes,
        "description": prep.info["case_spec"]["description"],
        "model": {
            k: prep.info[k] for k in ("accuracy", "accuracy_unmarked_per_class", "marked_predicted_as_mark_class")
        },
        "marked": prep.info["marked"],
        "relies": prep.info["relies"],
        "reliance_share": prep.info["reliance_share"],
        **scores,
        "findings": [
            {"class_index": c.class_index, "cluster": k.cluster, "size": k.size, "flags": k.flags}
            for c, k in result.flagged
        ],
        "clusters_per_class": {c.class_index: c.k for c in result.classes},
        "seconds": {**prep.info["seconds"], "run": round(t_run, 2), "audit": round(t_audit, 2)},
        "report": str(report),
    }


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _best(b: dict | None) -> str:
    return "n/a" if b is None else f"{b['purity']:.2f}, {b['recall']:.2f} ({b['size']} rows)"


def markdown(results: list[dict]) -> str:
    """One table row per result: the figures of benchmarks/RESULTS.md."""
    lines = [
        "| case | seed | boxes | marked | relies | flagged | precision | recall | precision (relied) "
        "| recall (relied) | false-flag share | unmarked classes flagged | best cluster: purity, recall |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        m, rel = r["against_marked"], r["against_relied"]
        lines.append(
            f"| {r['case']} | {r['seed']} | {'yes' if r['boxes'] else 'no'} | {r['marked']} | {r['relies']} "
            f"| {r['flagged']} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(rel['precision'])} "
            f"| {_fmt(rel['recall'])} | {_fmt(r['false_flag_share'])} "
            f"| {_fmt(r['false_flag_share_unmarked_classes'])} "
            f"| {_best(r.get('best_cluster'))} |"
        )
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    from gradcam_batch.engine.demo.planted import CASES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES), help="repeatable [default: every case]")
    p.add_argument("--seed", action="append", type=int, help="repeatable")
    p.add_argument("--seeds", type=_seeds, help="e.g. 0-2 or 10,11 [default: the report seeds]")
    p.add_argument("--boxes", choices=["yes", "no", "both"], default="both", help="run with the object boxes")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--fresh", action="store_true", help="rebuild the cached data, models and runs asked for")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and the run")
    args = p.parse_args(argv)
    import torch

    cases = args.case or list(CASES)
    seeds = (args.seed or []) + (args.seeds or []) or list(REPORT_SEEDS)
    boxes = {"yes": [True], "no": [False], "both": [True, False]}[args.boxes]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # training is deterministic for a seed and a thread count
    results = []
    try:
        for case in cases:
            for seed in seeds:
                for b in boxes:
                    t0 = time.perf_counter()
                    r = evaluate(case, seed, boxes=b, cache=args.cache, fresh=args.fresh and b == boxes[0])
                    r["seconds"]["total"] = round(time.perf_counter() - t0, 2)
                    results.append(r)
                    brief = {k: r[k] for k in ("case", "seed", "boxes", "marked", "relies", "flagged")}
                    brief |= {k: r["against_marked"][k] for k in ("precision", "recall")}
                    brief |= {"false_flag_share": r["false_flag_share"], "seconds": r["seconds"]}
                    print(json.dumps(brief), file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
