"""The built-in end-to-end demo: synthesise → convert → train → evaluate → predict, on synthetic data."""

from __future__ import annotations

import shutil
from pathlib import Path

from hipseg.convert import convert
from hipseg.evaluate import evaluate
from hipseg.predict import predict
from hipseg.synth import SynthConfig, make_dataset, preset
from hipseg.train import build_config, train


def run_demo(out: Path, steps: int = 300, cases: int = 24, progress: bool = True) -> dict:
    """Run every stage on fresh synthetic data under ``out`` and return the key numbers."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] synthesising {cases} hippocampus-like cases → {out / 'data'}")
    data = make_dataset(out / "data", SynthConfig(n_cases=cases, seed=0), progress=progress)
    heads = make_dataset(
        out / "heads", preset("head", n_cases=1, shape=(96, 112, 96), seed=1), progress=progress
    )

    print(f"[2/5] converting to {out / 'store.zarr'}")
    report = convert(data, out / "store.zarr", workers=2, progress=progress, overwrite=True)
    print(report.summary())

    print(f"[3/5] training the compact U-Net for {steps} steps → {out / 'run'}")
    shutil.rmtree(out / "run", ignore_errors=True)
    result = train(
        build_config(out / "store.zarr", out / "run", steps=steps, val_every=max(steps // 4, 1)),
        progress=progress,
    )
    print(
        f"{result.steps} steps at {result.steps_per_s:.2f} steps/s; best validation Dice "
        f"{result.best_mean_dice:.3f}"
    )

    print("[4/5] evaluating on the validation cases in their original grids")
    evaluation = evaluate(
        out / "run",
        data,
        cases="val",
        json_out=out / "evaluation.json",
        report_dir=out / "report",
        progress=progress,
    )
    for name, dice in evaluation["mean_dice"].items():
        print(f"  {name:10s} mean Dice {dice:.3f}")

    print(f"[5/5] predicting a full-head volume and the crops → {out / 'predictions'}")
    shutil.rmtree(out / "predictions", ignore_errors=True)
    rows = predict(out / "run", heads / "imagesTr", out / "predictions" / "heads", progress=progress)
    rows += predict(out / "run", data / "imagesTr", out / "predictions" / "crops", progress=progress)
    print(f"  {len(rows)} label maps with hippocampal volumes in predictions/*/volumes.csv")
    print("  (the demo model has only seen ROI crops: on the full head it shows the sliding-window\n"
          "   geometry, not an accurate segmentation; train on full-head data for that)")
    print(f"done: see {out / 'report'} for the evaluation report and {out / 'run' / 'curve.png'}")
    return {"steps_per_s": result.steps_per_s, "mean_dice": evaluation["mean_dice"]}
