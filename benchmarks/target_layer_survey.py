"""The default target layer on a sample of timm architectures (random weights, nothing downloaded).

For each model: the layer ``Explainer(model)`` picks at the model's own input size, the share of the
parameters that run after it, and the layer a second run picked (``--compare`` another run's JSON, for
example one made with the main branch's code on the path). Creating the larger models takes seconds each
on a small CPU, so this is a script to run once, not a test:

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/target_layer_survey.py --json survey.json [--compare old.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
import torch.nn as nn

MODELS = (
    "resnet18",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "regnety_002",
    "densenet121",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "levit_128s",
    "mixer_s16_224",
    "twins_svt_small",
    "mobilevitv2_050",
    "maxvit_tiny_tf_224",
    "fastvit_t8",
    "coatnet_0_rw_224",
    "poolformer_s12",
    "pvt_v2_b0",
    "efficientformer_l1",
    "cait_xxs24_224",
    "xcit_nano_12_p16_224",
    "edgenext_xx_small",
    "efficientvit_b0",
)


def params_after(model: nn.Module, sample: torch.Tensor, layer: str) -> float:
    """Share of the parameters in modules whose last call completes after ``layer``'s (its ancestors excluded)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: order.append(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    last = {n: i for i, n in enumerate(order)}
    cut = last[layer]
    modules = dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    after = sum(
        p.numel()
        for n, i in last.items()
        if i > cut and not layer.startswith(n + ".")
        for p in modules[n].parameters(recurse=False)
    )
    return after / total


def survey(names) -> list[dict]:
    import timm

    from gradcam_batch.engine.explain.explainer import Explainer

    rows = []
    for name in names:
        row: dict = {"model": name}
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
            sample = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                explainer = Explainer(model)
                exp = explainer(sample, heatmaps=False)
            notes = [str(w.message) for w in record if type(w.message).__name__ == "TargetLayerNotice"]
            row |= {
                "layer": exp.target_layer,
                "reshape": explainer.reshape,
                "cam": list(exp.cams.shape[-2:]),
                "params_after": round(params_after(model, sample, exp.target_layer), 4),
                "params": sum(p.numel() for p in model.parameters()),
                "note": notes[0] if notes else None,
            }
        except Exception as exc:  # one model's failure is a row of the survey, not its end
            row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], old: dict[str, dict]) -> str:
    lines = [
        "| model | layer | cam | params after | main's layer | changed |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        before = old.get(r["model"], {})
        was = before.get("layer") or before.get("error", "-")
        now = r.get("layer") or r.get("error")
        cam = "x".join(map(str, r["cam"])) if "cam" in r else "-"
        share = f"{r['params_after']:.1%}" if "params_after" in r else "-"
        changed = "-" if not before else ("yes" if was != now else "no")
        lines.append(f"| {r['model']} | `{now}` | {cam} | {share} | `{was}` | {changed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--compare", help="another run's JSON rows: adds its layer and whether it changed")
    parser.add_argument("--models", help="comma-separated timm names (default: the built-in sample)")
    args = parser.parse_args()
    rows = survey(args.models.split(",") if args.models else MODELS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    old = {}
    if args.compare:
        with open(args.compare) as f:
            old = {r["model"]: r for r in json.load(f)}
    print(table(rows, old))


if __name__ == "__main__":
    main()
