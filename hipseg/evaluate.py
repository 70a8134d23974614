"""Evaluation in each case's original grid: per-case 3D Dice and HD95 per class, a report, overlays.

Each case is segmented exactly as ``hipseg predict`` does it (hipseg.predict.segment:
canonical orientation, normalisation, a coarse pass over the whole volume to place
the ROI, a fine pass on the ROI, uncrop, back to the original orientation). The
label is read only to score the result: it never places the crop, so the numbers
are those a user gets on unlabelled scans.

Besides the JSON, the report repeats the analysis the original study did by
hand: the best and worst volumes, and Dice on *edge* slices (the first and last
fifth of the labelled range along the model's axis, where the hippocampus is only
partly present) against the *middle* slices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hipseg.discovery import discover
from hipseg.errors import ConfigError, InputError, SkippedCasesError
from hipseg.inference import TEST_TIME_FLIP, Segmentation, load_runs, segment
from hipseg.localise import is_full_head, segment_head
from hipseg.metrics import EDGE_FRACTION, dice_per_class, edge_middle_dice, hd95_missing, hd95_per_class
from hipseg.nifti import from_canonical, load_case, to_canonical
from hipseg.preprocess import normalise_intensity
from hipseg.runs import SPLIT, write_json
from hipseg.safety import check_not_input
from hipseg.store import axis_index

REPORT = "evaluation.md"


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def select_cases(data: str | Path, cases: str | Sequence[str] | None,
                 run_dir: Path) -> tuple[list, list]:
    """Labelled cases of ``data`` to evaluate, and those skipped (no image or no label).

    ``cases`` may be None (all), ``"val"`` (the run's validation split: cases it never
    trained on) or a list of case ids.
    """
    sources, skipped, _ = discover(data)
    if cases == "val":
        split = run_dir / SPLIT
        if not split.exists():
            raise ConfigError(f"{split}: no validation split in this run folder; "
                              "pass case ids instead")
        wanted = set(json.loads(split.read_text())["val"])
    elif cases is None:
        wanted = None
    else:
        wanted = set(cases)
    if wanted is not None:  # problems of cases not asked for are not this evaluation's
        skipped = [s for s in skipped if s["case"] in wanted]
    chosen = []
    for source in sources:
        if wanted is not None and source.case_id not in wanted:
            continue
        if source.image is None or source.label is None:
            missing = "image" if source.image is None else "label"
            skipped.append({"case": source.case_id, "reason": f"no {missing}"})
            continue
        chosen.append(source)
    if not chosen:
        raise InputError(data, "no labelled cases to evaluate"
                         + (" among the requested case ids" if wanted is not None else ""))
    return chosen, skipped


def evaluate(
    run_dir: str | Path, data: str | Path, *, json_out: str | Path | None = None,
    report_dir: str | Path | None = None, ensemble: Sequence[str | Path] = (),
    cases: str | Sequence[str] | None = None, which: str = "best", device: str = "cpu",
    progress: bool = True, flip: bool = TEST_TIME_FLIP, skip_bad: bool = False,
) -> dict[str, Any]:
    """Score a trained run on the labelled NIfTI cases of ``data`` in their original grids.

    Parameters
    ----------
    run_dir
        A ``hipseg train`` run folder.
    data
        A Decathlon task folder or a folder with images/ and labels/.
    json_out
        Where to write the JSON (default: ``report_dir/evaluation.json`` when a report is asked).
    report_dir
        Where to write evaluation.md and the overlay PNGs (default: beside ``json_out``; none
        when both are None).
    ensemble
        More run folders (e.g. trained on other axes) whose softmax is averaged in.
    cases
        None (all), ``"val"`` (the run's held-out cases) or a list of case ids.
    flip
        Test-time left-right flip (default on, ``inference.TEST_TIME_FLIP``): average the
        softmax of each crop and its mirror (of each hemisphere crop for full heads).
    skip_bad
        A bad case (unreadable file, shape mismatch, label values...) is always skipped
        and listed in ``skipped`` with its reason, and every good one scored and written;
        without ``skip_bad``, :class:`SkippedCasesError` is raised after writing (its
        ``document`` holds the results). When no case could be scored it is raised even
        with ``skip_bad`` (``document`` is then absent).

    Returns
    -------
    The JSON document: mean_dice, mean_hd95, hd95_worst_case (per class, the number of
    cases scored at the worst-case distance because the class was missing from the
    prediction or the label; see :func:`hipseg.metrics.hd95_per_class`), edge_vs_middle,
    cases, skipped, ...
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    for destination in (json_out, report_dir):
        if destination is not None:  # never into, over or around the data being scored
            check_not_input(destination, [data], "evaluation output")
    runs = load_runs(run_dir, ensemble, which, device)
    class_names = runs[0].class_names
    n_classes = len(class_names)
    names = class_names[1:]
    axis_name = runs[0].config.axis if runs[0].spatial_dims == 2 else "axial"
    axis = axis_index(axis_name)
    sources, skipped = select_cases(data, cases, run_dir)

    records: list[dict[str, Any]] = []
    extremes: dict[str, tuple[float, dict]] = {}
    for source in tqdm(sources, desc="evaluating", unit="case", disable=not progress):
        try:
            case = load_case(source.image, source.label, n_classes)
        except InputError as error:
            skipped.append({"case": source.case_id, "reason": str(error)})
            continue
        normalised, _, _ = normalise_intensity(case.image)  # also the overlays' image
        if is_full_head(case.original_shape, case.affine):  # hipseg.localise: both hippocampi
            head = segment_head(runs, from_canonical(case.image, case.affine), case.affine, flip=flip)
            result = Segmentation(to_canonical(head.label, case.affine), None, head.quality.localised)
            quality = {"localisation_confidence": head.quality.confidence,
                       "quality": "ok" if head.quality.ok else "flagged",
                       "quality_reasons": list(head.quality.reasons)}
        else:
            result, quality = segment(runs, normalised, flip=flip), {}
        prediction = from_canonical(result.label, case.affine)
        label = from_canonical(case.label, case.affine)
        dice = dice_per_class(prediction, label, n_classes)
        hd95 = hd95_per_class(prediction, label, n_classes, case.spacing)
        missing = hd95_missing(prediction, label, n_classes)
        edge, middle = edge_middle_dice(result.label, case.label, n_classes, axis)
        voxel_mm3 = float(np.prod(case.spacing))
        predicted_mm3 = np.bincount(prediction.ravel(), minlength=n_classes) * voxel_mm3
        label_mm3 = np.bincount(label.ravel(), minlength=n_classes) * voxel_mm3
        record = {
            "case": case.case_id,
            "dice": dict(zip(names, map(float, dice), strict=True)),
            "hd95": dict(zip(names, hd95, strict=True)),
            "hd95_worst_case": [n for n, m in zip(names, missing, strict=True) if m],
            "mean_dice": float(np.mean(dice)),
            "edge_dice": dict(zip(names, edge, strict=True)),
            "middle_dice": dict(zip(names, middle, strict=True)),
            "volume_mm3": {n: float(label_mm3[c]) for c, n in enumerate(names, 1)},
            "predicted_volume_mm3": {n: float(predicted_mm3[c]) for c, n in enumerate(names, 1)},
            "shape": list(case.original_shape),
            "roi_offset": None if result.offset is None else list(result.offset),
            "located": result.located,
            **quality,
        }
        records.append(record)
        # Keep only the canonical arrays of the best and worst case so far for the overlays.
        arrays = {"image": normalised, "label": case.label, "prediction": result.label,
                  "case": case.case_id}
        if "best" not in extremes or record["mean_dice"] > extremes["best"][0]:
            extremes["best"] = (record["mean_dice"], arrays)
        if "worst" not in extremes or record["mean_dice"] < extremes["worst"][0]:
            extremes["worst"] = (record["mean_dice"], arrays)

    if not records:
        raise SkippedCasesError(skipped)
    document: dict[str, Any] = {
        "run": str(run_dir),
        "ensemble": [str(e) for e in ensemble],
        "flip": bool(flip),
        "data": str(data),
        "class_names": list(class_names),
        "n_cases": len(records),
        "mean_dice": {n: float(np.mean([r["dice"][n] for r in records])) for n in names},
        "mean_hd95": {n: _mean([r["hd95"][n] for r in records]) for n in names},
        "hd95_worst_case": {n: sum(n in r["hd95_worst_case"] for r in records) for n in names},
        "hd95_convention": "class missing from prediction or label: image diagonal in mm; "
                           "missing from both: 0",
        "edge_vs_middle": {
            "axis": axis_name, "edge_fraction": EDGE_FRACTION,
            "edge": {n: _mean([r["edge_dice"][n] for r in records]) for n in names},
            "middle": {n: _mean([r["middle_dice"][n] for r in records]) for n in names},
        },
        "cases": records,
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    document["overall_mean_dice"] = float(np.mean(list(document["mean_dice"].values())))

    if json_out is None and report_dir is not None:
        json_out = Path(report_dir) / "evaluation.json"
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_out, document)  # never half a JSON file
        report_dir = Path(report_dir) if report_dir is not None else json_out.parent
    if report_dir is not None:
        write_report(document, Path(report_dir), extremes, axis)
    if skipped and not skip_bad:
        error = SkippedCasesError(skipped)
        error.document = document  # type: ignore[attr-defined]
        raise error
    return document


# ---------------------------------------------------------------- report

def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_overlay(arrays: dict, path: Path, axis: int, title: str) -> None:
    """Three slices through the labelled range: label (top row) and prediction (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    image, label, prediction = arrays["image"], arrays["label"], arrays["prediction"]
    per_slice = np.moveaxis(label > 0, axis, 0).reshape(label.shape[axis], -1)
    present = np.flatnonzero(per_slice.any(axis=1))
    if present.size == 0:
        present = np.arange(label.shape[axis])
    picks = [int(present[int(round(q * (present.size - 1)))]) for q in (0.15, 0.5, 0.85)]
    colours = ListedColormap([(0, 0, 0, 0), (0.95, 0.3, 0.2, 0.55), (0.2, 0.6, 1.0, 0.55)])
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
    for col, index in enumerate(picks):
        for row, (name, overlay) in enumerate((("label", label), ("prediction", prediction))):
            ax = axes[row, col]
            ax.imshow(np.take(image, index, axis=axis).T, cmap="gray", origin="lower")
            ax.imshow(np.take(overlay, index, axis=axis).T, cmap=colours, vmin=0, vmax=2,
                      origin="lower", interpolation="nearest")
            ax.set_title(f"{name}, slice {index}", fontsize=9)
            ax.axis("off")
    fig.suptitle(title + "  (red: anterior, blue: posterior)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(document: dict, out: Path, extremes: dict, axis: int) -> Path:
    """evaluation.md plus overlay PNGs of the best and worst case."""
    out.mkdir(parents=True, exist_ok=True)
    names = document["class_names"][1:]
    ranked = sorted(document["cases"], key=lambda r: r["mean_dice"], reverse=True)
    lines = [
        "# Evaluation", "",
        f"Run `{document['run']}`"
        + (f" + ensemble {document['ensemble']}" if document["ensemble"] else "")
        + f" on `{document['data']}`: {document['n_cases']} cases, scored in each case's "
        f"original grid ({document['seconds']:.1f} s).", "",
        "| class | mean Dice | mean HD95 (mm) | Dice, edge slices | Dice, middle slices |",
        "| --- | --- | --- | --- | --- |",
    ]
    em = document["edge_vs_middle"]
    for n in names:
        worst = document["hd95_worst_case"][n]
        lines.append(f"| {n} | {_fmt(document['mean_dice'][n])} | "
                     f"{_fmt(document['mean_hd95'][n], 2)}"
                     + (f" ({worst} at worst case)" if worst else "") + " | "
                     f"{_fmt(em['edge'][n])} | {_fmt(em['middle'][n])} |")
    lines += ["", f"Edge slices: the first and last {em['edge_fraction']:.0%} of each case's "
              f"labelled range along the {em['axis']} axis, where the hippocampus is only partly "
              "present; middle: the rest.",
              "", "HD95 convention: a class missing from the prediction or the label scores the "
              "image diagonal in mm (the worst case; the count is in brackets), a class missing "
              "from both scores 0; Dice is 1 where a class is missing from both.", ""]
    k = min(3, len(ranked))
    for title, rows in (("Best", ranked[:k]), ("Worst", ranked[::-1][:k])):
        lines += [f"## {title} {k}", "",
                  "| case | " + " | ".join(f"Dice {n}" for n in names) + " | "
                  + " | ".join(f"HD95 {n}" for n in names) + " | volume mm³ (label / predicted) |",
                  "| --- " * (2 * len(names) + 2) + "|"]
        for r in rows:
            volumes = ", ".join(f"{r['volume_mm3'][n]:.0f} / {r['predicted_volume_mm3'][n]:.0f}"
                                for n in names)
            lines.append(f"| {r['case']} | " + " | ".join(_fmt(r["dice"][n]) for n in names) + " | "
                         + " | ".join(_fmt(r["hd95"][n], 2) for n in names) + f" | {volumes} |")
        lines.append("")
    for which in ("best", "worst"):
        if which in extremes:
            score, arrays = extremes[which]
            png = f"overlay_{which}.png"
            title = f"{which}: {arrays['case']}, mean Dice {score:.3f}"
            write_overlay(arrays, out / png, axis, title)
            lines += [f"![{which} case: {arrays['case']}]({png})", ""]
    if document["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- {s['case']}: {s['reason']}" for s in document["skipped"]] + [""]
    path = out / REPORT
    path.write_text("\n".join(lines))
    return path
