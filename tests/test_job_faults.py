"""The faults a batch user meets: a second run on one output, changed files, wide top-k, failures
mid-run and the advice they get, non-finite results, ONNX input sizes, a torch-free --help."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from run_support import base_args, bytes_table, invoke, model_file, png_bytes, read_output, write_table

from gradcam_batch.engine.job.config import RunConfig, RunFailed
from gradcam_batch.engine.job.local import prepare
from gradcam_batch.engine.job.plan import build_plan
from gradcam_batch.engine.job.preprocess import Preprocess
from gradcam_batch.engine.job.sink import OutputLock

REPO = Path(__file__).resolve().parents[1]

# Models that fail in chosen ways, as factory files (the CLI loads them like any user's model).
FAULTY = textwrap.dedent(
    """
    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, num_classes)
            self.calls = 0

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))


    class FailsOnBright(Net):
        # Raises on a batch holding an image with a bright top-left pixel (the last unit's).
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def forward(self, x):
            if bool((x[:, 0, 0, 0] > 1.5).any()):
                raise self.exc
            return super().forward(x)


    class NaNForBright(Net):
        # Scores turn NaN for images whose top-left pixel is bright: a stand-in for an fp16 overflow.
        def forward(self, x):
            y = super().forward(x)
            bright = x[:, 0, 0, 0] > 1.5
            return torch.where(bright[:, None], torch.full_like(y, float("nan")), y)


    def deterministic():
        torch.manual_seed(0)
        return FailsOnBright(ValueError("shape mismatch in layer fc"))


    def transient():
        torch.manual_seed(0)
        return FailsOnBright(OSError(28, "No space left on device"))


    def nan_for_bright():
        torch.manual_seed(0)
        return NaNForBright()


    class HugeForBright(Net):
        # Scores and cams 1e9 times larger for bright images: finite in float32, past float16's 65504.
        def forward(self, x):
            a = self.features(x)
            bright = (x[:, 0, 0, 0] > 1.5).float()[:, None, None, None]
            return self.fc((a * (1 + bright * 1e9)).mean(dim=(2, 3)))


    def huge_for_bright():
        torch.manual_seed(0)
        return HugeForBright()


    def thousand():
        torch.manual_seed(0)
        return Net(num_classes=1000)
    """
)


def _faulty(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "faulty.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAULTY)
    return path


def _args(tmp_path: Path, out: Path, factory: str) -> list[str]:
    return ["-o", str(out), "--model", f"{_faulty(tmp_path)}:{factory}", "--resize", "32", "--crop", "32",
            "--batch-size", "4", "--no-progress"]  # fmt: skip


# -- one run at a time ------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_exits_2_at_once(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        res = invoke(["run", str(inp), *base_args(tmp_path, out)])
    assert res.exit_code == 2
    line = res.output.strip()
    assert line == f"Error: {out} is in use by another gradcam-batch run (pid {os.getpid()} on {socket.gethostname()})"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert invoke(["run", str(inp), *base_args(tmp_path, out)]).exit_code == 0  # released: runs


@pytest.mark.slow
def test_two_processes_on_one_output(tmp_path):
    """A real second process while the first is writing: it stops, the first finishes untouched."""
    data = bytes_table(300)
    inp = write_table(tmp_path / "in" / "slow.parquet", data, row_group_size=10)
    out = tmp_path / "out"
    args = [str(inp), *base_args(tmp_path, out, "make_slow"), "--rows-per-file", "10", "--batch-size", "5"]
    first = subprocess.Popen([sys.executable, "-m", "gradcam_batch", "run", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            lock = out / ".lock"
            if lock.exists() and lock.read_text().strip():
                break
            time.sleep(0.01)
        assert first.poll() is None, f"the first run ended too soon: {first.stderr.read()[-2000:]}"
        second = subprocess.run([sys.executable, "-m", "gradcam_batch", "run", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"in use by another gradcam-batch run (pid {first.pid} on" in second.stderr
        assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    ids = read_output(out)["id"].to_pylist()
    assert sorted(ids) == sorted(f"slow.parquet:{i}" for i in range(300))


# -- the fingerprint counts by content --------------------------------------------------------------


def test_changed_weights_of_the_same_size_need_overwrite(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    out = tmp_path / "out"
    exec_ns: dict = {}
    exec(model_file(tmp_path).read_text(), exec_ns)
    weights = tmp_path / "w.pt"
    torch.save(exec_ns["make"]().state_dict(), weights)
    args = ["run", str(inp), *base_args(tmp_path, out), "--weights", str(weights)]
    assert invoke(args).exit_code == 0
    size = weights.stat().st_size
    sd = torch.load(weights, weights_only=True)
    sd["fc.bias"] += 1.0
    torch.save(sd, weights)
    assert weights.stat().st_size == size  # only the content changed
    res = invoke(args)
    assert res.exit_code == 2 and "other settings, model or inputs" in res.output


def test_rewritten_input_and_device_jpeg_change_the_fingerprint(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(4))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make",
                    resize=32, crop=32)  # fmt: skip
    base = build_plan(cfg).fingerprint
    assert build_plan(cfg).fingerprint == base  # stable
    pytest.importorskip("torchvision")
    from dataclasses import replace

    assert build_plan(replace(cfg, device_jpeg=True)).fingerprint != base
    assert build_plan(replace(cfg, cam_dtype="float32")).fingerprint != base
    assert build_plan(replace(cfg, batch_size=3, workers=1)).fingerprint == base  # speed only
    st = inp.stat()
    os.utime(inp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place, same size
    assert build_plan(cfg).fingerprint != base


def test_the_python_api_takes_an_int_crop(tmp_path):
    assert Preprocess(resize=256, crop=224).out_size == (224, 224)
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    job = prepare(RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make",
                            resize=40, crop=32))  # fmt: skip
    summary = job.run()
    assert summary["images"] == 3 and summary["errors"] == 0


# -- failures mid-run -----------------------------------------------------------------------------------


def test_top_k_150_of_1000_classes(tmp_path):
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *_args(tmp_path, out, "thousand"), "--top-k", "150", "--heatmap-size", "none"])
    assert res.exit_code == 0, res.output
    t = read_output(out)
    assert t.num_rows == 450 and t["class_rank"].to_pylist()[:150] == list(range(150))
    res = invoke(["run", str(inp), *_args(tmp_path, tmp_path / "o2", "thousand"), "--top-k", "1001"])
    assert res.exit_code == 2 and "exceeds the number of classes of the model (1000)" in res.output
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    ("factory", "advice"),
    [
        ("deterministic", "a rerun fails the same way"),
        ("transient", "rerun the same command to resume"),  # an OSError: a full disk, say
    ],
)
def test_advice_fits_the_failure(tmp_path, factory, advice):
    inp = write_table(tmp_path / "in.parquet", _brighten(bytes_table(12), [8]), row_group_size=4)
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *_args(tmp_path, out, factory), "--rows-per-file", "4"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the run stopped: ")
    assert advice in lines[0] and "Traceback" not in res.output
    other = "rerun the same command" if factory == "deterministic" else "fails the same way"
    assert other not in lines[0]
    assert read_output(out).num_rows == 4  # the first batch's unit is committed and kept


def _brighten(table: pa.Table, rows: list[int]) -> pa.Table:
    """The images of ``rows`` with a white top-left pixel (normalized, well above 1.5)."""
    images = table["image"].to_pylist()
    for i in rows:
        arr = np.asarray(Image.open(io.BytesIO(images[i])).convert("RGB")).copy()
        arr[0, 0] = 255
        images[i] = png_bytes(arr)
    return table.set_column(0, "image", pa.array(images, pa.binary()))


def test_non_finite_scores_become_error_rows(tmp_path):
    n = 8
    t = _brighten(bytes_table(n), [2, 5])
    inp = write_table(tmp_path / "in.parquet", t)
    out = tmp_path / "out"
    res = invoke(["run", str(inp), *_args(tmp_path, out, "nan_for_bright"), "--top-k", "2"])
    assert res.exit_code == 0, res.output
    got = read_output(out)
    err = got.filter(pa.compute.equal(got["status"], "error"))
    assert err["id"].to_pylist() == ["in.parquet:2", "in.parquet:5"]
    assert all("non-finite" in e for e in err["error"].to_pylist())
    assert err["heatmap"].null_count == 2 and err["peak_y"].null_count == 2
    ok = got.filter(pa.compute.equal(got["status"], "ok"))
    assert ok.num_rows == 2 * (n - 2) and np.isfinite(ok["score"].to_numpy()).all()


def test_non_finite_advice_follows_the_precision(tmp_path):
    t = _brighten(bytes_table(4), [1])
    inp = write_table(tmp_path / "in.parquet", t)
    res = invoke(["run", str(inp), *_args(tmp_path, tmp_path / "fp32", "nan_for_bright")])
    assert res.exit_code == 0, res.output
    (fp32,) = [e for e in read_output(tmp_path / "fp32")["error"].to_pylist() if e]
    assert fp32.startswith("non-finite scores") and "fp32" in fp32 and "--precision fp32" not in fp32
    res = invoke(["run", str(inp), *_args(tmp_path, tmp_path / "bf16", "nan_for_bright"), "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    (bf16,) = [e for e in read_output(tmp_path / "bf16")["error"].to_pylist() if e]
    assert bf16.startswith("non-finite scores") and "--precision fp32" in bf16


def test_a_cam_past_float16s_range_is_an_error_row_or_stored_as_float32(tmp_path):
    t = _brighten(bytes_table(4), [2])
    inp = write_table(tmp_path / "in.parquet", t)
    res = invoke(["run", str(inp), *_args(tmp_path, tmp_path / "f16", "huge_for_bright")])
    assert res.exit_code == 0, res.output
    got = read_output(tmp_path / "f16")
    assert got["status"].to_pylist() == ["ok", "ok", "error", "ok"]
    error = got["error"].to_pylist()[2]
    assert "65504" in error and "--cam-dtype float32" in error
    ok = got.filter(pa.compute.equal(got["status"], "ok"))
    assert np.isfinite(ok["cam"].combine_chunks().to_numpy_ndarray()).all()
    res = invoke(["run", str(inp), *_args(tmp_path, tmp_path / "f32", "huge_for_bright"), "--cam-dtype", "float32"])
    assert res.exit_code == 0, res.output
    got = read_output(tmp_path / "f32")
    assert got["status"].to_pylist() == ["ok"] * 4
    assert got.schema.field("cam").type.value_type == pa.float32()
    cams = got["cam"].combine_chunks().to_numpy_ndarray()
    assert np.isfinite(cams).all() and cams[2].max() > 65504
    np.testing.assert_allclose(cams[2].max(), got["cam_max"].to_numpy()[2], rtol=1e-5)


# -- commands ------------------------------------------------------------------------------------------


def test_layers_reads_an_onnx_models_static_size(tmp_path):
    pytest.importorskip("onnxruntime")
    exec_ns: dict = {}
    exec(model_file(tmp_path).read_text(), exec_ns)
    model = exec_ns["make"]().eval()
    path = tmp_path / "m96.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 96, 96),), str(path), dynamo=False, opset_version=17)
    res = invoke(["layers", "--model", str(path)])
    assert res.exit_code == 0, res.output
    assert "auto-detected:" in res.output and "48x48" in res.output  # the stride-2 conv's output at 96
    res = invoke(["layers", "--model", str(path), "--input-size", "224"])
    assert res.exit_code != 0 and "takes 96x96 inputs only" in res.output


def test_help_does_not_import_torch():
    code = "import sys\nfrom gradcam_batch.cli import cli\ntry:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules)\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_run_failed_carries_its_advice():
    assert RunFailed("x", transient=True).advice == "rerun the same command to resume"
    assert "fails the same way" in RunFailed("x", transient=False).advice


# -- host syncs: what the CPU can check, and the CUDA checks beside them ---------------------------------


def _dropping_label_table(n: int) -> pa.Table:
    """A label-only selection drops the image whose label is out of range (row 11) on the device side."""
    t = bytes_table(n)
    labels = t["label"].to_pylist()
    labels[11] = 99
    return t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))


def test_host_data_reaches_the_device_through_one_pinned_non_blocking_copy():
    from unittest import mock

    from gradcam_batch.engine.job.step import to_device

    t = mock.MagicMock()
    cuda = torch.device("cuda", 0)
    assert to_device(t, cuda) is t.pin_memory.return_value.to.return_value
    t.pin_memory.assert_called_once_with()
    t.pin_memory.return_value.to.assert_called_once_with(cuda, non_blocking=True)
    cpu = torch.arange(3)
    assert to_device(cpu, torch.device("cpu")) is cpu


def test_a_batch_that_drops_an_image_copies_its_index_through_to_device(tmp_path, monkeypatch):
    from gradcam_batch.engine.job import step as step_module
    from gradcam_batch.engine.job.source import ParquetSource

    inp = write_table(tmp_path / "in.parquet", _dropping_label_table(16))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make_mlp",
                    resize=32, crop=32, label_column="label")  # fmt: skip
    plan = build_plan(cfg)
    step = step_module.BatchExplainer(plan, "cpu")
    source = ParquetSource(plan.files, plan.image_column, plan.row_columns, plan.prep, batch_size=8)
    batch = list(source.batches(plan.units))[1]
    copied: list[torch.Tensor] = []
    real = step_module.to_device

    def spy(t, device):
        copied.append(t)
        return real(t, device)

    monkeypatch.setattr(step_module, "to_device", spy)
    out = step.finish(step.launch(batch))
    assert out.errors == 1 and out.table["status"].to_pylist()[3] == "error"
    kept = [i for i in range(8) if i != 3]
    assert any(t.dtype == torch.int64 and t.tolist() == kept for t in copied)  # the index of the kept images
    assert any(t.dtype == torch.uint8 and t.shape[0] == 8 for t in copied)  # the images


# -- CUDA: what the CPU cannot show -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_batch_step_does_not_sync_the_host(tmp_path):
    from gradcam_batch.engine.job.source import ParquetSource
    from gradcam_batch.engine.job.step import BatchExplainer

    inp = write_table(tmp_path / "in.parquet", bytes_table(16))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make_mlp",
                    resize=32, crop=32, top_k=2, label_column="label", device="cuda")  # fmt: skip
    plan = build_plan(cfg)
    step = BatchExplainer(plan, "cuda")
    source = ParquetSource(plan.files, plan.image_column, plan.row_columns, plan.prep, batch_size=8)
    batches = list(source.batches(plan.units))
    step(batches[0])  # warm-up: lazy set-up may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = step.launch(batches[1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.finish(pending).table.num_rows >= 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_that_drops_an_image_does_not_sync_the_host(tmp_path):
    from gradcam_batch.engine.job.source import ParquetSource
    from gradcam_batch.engine.job.step import BatchExplainer

    inp = write_table(tmp_path / "in.parquet", _dropping_label_table(16))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make_mlp",
                    resize=32, crop=32, label_column="label", device="cuda")  # fmt: skip
    plan = build_plan(cfg)
    step = BatchExplainer(plan, "cuda")
    source = ParquetSource(plan.files, plan.image_column, plan.row_columns, plan.prep, batch_size=8)
    batches = list(source.batches(plan.units))
    step(batches[0])  # warm-up: lazy set-up may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = step.launch(batches[1])  # row 11 (the batch's 4th) is dropped on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = step.finish(pending)
    assert out.errors == 1 and out.table.num_rows == 8


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_second_device_records_its_own_event(tmp_path):
    from gradcam_batch.engine.job.source import ParquetSource
    from gradcam_batch.engine.job.step import BatchExplainer

    inp = write_table(tmp_path / "in.parquet", bytes_table(8))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"{model_file(tmp_path)}:make",
                    resize=32, crop=32, device="cuda:1")  # fmt: skip
    plan = build_plan(cfg)
    step = BatchExplainer(plan, "cuda:1")
    source = ParquetSource(plan.files, plan.image_column, plan.row_columns, plan.prep, batch_size=8)
    pending = step.launch(next(iter(source.batches(plan.units))))
    assert pending.event is not None and pending.result.cams.device.type == "cpu"
    out = step.finish(pending)
    ref = BatchExplainer(plan, "cpu")(next(iter(source.batches(plan.units))))
    np.testing.assert_allclose(out.table["score"].to_numpy(), ref.table["score"].to_numpy(), rtol=1e-4, atol=1e-4)
