"""The plan resolves everything: ready-made specs, one model load, one Explainer and one trace per process."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
from run_support import bytes_table, model_file, read_output, write_table

from gradcam_batch.engine.job.config import RunConfig
from gradcam_batch.engine.job.local import prepare


def _config(tmp_path, **kw) -> RunConfig:
    inp = write_table(tmp_path / "in" / "x.parquet", bytes_table(10), row_group_size=4)
    kw = {"resize": 32, "crop": 32, "batch_size": 4, "top_k": 2} | kw
    return RunConfig(inputs=[str(inp)], output=str(tmp_path / "out"), model=f"{model_file(tmp_path)}:make", **kw)


class _Counts:
    def __init__(self, monkeypatch):
        from gradcam_batch.engine.explain import explainer
        from gradcam_batch.engine.models import loader

        self.loads = self.explainers = self.traces = 0
        real_load, real_split, real_init = loader.load_model, explainer.split_at, explainer.Explainer.__init__

        def load(*a, **k):
            self.loads += 1
            return real_load(*a, **k)

        def split(*a, **k):
            self.traces += 1
            return real_split(*a, **k)

        def init(obj, *a, **k):
            self.explainers += 1
            real_init(obj, *a, **k)

        monkeypatch.setattr(loader, "load_model", load)
        monkeypatch.setattr(explainer, "split_at", split)
        monkeypatch.setattr(explainer.Explainer, "__init__", init)


def test_a_local_run_loads_the_model_once_and_builds_one_explainer_that_traces_once(tmp_path, monkeypatch):
    counts = _Counts(monkeypatch)
    summary = prepare(_config(tmp_path, method="gradcam,scorecam", metrics=("deletion",), metrics_steps=2)).run()
    assert summary["images"] == 10
    assert (counts.loads, counts.explainers, counts.traces) == (1, 1, 1)


def _decoded_unit(plan):
    """The first unit's rows as the Ray runner's decode stage hands them to an actor."""
    from gradcam_batch.engine.job.ray_runner import decode_rows, read_tasks, read_units

    rows = next(read_units(pa.Table.from_pylist(read_tasks(plan, [0])), plan=plan))
    return decode_rows(rows, plan=plan, cpus=1)


def test_a_ray_actor_builds_its_own_model_and_explainer_once(tmp_path, monkeypatch):
    from gradcam_batch.engine.job.plan import build_plan
    from gradcam_batch.engine.job.ray_runner import ExplainActor

    plan = build_plan(_config(tmp_path), device="cpu")
    decoded = _decoded_unit(plan)
    counts = _Counts(monkeypatch)
    actor = ExplainActor(plan, tag_rows=False)
    for _ in range(3):
        actor(decoded)
    assert (counts.loads, counts.explainers, counts.traces) == (1, 1, 1)


def test_after_the_plan_nothing_reads_the_raw_config(tmp_path):
    """The batch step and both runners' stages read the plan's specs: a plan without its config runs."""
    from gradcam_batch.engine.job.ray_runner import ExplainActor

    cfg = _config(tmp_path, metrics=("confidence",), box_column=None, keep_columns=("name",), label_column="label",
                  heatmap_size=(8, 8), heatmap_dtype="float16", cam_dtype="float32", guided=True)  # fmt: skip
    job = prepare(cfg)
    job.plan = dataclasses.replace(job.plan, config=None)
    job.step.plan = job.plan
    summary = job.run()
    t = read_output(tmp_path / "out")
    assert summary["images"] == 10 and t.schema.field("heatmap").type.value_type.bit_width == 16
    assert {"name", "label", "confidence_drop", "guided"} <= set(t.column_names)
    out = ExplainActor(job.plan, tag_rows=False)(_decoded_unit(job.plan))
    assert out.schema.equals(job.plan.schema) and set(out["id"].to_pylist()) == {f"x.parquet:{i}" for i in range(4)}


def test_the_probe_sets_up_the_explainer_without_compiling_or_score_cam(monkeypatch):
    """The plan's probe is the run's own Explainer: set up once, but the first compiled call is a real batch's."""
    import torch

    from gradcam_batch import Explainer
    from gradcam_batch.engine.explain import compiled, explainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()  # fmt: skip
    compiled_calls, masked = [], []
    monkeypatch.setattr(
        compiled.CompiledBackbone, "__call__", lambda self, *a: compiled_calls.append(1) or self.eager(*a)
    )
    real = explainer.scorecam_weights
    monkeypatch.setattr(explainer, "scorecam_weights", lambda *a, **k: masked.append(1) or real(*a, **k))
    exp = Explainer(model, method=["scorecam", "gradcam++"], compile=True, guided=True)
    first = exp.probe(torch.zeros(1, 3, 8, 8))
    assert first.method == "gradcam++" and first.guided is None and exp.target_layer == "1"
    assert compiled_calls == [] and masked == []
    out = exp(torch.randn(2, 3, 8, 8))
    assert set(out) == {"scorecam", "gradcam++"} and out["scorecam"].guided is not None
    assert compiled_calls and masked == [1]  # the backbone, and Score-CAM's masked forwards through it
