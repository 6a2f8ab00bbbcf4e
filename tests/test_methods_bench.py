"""``gradcam-batch bench --methods``: the report has every method, its libraries' rows and the ratios.

Timings are never asserted against the clock; the test checks what the report contains.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradcam_batch.cli import cli

pytest.importorskip("torchvision")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("torchcam")


@pytest.mark.slow  # Score-CAM's 512 masked forwards per image and class, in pytorch-grad-cam: a minute here
def test_bench_methods_report(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "torchvision:resnet18", "--image-size", "32", "--batch-size", "2", "--iters", "1"]
    args += ["--warmup", "0", "--top-k", "2", "--methods", "gradcam,gradcam++,eigencam,scorecam"]
    args += ["--scorecam-batch", "256", "--json", str(out)]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    by_name = {r["contender"]: r for r in data["results"]}
    assert data["config"]["baselines"] == ["inference", "pytorch-grad-cam", "torchcam"]
    for m in ("gradcam", "gradcam++", "eigencam", "scorecam"):
        ours = by_name[f"gradcam-batch[{m}]"]
        assert ours["status"] == "ok" and ours["top_k"] == 2
        assert set(ours["speedup"]) >= {"pytorch-grad-cam"}
        assert by_name[f"pytorch-grad-cam[{m}]"]["status"] == "ok"
    assert by_name["torchcam[eigencam]"]["status"] == "skipped"
    assert "torchcam" in by_name["gradcam-batch[gradcam++]"]["speedup"]
    assert by_name["gradcam-batch[4 methods]"]["status"] == "ok"
    assert "4 methods in one call take" in res.output and "x torchcam" in res.output
