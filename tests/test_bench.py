"""``gradcam-batch bench`` and ``gradcam_batch.engine.bench.harness``: options, report, JSON, errors.

Timings are never asserted against the clock; the tests check what the report contains and
that its numbers are consistent with each other.
"""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch
from click.testing import CliRunner

from gradcam_batch.cli import cli
from gradcam_batch.engine.bench import CAPTUM, END_TO_END, INFERENCE, OURS, PYTORCH_GRAD_CAM, TORCHCAM
from gradcam_batch.engine.bench import harness as bench_mod
from gradcam_batch.engine.bench.harness import (
    BenchConfig,
    Contender,
    Result,
    _fill_ratios,
    contenders,
    label,
    load_model,
    make_batches,
    parse_top_ks,
    run_bench,
)

pytest.importorskip("torchvision")

TINY = ["--model", "torchvision:resnet18", "--image-size", "64", "--batch-size", "2", "--iters", "2", "--warmup", "0"]


def _invoke(args):
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def _table_rows(output: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[1] in ("-", *map(str, range(1, 100))) and parts[0] != "contender":
            rows[(parts[0], parts[1])] = parts
    return rows


def test_inference_only_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = _invoke([*TINY, "--top-k", "1,3", "--baselines", "inference", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert set(rows) == {("inference", "-"), ("gradcam-batch", "1"), ("gradcam-batch", "3")}
    assert rows[("inference", "-")][4] == "1.00x"
    assert "layer layer4.1" in res.stdout and "(closed form)" in res.stdout

    data = json.loads(out.read_text())
    assert data["config"]["top_k"] == [1, 3]
    assert data["config"]["baselines"] == ["inference"]
    assert data["target_layer"] == "layer4.1" and data["closed_form"] is True
    assert data["environment"]["device"] == "cpu"
    by_key = {(r["contender"], r["top_k"]): r for r in data["results"]}
    assert set(by_key) == {("inference", None), ("gradcam-batch", 1), ("gradcam-batch", 3)}
    inf = by_key[("inference", None)]
    for r in by_key.values():
        assert r["status"] == "ok"
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["img_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["vs_inference"] == pytest.approx(r["img_per_s"] / inf["img_per_s"])
        # The table shows the same numbers as the JSON.
        row = rows[(r["contender"], "-" if r["top_k"] is None else str(r["top_k"]))]
        assert row[2] == f"{r['img_per_s']:.1f}"
        assert row[4] == f"{r['vs_inference']:.2f}x"
    # No baseline library was asked for, so there is nothing to compare against.
    assert by_key[("gradcam-batch", 1)]["speedup"] == {}


@pytest.mark.slow
def test_all_baselines_with_parity_check(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("captum")
    out = tmp_path / "bench.json"
    args = ["--model", "torchvision:resnet18", "--image-size", "64", "--batch-size", "2", "--iters", "1"]
    res = _invoke([*args, "--warmup", "0", "--top-k", "2", "--check", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert set(rows) == {("inference", "-"), ("gradcam-batch", "2"), ("pytorch-grad-cam", "2"), ("captum", "2")}
    data = json.loads(out.read_text())
    by_key = {(r["contender"], r["top_k"]): r for r in data["results"]}
    ours = by_key[("gradcam-batch", 2)]
    for b in ("pytorch-grad-cam", "captum"):
        assert by_key[(b, 2)]["status"] == "ok"
        assert ours["speedup"][b] == pytest.approx(ours["img_per_s"] / by_key[(b, 2)]["img_per_s"])
    assert [p["baseline"] for p in data["parity"]] == ["pytorch-grad-cam", "captum"]
    for p in data["parity"]:
        assert p["passed"] and p["min_pearson"] >= 0.999 and p["maps"] == 2 * 2
    assert "parity vs pytorch-grad-cam: min Pearson" in res.stdout


def test_missing_baseline_is_reported_as_skipped(monkeypatch, tmp_path):
    real = bench_mod._installed
    monkeypatch.setattr(bench_mod, "_installed", lambda m: m not in ("pytorch_grad_cam", "captum") and real(m))
    out = tmp_path / "bench.json"
    res = _invoke([*TINY, "--iters", "1", "--top-k", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "pytorch-grad-cam (top-1): skipped, not installed (pip install grad-cam)" in res.stdout
    assert "captum (top-1): skipped, not installed (pip install captum)" in res.stdout
    data = json.loads(out.read_text())
    skipped = {r["contender"]: r for r in data["results"] if r["status"] == "skipped"}
    assert set(skipped) == {"pytorch-grad-cam", "captum"}
    assert all(r["img_per_s"] is None for r in skipped.values())


@pytest.mark.slow
def test_vjp_strategies_on_a_nonlinear_head():
    report = run_bench(
        BenchConfig(
            model="torchvision:mobilenet_v3_small",
            batch_size=2,
            image_size=64,
            top_k=(2,),
            iters=1,
            warmup=0,
            baselines=("inference",),
            vjp_strategies=("vmap", "loop", "batched_grad"),
            device="cpu",
        )
    )
    assert report.closed_form is False and report.target_layer == "features.12"
    names = [r.contender for r in report.results]
    assert names == ["inference", "gradcam-batch[vmap]", "gradcam-batch[loop]", "gradcam-batch[batched_grad]"]
    assert all(r.status == "ok" and r.top_k in (None, 2) for r in report.results)
    table = report.format_table()
    assert "gradcam-batch[batched_grad]" in table and "(closed form)" not in table


def test_compile_adds_a_compiled_inference_row(monkeypatch, tmp_path):
    compiled = []

    def fake_compile(model, **kwargs):  # inductor is slow on CPU; the wiring is what is tested
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "bench.json"
    res = _invoke([*TINY, "--iters", "1", "--top-k", "1", "--baselines", "inference", "--compile", "--json", str(out)])
    assert res.exit_code == 0, res.output
    # The whole model for the limit, the FX backbone for the engine.
    assert sorted(compiled) == ["Backbone", "ResNet"]
    data = json.loads(out.read_text())
    assert data["config"]["compile"] is True
    names = [r["contender"] for r in data["results"]]
    assert names == ["inference", "inference[compiled]", "gradcam-batch"]
    rows = _table_rows(res.stdout)
    assert rows[("inference", "-")][4] == "1.00x" and ("inference[compiled]", "-") in rows


def test_a_failing_contender_is_reported_not_fatal(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no bf16 here\nsecond line")

    from gradcam_batch.engine.bench import methods as libraries

    monkeypatch.setitem(libraries.LIBRARIES, CAPTUM, (libraries.LIBRARIES[CAPTUM][0], broken))
    monkeypatch.setattr(bench_mod, "_installed", lambda m: True)
    cfg = BenchConfig(
        model="torchvision:resnet18",
        batch_size=1,
        image_size=64,
        top_k=(1,),
        iters=1,
        warmup=0,
        baselines=("inference", "captum"),
        device="cpu",
    )
    report = run_bench(cfg)
    failed = report.result("captum", 1)
    assert failed.status == "failed" and failed.reason == "RuntimeError: no bf16 here"
    assert "captum (top-1): failed, RuntimeError: no bf16 here" in report.format_table()
    assert report.result("gradcam-batch", 1).status == "ok"


def test_end_to_end_runs_the_pipeline_on_generated_jpegs(tmp_path):
    pytest.importorskip("gradcam_batch.engine.job.local")
    out = tmp_path / "bench.json"
    args = [*TINY, "--iters", "1", "--top-k", "1", "--baselines", "inference", "--end-to-end", "--e2e-images", "5"]
    res = _invoke([*args, "--json", str(out)])
    assert res.exit_code == 0, res.output
    row = next(line.split() for line in res.stdout.splitlines() if line.startswith("gradcam-batch run"))
    assert row[2] == "1"  # top-k
    data = json.loads(out.read_text())
    by_key = {(r["contender"], r["top_k"]): r for r in data["results"]}
    e2e = by_key[("gradcam-batch run", 1)]
    assert e2e["status"] == "ok", e2e["reason"]
    assert e2e["img_per_s"] == pytest.approx(5 / e2e["times_s"][0], rel=0.05)
    assert e2e["vs_inference"] == pytest.approx(e2e["img_per_s"] / by_key[("inference", None)]["img_per_s"])
    assert data["config"]["end_to_end"] is True and data["config"]["e2e_images"] == 5


def test_jpeg_dataset(tmp_path):
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    path = bench_mod.write_jpeg_dataset(str(tmp_path / "x.parquet"), 3, 40, seed=1, row_group_rows=2)
    table = pq.read_table(path)
    assert table.column_names == ["id", "image"] and table.num_rows == 3
    assert pq.ParquetFile(path).num_row_groups == 2
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    assert all(im.format == "JPEG" and im.size == (40, 40) for im in images)
    pixels = [torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32)) for im in images]
    assert all(float(p.std()) > 1.0 for p in pixels)  # not flat
    assert not torch.equal(pixels[0], pixels[1])


def test_weights_file_is_loaded(tmp_path):
    torch.manual_seed(3)
    src = load_model("torchvision:resnet18")
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    model = load_model("torchvision:resnet18", str(path))
    assert torch.equal(model.fc.weight, src.fc.weight)
    res = _invoke([*TINY, "--iters", "1", "--top-k", "1", "--baselines", "inference", "--weights", str(path)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet50"], "cannot parse model spec 'resnet50'"),
        (["--model", "torchvision:nonet"], "unknown torchvision model 'nonet'"),
        (["--top-k", "0"], "top-k values must be positive"),
        (["--top-k", "1,x"], "comma-separated list of positive integers"),
        (["--baselines", "inference,lime"], "unknown baseline 'lime'"),
        (["--vjp-strategy", "fast"], "unknown vjp strategy 'fast'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
        (["--iters", "0"], "iters must be at least 1"),
        (["--e2e-images", "0"], "e2e_images must be positive"),
        (["--precision", "fp8"], "'fp8' is not one of"),
        (["--weights", "does-not-exist.pt"], "weights file not found"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, message):
    res = CliRunner().invoke(cli, ["bench", *TINY, *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], res.output


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    res = CliRunner().invoke(cli, ["bench", *TINY, "--weights", str(path)])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "do not match the model" in errors[0]


def test_top_k_above_the_class_count_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["bench", *TINY, "--top-k", "1001", "--baselines", "inference"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "top-k 1001 exceeds the model's 1000 classes" in res.output


def test_helpers():
    assert parse_top_ks("5, 1,5") == (5, 1)
    assert parse_top_ks([3]) == (3,)
    cfg = BenchConfig(batch_size=3, image_size=16, n_batches=3)
    batches = make_batches(cfg, torch.device("cpu"))
    assert len(batches) == 3 and all(b.shape == (3, 3, 16, 16) and b.dtype == torch.float32 for b in batches)
    # Random, not zeros, and different from batch to batch.
    assert all(float(b.std()) > 0.5 for b in batches)
    assert not torch.equal(batches[0], batches[1])
    # The same seed gives the same batches.
    assert torch.equal(make_batches(cfg, torch.device("cpu"))[2], batches[2])


def _result(key: Contender, img_per_s: float | None, status: str = "ok") -> Result:
    # The labels are deliberately not the table's: ratios must come from the keys alone.
    return Result(key, f"label-{id(key)}", status, img_per_s=img_per_s)


def test_ratios_are_looked_up_by_contender_key():
    gradcam, eigencam = ("gradcam",), ("eigencam",)
    inf = _result(Contender(INFERENCE), 100.0)
    inf_compiled = _result(Contender(INFERENCE, compile=True), 400.0)
    ours1 = _result(Contender(OURS, gradcam, 1, vjp_strategy="vmap"), 95.0)
    pgc1 = _result(Contender(PYTORCH_GRAD_CAM, gradcam, 1), 20.0)
    captum1 = _result(Contender(CAPTUM, gradcam, 1), None, "failed")
    ours5 = _result(Contender(OURS, gradcam, 5, vjp_strategy="vmap"), 90.0)
    captum5 = _result(Contender(CAPTUM, gradcam, 5), 15.0)
    e2e5 = _result(Contender(END_TO_END, gradcam, 5), 30.0)
    # --methods: each method against the same method of each library, the list against none.
    eig = _result(Contender(OURS, eigencam, 5, vjp_strategy="vmap"), 60.0)
    pgc_eig = _result(Contender(PYTORCH_GRAD_CAM, eigencam, 5), 12.0)
    both = _result(Contender(OURS, ("gradcam", "eigencam"), 5, vjp_strategy="vmap"), 50.0)
    results = [inf, inf_compiled, ours1, pgc1, captum1, ours5, captum5, e2e5, eig, pgc_eig, both]
    _fill_ratios(results)
    assert ours1.vs_inference == pytest.approx(0.95)  # against eager inference, not the compiled row
    assert inf_compiled.vs_inference == pytest.approx(4.0)
    assert ours1.speedup == {PYTORCH_GRAD_CAM: pytest.approx(4.75)}
    assert pgc1.vs_inference == pytest.approx(0.2) and pgc1.speedup == {}
    assert ours5.speedup == {CAPTUM: pytest.approx(6.0)}
    assert e2e5.speedup == {CAPTUM: pytest.approx(2.0)}
    assert captum1.vs_inference is None
    assert eig.speedup == {PYTORCH_GRAD_CAM: pytest.approx(5.0)}
    assert both.speedup == {}


def test_one_builder_makes_every_contender_as_data():
    plain = BenchConfig(top_k=(1, 5), baselines=(INFERENCE, PYTORCH_GRAD_CAM, CAPTUM), compile=True, end_to_end=True)
    keys = contenders(plain)
    gradcam = ("gradcam",)
    assert keys == [
        Contender(INFERENCE),
        Contender(INFERENCE, compile=True),
        Contender(OURS, gradcam, 1, compile=True, vjp_strategy="vmap"),
        Contender(PYTORCH_GRAD_CAM, gradcam, 1),
        Contender(CAPTUM, gradcam, 1),
        Contender(OURS, gradcam, 5, compile=True, vjp_strategy="vmap"),
        Contender(PYTORCH_GRAD_CAM, gradcam, 5),
        Contender(CAPTUM, gradcam, 5),
        Contender(END_TO_END, gradcam, 1, compile=True),
        Contender(END_TO_END, gradcam, 5, compile=True),
    ]
    labels = [label(k, plain) for k in keys]
    assert labels[:5] == ["inference", "inference[compiled]", "gradcam-batch", "pytorch-grad-cam", "captum"]
    assert labels[-1] == "gradcam-batch run"
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys[0].library = OURS  # type: ignore[misc]

    methods = BenchConfig(
        top_k=(2,), methods=("gradcam", "eigencam"), baselines=(PYTORCH_GRAD_CAM, TORCHCAM), precision="bf16"
    )
    keys = contenders(methods)
    assert all(k.precision == "bf16" and k.top_k == 2 for k in keys)
    assert [label(k, methods) for k in keys] == [
        "gradcam-batch[gradcam]",
        "gradcam-batch[eigencam]",
        "gradcam-batch[2 methods]",
        "pytorch-grad-cam[gradcam]",
        "pytorch-grad-cam[eigencam]",
        "torchcam[gradcam]",
        "torchcam[eigencam]",
    ]
    assert keys[2].methods == ("gradcam", "eigencam")

    strategies = BenchConfig(top_k=(1,), baselines=(INFERENCE,), vjp_strategies=("vmap", "loop"))
    assert [label(k, strategies) for k in contenders(strategies)] == [
        "inference",
        "gradcam-batch[vmap]",
        "gradcam-batch[loop]",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": "1,5"}, "top_k must be a tuple of positive integers, each once, got '1,5'"),
        ({"top_k": (0,)}, "top_k must be a tuple of positive integers, each once, got (0,)"),
        ({"batch_size": "16"}, "batch_size must be an integer, got '16'"),
        ({"batch_size": 0}, "batch size must be positive, got 0"),
        ({"iters": 2.5}, "iters must be an integer, got 2.5"),
        ({"compile": "yes"}, "compile must be True or False, got 'yes'"),
        ({"baselines": "inference"}, "baselines must be a tuple of names, got 'inference'"),
        ({"baselines": ("inference", "lime")}, "unknown baseline 'lime'"),
        ({"vjp_strategies": "vmap"}, "vjp_strategies must be a tuple of names, got 'vmap'"),
        ({"methods": "gradcam"}, "methods must be a tuple of names, got 'gradcam'"),
        ({"methods": ("nope",)}, "unknown method 'nope'"),
        ({"methods": ("GradCAM",)}, "methods must be unique lower-case names, got ('GradCAM',)"),
        ({"device": "tpu"}, "unknown device 'tpu'; expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_validate_gives_one_clear_error_and_converts_nothing(change, message):
    cfg = BenchConfig(**change)
    before = dataclasses.asdict(cfg)
    with pytest.raises(ValueError) as info:
        cfg.validate()
    assert message in str(info.value) and "\n" not in str(info.value)
    assert dataclasses.asdict(cfg) == before


def test_the_command_line_text_is_parsed_once_into_typed_fields():
    cfg = BenchConfig.parse(top_k="5, 1,5", baselines=None, vjp_strategies="vmap,loop", methods="GradCAM,eigencam")
    assert cfg.top_k == (5, 1) and cfg.vjp_strategies == ("vmap", "loop")
    assert cfg.methods == ("gradcam", "eigencam")
    assert cfg.baselines == ("inference", "pytorch-grad-cam", "torchcam")  # the --methods default
    cfg.validate()
    assert BenchConfig.parse(top_k="1", baselines=None, vjp_strategies="vmap", methods=None).baselines == (
        "inference",
        "pytorch-grad-cam",
        "captum",
    )


def test_bench_and_run_give_the_same_device_error(tmp_path):
    from gradcam_batch.engine.demo import assets

    bench = CliRunner().invoke(cli, ["bench", *TINY, "--device", "tpu"])
    args = ["run", str(assets.SAMPLE), "-o", str(tmp_path / "o"), "--model", "torchvision:resnet18"]
    run = CliRunner().invoke(cli, [*args, "--device", "tpu"])
    errors = [[line for line in r.output.splitlines() if line.startswith("Error:")] for r in (bench, run)]
    assert bench.exit_code == run.exit_code == 2, (bench.output, run.output)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert "unknown device 'tpu'" in errors[0][0]


def test_bench_has_help():
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0
    for opt in ("--model", "--top-k", "--precision", "--baselines", "--json", "--check", "--iters", "--warmup"):
        assert opt in res.output


# -- bench --task segmentation ------------------------------------------------------------------------------

SEG = ["--task", "segmentation", "--image-size", "32", "--batch-size", "1", "--iters", "1", "--warmup", "0"]


def test_segmentation_bench_times_the_top_k_regions_against_inference_and_pytorch_grad_cam(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("pytorch_grad_cam")
    out = tmp_path / "seg.json"
    res = _invoke([*SEG, "--top-k", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["model"] == "torchvision:lraspp_mobilenet_v3_large" and data["top_k"] == 2
    assert data["layer"] == "backbone.16.2" and data["varied"] is True
    assert set(data["median_s"]) == {"inference", "gradcam-batch top-2", "pytorch-grad-cam"}
    assert all(v > 0 for v in data["median_s"].values())
    assert 1 <= data["classes_per_image"] <= 2
    assert "pytorch-grad-cam / gradcam-batch" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "1,3"], "one positive integer"),
        (["--baselines", "captum"], "unknown baseline 'captum'"),
        (["--methods", "layercam"], "--methods applies to classifiers"),
        (["--model", "torchvision:resnet18", "--baselines", "inference"], "(B, C, H, W) logits"),
    ],
)
def test_segmentation_bench_bad_options_exit_2_with_one_line(args, message):
    res = CliRunner().invoke(cli, ["bench", *SEG, *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
