"""The built-in end-to-end demo: synthesise → convert → train → evaluate → predict, on synthetic data."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from hipseg.convert import convert
from hipseg.evaluate import evaluate
from hipseg.headsynth import hemisphere_agreement, make_head, make_pose, painted_template
from hipseg.predict import predict
from hipseg.synth import SynthConfig, make_dataset
from hipseg.train import build_config, train


def _posed_head(folder: Path) -> Path:
    """A full head from the ICBM152 template (hipseg.localise.load_template) with a synthetic
    tube painted per hemisphere."""
    folder.mkdir(parents=True, exist_ok=True)
    head, label = make_head(*painted_template(seed=1), make_pose((12, -8, 10), (6, -9, 4), 1.04),
                            axcodes="LPS", neck=False, rng=np.random.default_rng(1))
    for name, image in (("images", head), ("labels", label)):
        (folder / name).mkdir(exist_ok=True)
        nib.save(image, folder / name / "head.nii.gz")
    return folder


def run_demo(out: Path, steps: int = 300, cases: int = 24, progress: bool = True) -> dict:
    """Run every stage on fresh synthetic data under ``out`` and return the key numbers."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] synthesising {cases} hippocampus-like cases → {out / 'data'}")
    data = make_dataset(out / "data", SynthConfig(n_cases=cases, seed=0), progress=progress)
    heads = _posed_head(out / "heads")

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

    print("[4/5] evaluating on the validation cases in their original grids (test-time flip on)")
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

    print(f"[5/5] predicting a full head (both hippocampi) and the crops → {out / 'predictions'}")
    shutil.rmtree(out / "predictions", ignore_errors=True)
    rows = predict(out / "run", heads / "images", out / "predictions" / "heads", progress=progress)
    head = rows[0]
    truth = nib.load(heads / "labels" / "head.nii.gz")
    scores = hemisphere_agreement(np.asarray(nib.load(head["output"]).dataobj),
                                  np.asarray(truth.dataobj), truth.header.get_zooms()[:3])
    print(f"  full head ({head['shape']}, LPS, turned 12°): quality {head['quality']}, "
          f"template correlation {head['localisation_confidence']:.2f}")
    for side, s in scores.items():
        volume = head[f"{side}_total_mm3"]
        print(f"  {side:5s} hippocampus: Dice {s['dice']:.3f} against the painted label, "
              + (f"{volume:.0f} mm3" if volume != "" else "no volume"))
    if head["quality_reasons"]:
        print(f"  flagged: {head['quality_reasons']}")
    rows += predict(out / "run", data / "imagesTr", out / "predictions" / "crops", progress=progress)
    print(f"  {len(rows)} label maps with hippocampal volumes in {out / 'predictions'}/*/volumes.csv")
    print(f"done: see {out / 'report'} for the evaluation report and {out / 'run' / 'curve.png'}")
    return {"steps_per_s": result.steps_per_s, "mean_dice": evaluation["mean_dice"]}
