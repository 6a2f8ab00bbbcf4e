"""What identifies a run's model: random initialization seeded with 0 (the caller's RNG left alone), and
a fingerprint that sees the loaded weights whatever their source (a hash of the state dict), the
strictness of their loading, and a worker that loads other weights than the plan's."""

from __future__ import annotations

import dataclasses
import textwrap
import warnings

import numpy as np
import pytest
import torch
from run_support import base_args, bytes_table, invoke, model_file, read_output, write_table

from gradcam_batch.engine.job.config import RunConfig, RunSetupError
from gradcam_batch.engine.job.plan import build_plan
from gradcam_batch.engine.models.loader import load_model
from gradcam_batch.engine.models.weights import state_digest

# A factory that draws its weights unseeded, and one whose weights come from a file beside it that
# the command line never names.
FACTORIES = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self, num_classes=5):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))


    def unseeded(num_classes=5):
        return Net(num_classes)


    def side_file(num_classes=5):
        net = Net(num_classes)
        net.load_state_dict(torch.load(Path(__file__).parent / "side.pt", weights_only=True))
        return net
    """
)


def _factories(tmp_path):
    path = tmp_path / "models" / "factories.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FACTORIES)
    return path


def _config(tmp_path, model: str, **kw) -> RunConfig:
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    return RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=model, resize=32, crop=32, **kw)


def _random_weight_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "random weights" in str(w.message)]


def test_random_init_is_seeded_and_leaves_the_callers_rng_alone():
    pytest.importorskip("torchvision")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = load_model("torchvision:squeezenet1_1", num_classes=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's next draw is what it would have been
    b = load_model("torchvision:squeezenet1_1", num_classes=5)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert state_digest(a) == state_digest(b)


def test_a_plan_warns_of_random_weights_once_and_not_with_a_weights_file(tmp_path):
    pytest.importorskip("torchvision")
    cfg = _config(tmp_path, "torchvision:squeezenet1_1", num_classes=5, heatmap_size=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_plan(cfg)
    messages = _random_weight_warnings(record)
    assert len(messages) == 1 and "torchvision:squeezenet1_1" in messages[0] and "seed 0" in messages[0]
    assert "\n" not in messages[0]
    weights = tmp_path / "w.pt"
    torch.save(load_model("torchvision:squeezenet1_1", num_classes=5).state_dict(), weights)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_plan(dataclasses.replace(cfg, weights=str(weights)))
    assert not _random_weight_warnings(record)


def test_a_factory_is_built_seeded_too(tmp_path):
    spec = f"{_factories(tmp_path)}:unseeded"
    torch.manual_seed(1)
    a = load_model(spec)
    torch.manual_seed(2)
    b = load_model(spec)
    assert state_digest(a) == state_digest(b)


@pytest.mark.slow
def test_two_random_init_runs_give_the_same_scores_and_resume(tmp_path):
    pytest.importorskip("torchvision")
    inp = write_table(tmp_path / "in.parquet", bytes_table(3))
    common = ["--model", "torchvision:squeezenet1_1", "--num-classes", "5", "--resize", "32", "--crop", "32",
              "--no-progress", "--heatmap-size", "none"]  # fmt: skip
    outs = []
    for name in ("a", "b"):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            res = invoke(["run", str(inp), "-o", str(tmp_path / name), *common])
        assert res.exit_code == 0, res.output
        assert len(_random_weight_warnings(record)) == 1  # once per run
        outs.append(read_output(tmp_path / name))
    np.testing.assert_array_equal(outs[0]["score"].to_numpy(), outs[1]["score"].to_numpy())
    res = invoke(["run", str(inp), "-o", str(tmp_path / "a"), *common])
    assert res.exit_code == 0 and "complete already" in res.output


def test_fingerprint_sees_weights_whatever_their_source(tmp_path):
    path = _factories(tmp_path)
    torch.manual_seed(0)
    net = load_model(f"{path}:unseeded")
    side = path.parent / "side.pt"
    torch.save(net.state_dict(), side)
    cfg = _config(tmp_path, f"{path}:side_file")
    base = build_plan(cfg).fingerprint
    assert build_plan(cfg).fingerprint == base
    sd = net.state_dict()
    sd["fc.bias"] += 1.0
    torch.save(sd, side)  # the factory file is unchanged; the weights it loads are not
    assert build_plan(cfg).fingerprint != base


def test_weights_strict_is_part_of_the_fingerprint(tmp_path):
    weights = tmp_path / "w.pt"
    spec = f"{model_file(tmp_path)}:make"
    torch.save(load_model(spec).state_dict(), weights)
    cfg = _config(tmp_path, spec, weights=str(weights))
    assert build_plan(cfg).fingerprint != build_plan(dataclasses.replace(cfg, weights_strict=False)).fingerprint


def test_a_worker_that_loads_other_weights_refuses_to_run(tmp_path):
    from gradcam_batch.engine.job.step import BatchExplainer

    plan = build_plan(_config(tmp_path, f"{model_file(tmp_path)}:make"))
    assert plan.model_digest == state_digest(load_model(plan.model.spec))
    BatchExplainer(plan, "cpu")  # loads the model itself, as a Ray actor does: the same weights
    with pytest.raises(RunSetupError, match="differ from the weights the run was planned with"):
        BatchExplainer(dataclasses.replace(plan, model=dataclasses.replace(plan.model, digest="0" * 64)), "cpu")


def test_changed_side_weights_refuse_to_resume(tmp_path):
    path = _factories(tmp_path)
    torch.save(load_model(f"{path}:unseeded").state_dict(), path.parent / "side.pt")
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    args = ["run", str(inp), *base_args(tmp_path, tmp_path / "out")]
    args[args.index("--model") + 1] = f"{path}:side_file"
    assert invoke(args).exit_code == 0
    sd = torch.load(path.parent / "side.pt", weights_only=True)
    sd["fc.weight"] *= 2
    torch.save(sd, path.parent / "side.pt")
    res = invoke(args)
    assert res.exit_code == 2 and "other settings, model or inputs" in res.output
