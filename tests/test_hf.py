"""hf:DIR: tiny Transformers classifiers built from configs, saved with save_pretrained, loaded offline.

Nothing touches the network: the models have random weights and live in tmp_path.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gradcam_batch.engine.explain.explainer import Explainer, explain
from gradcam_batch.engine.models.loader import ModelSpecError, load_model, model_preprocessing

transformers = pytest.importorskip("transformers")

from run_support import bytes_table, invoke, read_output, shapes, write_table  # noqa: E402

# vmap over the attention backward has no batching rule on CPU yet: correct, only slower.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _save(model, processor, path):
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return _save(transformers.ViTForImageClassification(config).eval(), processor, tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def convnext_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5)
    # shortest_edge 64 at crop_pct 1.0: resize to 64 and crop 64, so 64x64 images pass unchanged.
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0)
    return _save(
        transformers.ConvNextForImageClassification(config).eval(), processor, tmp_path_factory.mktemp("convnext")
    )


def test_load_is_offline_and_restores_the_environment(vit_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load_model(f"hf:{vit_dir}")
    assert type(model).__name__ == "ViTForImageClassification" and not model.training
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_name_is_refused_in_one_line(tmp_path):
    with pytest.raises(ModelSpecError, match=r"hf:google/vit-base is not a local directory.*never downloads"):
        load_model("hf:google/vit-base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model(f"hf:{tmp_path / 'empty'}")
    res = invoke(["layers", "--model", "hf:google/vit-base"])
    assert res.exit_code != 0 and "not a local directory" in res.output and "Traceback" not in res.output


def test_processor_becomes_the_preprocessing(vit_dir, convnext_dir):
    vit = model_preprocessing(f"hf:{vit_dir}")
    assert (vit.resize, vit.crop, vit.interpolation, vit.mean) == ((32, 32), None, "bilinear", (0.5, 0.5, 0.5))
    cnx = model_preprocessing(f"hf:{convnext_dir}")
    assert (cnx.resize, cnx.crop, cnx.interpolation) == (64, (64, 64), "bicubic")


def test_convnext_processor_crop_pct():
    proc = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    from gradcam_batch.engine.models.hf_models import processor_preprocess

    prep = processor_preprocess(proc, "test")
    assert (prep.resize, prep.crop) == (256, (224, 224))  # as the processor itself: int(224 / 0.875)


def _hand_vit(model, images, classes):
    """Autograd per class at the last block's pre-attention norm, class token dropped, reshaped by hand."""
    layer = model.get_submodule("vit.layers.1.layernorm_before")
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["t"] = output

    handle = layer.register_forward_hook(hook)
    cams = []
    try:
        for c in range(classes.shape[1]):
            model.zero_grad()
            model(images).logits.gather(1, classes[:, c : c + 1]).sum().backward()
            t, g = captured["t"].detach()[:, 1:], captured["t"].grad[:, 1:]
            b, n, d = t.shape
            a = t.reshape(b, 4, 4, d).permute(0, 3, 1, 2)
            alpha = g.reshape(b, 4, 4, d).permute(0, 3, 1, 2).mean(dim=(2, 3))
            cams.append(torch.relu((alpha[:, :, None, None] * a).sum(1)))
    finally:
        handle.remove()
    return torch.stack(cams, 1)


def test_python_api_takes_the_model_as_it_is(vit_dir):
    model = load_model(f"hf:{vit_dir}")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exp = explain(model, images, top_k=2)  # no score_fn: .logits is recognized; no reshape: ViT gets tokens
    assert exp.target_layer == "vit.layers.1.layernorm_before" and exp.cams.shape == (3, 2, 4, 4)
    ref = _hand_vit(model, images, exp.classes)
    assert ref.abs().max() > 0
    torch.testing.assert_close(exp.cams / ref.abs().max(), ref / ref.abs().max(), atol=1e-4, rtol=0)


def _normalized(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(("which", "size", "cam_shape"), [("vit", 32, (4, 4)), ("convnext", 64, (2, 2))])
def test_run_end_to_end_matches_the_python_api(which, size, cam_shape, vit_dir, convnext_dir, tmp_path):
    path = vit_dir if which == "vit" else convnext_dir
    n = 3
    data = write_table(tmp_path / "in.parquet", bytes_table(n, size=size))
    out = tmp_path / "out"
    # No --resize/--crop/--mean/--std: the image processor's, which leave these images unchanged.
    res = invoke(["run", str(data), "-o", str(out), "--model", f"hf:{path}", "--top-k", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    table = read_output(out)
    assert table.num_rows == n * 2 and set(table["status"].to_pylist()) == {"ok"}

    model = load_model(f"hf:{path}")
    prep = model_preprocessing(f"hf:{path}")
    images = _normalized(shapes(n, size=size).images, prep.mean, prep.std)
    exp = Explainer(model)(images, top_k=2)
    np.testing.assert_array_equal(table["class_index"].to_numpy().reshape(n, 2), exp.classes.numpy())
    cams = np.stack(table["cam"].to_numpy(zero_copy_only=False)).astype(np.float32).reshape(n, 2, *cam_shape)
    scale = float(exp.cams.abs().max())
    np.testing.assert_allclose(cams / scale, exp.cams.numpy() / scale, atol=2e-3)


def test_layers_command_on_a_directory(vit_dir):
    res = invoke(["layers", "--model", f"hf:{vit_dir}"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("preprocessing: resize to 32x32, no crop, bilinear, mean 0.5,0.5,0.5")
    assert "image processor of hf:" in lines[0]
    assert lines[-1] == "auto-detected: vit.layers.1.layernorm_before (reshape: tokens)"


def test_num_classes_gives_a_new_head_and_weights_fill_it(vit_dir, tmp_path):
    model = load_model(f"hf:{vit_dir}", num_classes=3)
    assert model.classifier.out_features == 3
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(model.state_dict(), str(tmp_path / "three.safetensors"))
    again = load_model(f"hf:{vit_dir}", num_classes=3, weights=tmp_path / "three.safetensors")
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_fingerprint_sees_the_directorys_weights_and_config(vit_dir, tmp_path, monkeypatch):
    import json
    import shutil
    import sys

    from gradcam_batch.engine.job.config import RunConfig
    from gradcam_batch.engine.job.plan import build_plan, fingerprint

    d = shutil.copytree(vit_dir, tmp_path / "vit")
    inp = write_table(tmp_path / "in.parquet", bytes_table(2))
    cfg = RunConfig(inputs=[str(inp)], output=str(tmp_path / "o"), model=f"hf:{d}", resize=32, crop=32)
    plan = build_plan(cfg)
    base = plan.fingerprint
    original = (d / "config.json").read_text()
    config = json.loads(original)
    config["layer_norm_eps"] = 1e-3  # no weight changes, the model's output does
    (d / "config.json").write_text(json.dumps(config))
    assert fingerprint(plan) != base
    (d / "config.json").write_text(original)
    assert fingerprint(plan) == base
    # Another transformers, another run (the module as loaded now: transformers may replace its own entry).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "0.0.1")
    assert fingerprint(plan) != base
    monkeypatch.undo()
    model = load_model(f"hf:{d}")
    with torch.no_grad():
        model.classifier.bias += 1.0
    model.save_pretrained(str(d))  # replaces model.safetensors (and rewrites config.json as it was)
    assert build_plan(cfg).fingerprint != base
