"""Cross-validation by case: k seeded folds; train on k-1, evaluate the held-out fold in its original grids.

An output folder holds::

    plan.json              folds (case ids), seed, source, data and the training settings under test
    store.zarr             the converted store, when a NIfTI folder was given
    fold0/run/             the fold's ``hipseg train`` run folder (its split.json names its cases)
    fold0/evaluation.json  ``hipseg evaluate`` of the run on the held-out fold's cases
    fold0/report/          its evaluation.md and best/worst overlays
    fold0/result.json      the fold's summary; written last and atomically: a fold that has one is done
    crossval.json          per-class mean and spread across folds: Dice, HD95, edge and middle slices
    crossval.png           per-fold, per-class Dice bars with the spread

Resuming is rerunning the same command: a fold with a result.json is not rerun, a fold
whose training was interrupted resumes from its checkpoint (``hipseg train --resume``), so
``kill -9`` at any moment loses at most the steps since the last checkpoint. Evaluating
the same trained folds another way (``flip=False``, ``which="last"``) writes result files
and summaries with a suffix (``result-noflip.json``, ``crossval-last.json``) beside the
others and trains nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hipseg.errors import ConfigError, HipsegError
from hipseg.evaluate import evaluate
from hipseg.inference import TEST_TIME_FLIP
from hipseg.runs import CHECKPOINT, SUMMARY, build_config, split_cases, write_json
from hipseg.storage import is_url
from hipseg.store import open_store
from hipseg.train import train

PLAN = "plan.json"
STORE = "store.zarr"
QUICK_STEPS = 200
QUICK_FOLDS = 2
# Statistics reported per class; each is a per-case mean within a fold.
METRICS = ("dice", "hd95", "edge_dice", "middle_dice")


def fold_cases(case_ids: Sequence[str], folds: int, seed: int) -> list[list[str]]:
    """``folds`` disjoint lists of case ids covering all of them, sizes differing by at most one.

    A seeded permutation of the sorted ids cut into consecutive parts (``np.array_split``),
    so the folds depend only on the set of ids, ``folds`` and ``seed``.
    """
    ids = sorted(case_ids)
    if not 2 <= folds <= len(ids):
        raise ConfigError(f"need 2 <= folds <= number of cases ({len(ids)}), got {folds}")
    order = np.random.default_rng([seed, 0xF01D]).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]


def _suffix(which: str, flip: bool) -> str:
    return ("-last" if which == "last" else "") + ("" if flip else "-noflip")


def _resolve_source(source: str | Path, out: Path, data: str | Path | None,
                    progress: bool) -> tuple[Path, Path]:
    """(store, NIfTI folder): converts a NIfTI folder once into ``out/store.zarr``."""
    source = Path(source)
    try:
        recorded = open_store(source).info.source
    except HipsegError:  # not a store: a NIfTI folder (discovery names what is wrong with it)
        store = out / STORE
        if not store.exists():
            from hipseg.convert import convert

            convert(source, store, progress=progress)
        return store, Path(data) if data is not None else source
    folder = Path(data) if data is not None else (Path(recorded) if recorded else None)
    if folder is None or not folder.exists():
        raise ConfigError(f"{source}: a store; evaluation needs its NIfTI folder, and the store "
                          f"records {recorded or 'none'}: pass --data FOLDER")
    return source, folder


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in plan if saved.get(k) != plan[k])
        if changed:
            raise ConfigError(f"{out}: holds a cross-validation with other {changed}; "
                              "rerun with the same settings to resume, or choose another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, plan)


def _fold_result(index: int, cases: list[str], split: dict, summary: dict,
                 document: dict) -> dict[str, Any]:
    names = document["class_names"][1:]
    if document["n_cases"] != len(cases) or document["skipped"]:
        raise ConfigError(f"fold {index}: evaluated {document['n_cases']} of {len(cases)} cases "
                          f"(skipped: {document['skipped']}); every held-out case must be scored")
    em = document["edge_vs_middle"]
    return {
        "fold": index, "cases": cases, "train_cases": split["train"], "val_cases": split["val"],
        "selection": split.get("selection", "best"), "steps": summary["steps"],
        "elapsed_s": summary["elapsed_s"], "flip": document.get("flip", False),
        "class_names": names,
        "dice": document["mean_dice"], "hd95": document["mean_hd95"],
        "edge_dice": em["edge"], "middle_dice": em["middle"],
        "mean_dice": document["overall_mean_dice"],
        "per_case": [{"case": r["case"], **{m: r[m] for m in METRICS}}
                     for r in document["cases"]],
    }


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "std": None, "min": None, "max": None, "folds": list(values)}
    return {"mean": float(np.mean(kept)), "std": float(np.std(kept, ddof=1)) if len(kept) > 1
            else 0.0, "min": min(kept), "max": max(kept), "folds": list(values)}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per class and statistic: mean, sample standard deviation, min and max across folds
    (each fold's value is its per-case mean), plus the mean over all cases pooled."""
    names = results[0]["class_names"]
    summary: dict[str, Any] = {"n_folds": len(results),
                               "n_cases": sum(len(r["cases"]) for r in results)}
    for metric in METRICS:
        summary[metric] = {}
        for n in names:
            entry = _spread([r[metric][n] for r in results])
            pooled = [c[metric][n] for r in results for c in r["per_case"]
                      if c[metric][n] is not None]
            entry["pooled"] = float(np.mean(pooled)) if pooled else None
            summary[metric][n] = entry
    summary["mean_dice"] = _spread([r["mean_dice"] for r in results])
    summary["steps"] = _spread([r["steps"] for r in results])
    return summary


def plot(document: dict[str, Any], path: Path) -> None:
    """Per-fold Dice bars per class with the mean and standard deviation across folds, and
    edge-slice against middle-slice Dice per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds, names = document["folds"], document["class_names"]
    summary = document["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / (len(folds) + 1)
    x = np.arange(len(names))
    for k, fold in enumerate(folds):
        left.bar(x + k * width, [fold["dice"][n] for n in names], width, label=f"fold {k}")
    means = [summary["dice"][n]["mean"] for n in names]
    stds = [summary["dice"][n]["std"] for n in names]
    left.bar(x + len(folds) * width, means, width, yerr=stds, capsize=4, color="k", alpha=0.6,
             label="mean ± sd")
    left.set_xticks(x + 0.4 - width / 2, names)
    left.set(ylabel="Dice (original grids)", ylim=(max(0.0, min(means) - 0.15), 1.0),
             title=f"{len(folds)}-fold cross-validation, mean {summary['mean_dice']['mean']:.3f}")
    left.legend(fontsize=7, loc="lower right")
    for k, (metric, label) in enumerate((("edge_dice", "edge slices"),
                                         ("middle_dice", "middle slices"))):
        vals = [summary[metric][n]["mean"] or 0.0 for n in names]
        errs = [summary[metric][n]["std"] or 0.0 for n in names]
        right.bar(x + k * 0.4, vals, 0.4, yerr=errs, capsize=4, label=label)
    right.set_xticks(x + 0.2, names)
    right.set(ylabel="Dice", ylim=(0.5, 1.0), title="edge vs middle slices (mean ± sd over folds)")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def crossval(
    source: str | Path, out: str | Path, *, folds: int | None = None, seed: int = 0,
    data: str | Path | None = None, settings: dict[str, Any] | None = None, quick: bool = False,
    which: str = "best", flip: bool = TEST_TIME_FLIP, progress: bool = True,
    on_fold: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """k-fold cross-validation by case of the training settings ``settings``.

    Parameters
    ----------
    source
        A local store from ``hipseg convert``, or a NIfTI folder (converted once into
        ``out/store.zarr``); URLs are refused (see Raises).
    out
        Output folder (layout in the module docstring); rerunning resumes it.
    folds
        Number of folds (default 5, or 2 with ``quick``); every fold is held out once.
    seed
        Seeds the fold assignment (and, unless ``settings`` says otherwise, training).
    data
        The NIfTI folder the held-out cases are scored on, in their original grids (default:
        ``source`` itself, or the folder the store was converted from).
    settings
        TrainConfig fields under test (not ``store``, ``out``, ``train_cases``, ``val_cases``).
        Within the k-1 training folds, ``val_fraction`` holds out validation cases as in
        ``hipseg train``; 0 trains on all of them and keeps the final weights.
    quick
        Few steps (``QUICK_STEPS`` unless ``settings`` gives steps) and few folds: a smoke
        run for 2 cores.
    which, flip
        How each fold's run is evaluated (``hipseg evaluate --which``, test-time flip).
    on_fold
        Called with each fold's result as it is finished or found finished.

    Returns
    -------
    The crossval document (also written to ``out/crossval.json``): plan, per-fold results
    and the summary of :func:`aggregate`.
    Raises
    ------
    ConfigError
        ``source``, ``out`` or ``data`` is a URL: cross-validation needs a local store (its
        folds write run folders and read the NIfTI originals beside it).
    """
    for name, location in (("source", source), ("out", out), ("data", data)):
        if is_url(location):
            raise ConfigError(f"{location}: hipseg crossval needs a local {name} (copy the store "
                              f"to a local folder first)")
    out = Path(out)
    settings = dict(settings or {})
    for key in ("store", "out", "train_cases", "val_cases"):
        if key in settings:
            raise ConfigError(f"crossval sets {key} itself for each fold; leave it out")
    folds = folds if folds is not None else (QUICK_FOLDS if quick else 5)
    settings.setdefault("seed", seed)
    if quick:
        settings.setdefault("steps", QUICK_STEPS)
        settings.setdefault("val_every", settings["steps"])
    out.mkdir(parents=True, exist_ok=True)
    store_path, nifti = _resolve_source(source, out, data, progress)
    store = open_store(store_path)
    parts = fold_cases(store.case_ids, folds, seed)
    base = build_config(store_path, out / "fold0" / "run", **settings)  # validates the settings
    plan = {"folds": parts, "seed": seed, "store": str(store_path), "data": str(nifti),
            "settings": settings}
    _check_plan(out, plan)
    suffix = _suffix(which, flip)

    results = []
    for index, cases in enumerate(parts):
        fold_dir = out / f"fold{index}"
        result_path = fold_dir / f"result{suffix}.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        # Reuse a result only if it was scored this way: before the flip became the default,
        # result.json held the unflipped scores, and such a folder is scored again.
        if result is None or result.get("flip", False) != flip:
            run_dir = fold_dir / "run"
            pool = sorted(set(store.case_ids) - set(cases))
            train_cases, val_cases = split_cases(pool, base.val_fraction, seed)
            config = base.replace(out=str(run_dir), train_cases=tuple(train_cases),
                                  val_cases=tuple(val_cases))
            if not (run_dir / SUMMARY).exists():
                train(config, resume=(run_dir / CHECKPOINT).exists(), progress=progress)
            split = json.loads((run_dir / "split.json").read_text())
            summary = json.loads((run_dir / SUMMARY).read_text())
            document = evaluate(run_dir, nifti, cases=cases, which=which, flip=flip,
                                json_out=fold_dir / f"evaluation{suffix}.json",
                                report_dir=fold_dir / f"report{suffix}", progress=progress)
            result = _fold_result(index, cases, split, summary, document)
            write_json(result_path, result)
        results.append(result)
        if on_fold is not None:
            on_fold(result)

    document = {"plan": plan, "which": which, "flip": flip, "quick": quick,
                "class_names": results[0]["class_names"],
                "folds": results, "summary": aggregate(results)}
    write_json(out / f"crossval{suffix}.json", document)
    plot(document, out / f"crossval{suffix}.png")
    return document
