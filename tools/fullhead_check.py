"""The issue-12 acceptance check: a trained run predicts template-made full heads.

Builds ``--n`` heads from ``$HIPSEG_DATA/fullhead`` (MNI152 + FreeSurfer hippocampi, moved by
random poses: hipseg.headsynth.make_cohort), runs ``hipseg predict`` on them, and prints per
head and hemisphere the whole-hippocampus Dice against the moved FreeSurfer labels, the share
of predicted voxels within 3 mm of them, the share of them recovered, the volumes.csv flag and
the seconds per scan. Exit status 1 when a hemisphere misses >= 90 % within 3 mm or >= 30 %
recovered.

    python tools/fullhead_check.py RUN [--n 6] [--seed 12] [--work /tmp/fullhead-check]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from hipseg.headsynth import freesurfer_hippocampi, hemisphere_agreement, make_cohort
from hipseg.predict import predict

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--work", default="/tmp/fullhead-check")
    parser.add_argument("--data", default=os.environ.get("HIPSEG_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    folder = Path(args.data) / "fullhead"
    work = Path(args.work)
    cohort = make_cohort(nib.load(folder / "MNI152_T1_2mm.nii.gz"),
                         freesurfer_hippocampi(nib.load(folder / "atlas_desikan_killiany.nii.gz")),
                         work / "cohort", args.n, seed=args.seed)
    started = time.perf_counter()
    rows = predict(args.run, cohort / "images", work / "predicted", progress=False)
    seconds = (time.perf_counter() - started) / len(rows)
    with open(work / "predicted" / "volumes.csv") as handle:
        table = {r["case"]: r for r in csv.DictReader(handle)}
    ok = True
    results = []
    print("case      axes  side   Dice  within3mm  recovered  predicted_mm3  true_mm3  quality")
    for row in rows:
        truth_image = nib.load(cohort / "labels" / f"{row['case']}.nii.gz")
        truth = np.asarray(truth_image.dataobj)
        prediction = np.asarray(nib.load(row["output"]).dataobj)
        spacing = truth_image.header.get_zooms()[:3]
        scores = hemisphere_agreement(prediction, truth, spacing)
        for side, s in scores.items():
            passed = s["within_mm"] >= 0.9 and s["recall"] >= 0.3
            ok &= passed
            true_mm3 = float((truth == (1 if side == "left" else 2)).sum() * np.prod(spacing))
            print(f"{row['case']}  {''.join(nib.aff2axcodes(truth_image.affine))}   {side:5s}  "
                  f"{s['dice']:.3f}  {s['within_mm']:.3f}      {s['recall']:.3f}      "
                  f"{table[row['case']].get(f'{side}_total_mm3', '')!s:>12.8}  {true_mm3:8.0f}  "
                  f"{table[row['case']].get('quality')} {'' if passed else 'FAIL'}")
            results.append({"case": row["case"], "side": side, **s, "true_mm3": true_mm3,
                            "quality": table[row["case"]].get("quality")})
    dice = [r["dice"] for r in results]
    print(f"whole-hippocampus Dice: mean {np.mean(dice):.3f}, min {np.min(dice):.3f}, "
          f"max {np.max(dice):.3f}; {seconds:.1f} s per scan (predict, localisation included)")
    (work / "check.json").write_text(json.dumps({"results": results, "seconds_per_scan": seconds},
                                                indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
