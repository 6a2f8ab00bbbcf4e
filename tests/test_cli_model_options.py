"""`run`, `layers` and `bench` share one --model/--weights bundle: the same forms, the same error for the same mistake.

The options are declared once (``cli/options.py``); each mistake is checked in one place (click's
parameter types, or the model loader), so the three commands print the same `Error:` line.
"""

from __future__ import annotations

import io

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

torchvision = pytest.importorskip("torchvision")

from gradcam_batch.cli import cli  # noqa: E402

MODEL_OPTIONS = ("--model", "--weights", "--weights-strict", "--num-classes")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("model-options")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 30, 200)).save(buf, format="PNG")
    pq.write_table(pa.table({"image": [buf.getvalue()]}), d / "in.parquet")
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    torch.save(state, d / "w7.pt")
    del state["fc.bias"]  # loads only with --weights-strict false
    torch.save(state, d / "w7-partial.pt")
    (d / "a-directory").mkdir()
    return d


def _commands(d):
    return {
        "run": ["run", str(d / "in.parquet"), "-o", str(d / "out"), "--overwrite", "--resize", "32", "--crop", "32"],
        "layers": ["layers", "--input-size", "32"],
        "bench": ["bench", "--image-size", "32", "--batch-size", "1", "--iters", "1", "--warmup", "0"]
        + ["--top-k", "1", "--baselines", "inference"],
    }


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_the_three_commands_declare_the_same_model_options():
    def declared(name):
        return {o: p for p in cli.commands[name].params if isinstance(p, click.Option) for o in p.opts}

    run, layers, bench = declared("run"), declared("layers"), declared("bench")
    for opt in MODEL_OPTIONS:
        assert opt in run and opt in layers and opt in bench, opt
        # One declaration: the same help, type and destination everywhere.
        for other in (layers, bench):
            assert other[opt].help == run[opt].help, opt
            assert other[opt].name == run[opt].name, opt
            assert other[opt].type.to_info_dict() == run[opt].type.to_info_dict(), opt


def test_the_same_model_and_weights_forms_work_in_each_command(files):
    forms = ["--model", "torchvision:resnet18", "--num-classes", "7", "--weights", str(files / "w7-partial.pt")]
    forms += ["--weights-strict", "false"]
    for name, args in _commands(files).items():
        res = CliRunner().invoke(cli, [*args, *forms], catch_exceptions=False)
        assert res.exit_code == 0, (name, res.output)


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (["--model", "resnet50"], "cannot parse model spec 'resnet50'"),
        (["--model", "torchvision:nonet"], "unknown torchvision model 'nonet'"),
        (["--weights", "does-not-exist.pt"], "weights file not found: does-not-exist.pt"),
        (["--weights", "{d}/a-directory"], "weights file not found"),
        (["--num-classes", "0"], "'--num-classes': 0 is not in the range x>=1"),
        (["--weights-strict", "maybe"], "'maybe' is not a valid boolean"),
        (["--weights", "{d}/w7.pt"], "do not match the model"),
    ],
)
def test_the_same_mistake_gives_the_same_one_line_error(files, mistake, message):
    mistake = [m.format(d=files) for m in mistake]
    if mistake[0] != "--model":
        mistake = ["--model", "torchvision:resnet18", *mistake]
    lines = {}
    for name, args in _commands(files).items():
        res = CliRunner().invoke(cli, [*args, *mistake])
        assert res.exit_code == 2, (name, res.output)
        assert "Traceback" not in res.output, (name, res.output)
        errors = _errors(res.output)
        assert len(errors) == 1 and message in errors[0], (name, res.output)
        lines[name] = errors[0]
    assert len(set(lines.values())) == 1, lines
