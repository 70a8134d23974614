"""The `hipseg` command: parses arguments, calls the library, prints results. Nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hipseg.errors import HipsegError, SkippedCasesError


def _cmd_convert(args: argparse.Namespace) -> int:
    from hipseg.convert import convert

    try:
        report = convert(
            args.src,
            args.dst,
            roi=args.roi,
            margin=args.margin,
            workers=args.workers,
            scheduler=args.scheduler,
            skip_bad=args.skip_bad,
            strict=args.strict,
            overwrite=args.overwrite,
            progress=not args.quiet,
            storage_options=_storage_options(args),
            label_map=args.label_map,
        )
    except SkippedCasesError as error:
        report = getattr(error, "report", None)
        if report is not None:
            print(report.summary())
        else:
            for s in error.skipped:
                print(f"skipped {s['case']}: {s['reason']}", file=sys.stderr)
        print(
            f"hipseg: {len(error.skipped)} case(s) skipped; the store holds the rest "
            "(pass --skip-bad to accept that with exit status 0)"
            if report
            else "hipseg: no usable case; nothing was written",
            file=sys.stderr,
        )
        return 1
    print(report.summary())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from hipseg.synth import make_dataset, preset

    overrides = {"n_cases": args.cases, "seed": args.seed}
    if args.shape:
        overrides["shape"] = tuple(int(v) for v in args.shape.lower().split("x"))
    for name in ("orientation", "dtype"):
        if getattr(args, name):
            overrides[name] = getattr(args, name)
    out = make_dataset(args.out, preset(args.preset, **overrides), progress=not args.quiet)
    print(f"{out}: {args.cases} synthetic cases (preset {args.preset})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from hipseg.store import AXIS_NAMES, open_store

    s = open_store(args.store, _storage_options(args))
    print(repr(s))
    for axis in AXIS_NAMES:
        table = s.slice_table(axis)
        foreground = int((table[:, 2:].sum(axis=1) > 0).sum())
        print(f"  {axis:9s} slices {s.slice_shape(axis)}: {len(table)} ({foreground} with hippocampus)")
    for skipped in s.info.skipped:
        print(f"  skipped {skipped['case']}: {skipped['reason']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from hipseg.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, cases=args.cases)
    return 0


# ---------------------------------------------------------------- models, train, evaluate, predict


def _storage_options(args: argparse.Namespace) -> dict | None:
    from hipseg.storage import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None)) or None


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="filesystem arguments for a URL store, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' "
        "(default: the standard environment, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)",
    )


def _ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(v) for v in text.replace("x", ",").split(",") if v]


def _cmd_models(args: argparse.Namespace) -> int:
    from hipseg.models import describe_models, format_model_table

    rows = describe_models(slice_shape=_ints(args.slice), roi_shape=_ints(args.roi), context=args.context)
    print(json.dumps(rows, indent=2) if args.json else format_model_table(rows))
    return 0


_TRAIN_FLAGS = ("model", "axis", "context", "loss", "batch_size", "steps", "max_minutes", "lr",
                "weight_decay", "schedule", "warmup", "val_fraction", "val_every",
                "checkpoint_every", "log_every", "foreground_fraction", "edge_fraction",
                "ema_decay", "num_workers", "threads", "seed", "device", "augment", "amp",
                "channels_last", "compile", "deterministic")


def _train_overrides(args: argparse.Namespace) -> dict:
    """TrainConfig fields given on the command line (None: not given)."""
    model_options = {
        k: v
        for k, v in {
            "channels": _ints(args.channels),
            "strides": _ints(args.strides),
            "num_res_units": args.res_units,
            "groups": args.groups,
            "attention": args.attention or None,
            "separable": args.separable or None,
        }.items()
        if v is not None
    }
    flags = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    return {**flags, "model_options": model_options or None}


def _cmd_train(args: argparse.Namespace) -> int:
    from hipseg.train import build_config, train

    config = build_config(args.store, args.out, config_file=args.config, resume=args.resume,
                          **_train_overrides(args))
    result = train(config, resume=args.resume, progress=not args.quiet,
                   storage_options=_storage_options(args))
    from hipseg.distributed import is_main_process

    if not is_main_process():
        return 0  # under torchrun, rank 0 alone reports
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.best_dice.items())
    which = (f"best validation Dice {result.best_mean_dice:.3f} ({dice}) at step {result.best_step}"
             if result.selection == "best" else
             f"final weights kept (monitoring Dice on training cases {result.best_mean_dice:.3f})")
    print(
        f"{result.run_dir}: {result.steps} steps in {result.elapsed_s / 60:.1f} min "
        f"({result.steps_per_s:.2f} steps/s, {result.samples_per_s:.0f} samples/s); {which}"
    )
    return 0


def _cmd_crossval(args: argparse.Namespace) -> int:
    from hipseg.crossval import crossval
    from hipseg.runs import explicit_settings

    settings = explicit_settings(args.config, _train_overrides(args))
    doc = crossval(args.source, args.out, folds=args.folds, seed=args.cv_seed, data=args.data,
                   settings=settings, quick=args.quick, which=args.which, flip=args.flip,
                   progress=not args.quiet)
    summary = doc["summary"]
    for name in doc["class_names"]:
        parts = [f"{label} {summary[m][name]['mean']:.3f} ± {summary[m][name]['std']:.3f}"
                 for m, label in (("dice", "Dice"), ("edge_dice", "edge"),
                                  ("middle_dice", "middle")) if summary[m][name]["mean"] is not None]
        hd = summary["hd95"][name]["mean"]
        print(f"{name:10s} " + ", ".join(parts) + ("" if hd is None else f", HD95 {hd:.2f} mm"))
    mean = summary["mean_dice"]
    print(f"{summary['n_folds']} folds, {summary['n_cases']} cases: mean Dice {mean['mean']:.3f} "
          f"± {mean['std']:.3f} (sd across folds); written to {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from hipseg.evaluate import evaluate

    cases = args.cases if args.cases in (None, "val") else args.cases.split(",")
    status = 0
    try:
        doc = evaluate(
            args.run_dir,
            args.data,
            json_out=args.json,
            report_dir=args.report,
            ensemble=args.ensemble,
            cases=cases,
            which=args.which,
            device=args.device,
            progress=not args.quiet,
            flip=args.flip,
            skip_bad=args.skip_bad,
        )
    except SkippedCasesError as error:
        doc, status = getattr(error, "document", None), 1
        _print_skipped(error.skipped, "the others were scored" if doc else "nothing was scored")
        if doc is None:
            return status
    for name, dice in doc["mean_dice"].items():
        hd = doc["mean_hd95"][name]
        hd_text = "n/a" if hd is None else f"{hd:.2f} mm"
        worst = doc["hd95_worst_case"][name]
        if worst:
            hd_text += f" ({worst} case(s) at the worst-case distance: class missing)"
        print(f"{name:10s} mean Dice {dice:.3f}   mean HD95 {hd_text}")
    print(
        f"{doc['n_cases']} cases, overall mean Dice {doc['overall_mean_dice']:.3f}"
        + (f"; written to {args.json}" if args.json else "")
    )
    return status


def _print_skipped(skipped: list[dict], what: str) -> None:
    for s in skipped:
        print(f"skipped {s['case']}: {s['reason']}", file=sys.stderr)
    print(f"hipseg: {len(skipped)} input(s) skipped; {what} "
          "(pass --skip-bad to accept that with exit status 0)", file=sys.stderr)


def _cmd_predict(args: argparse.Namespace) -> int:
    from hipseg.predict import predict

    status = 0
    try:
        rows = predict(
            args.run_dir,
            args.inputs,
            args.out,
            ensemble=args.ensemble,
            which=args.which,
            device=args.device,
            progress=not args.quiet,
            overwrite=args.overwrite,
            skip_bad=args.skip_bad,
            flip=args.flip,
        )
    except SkippedCasesError as error:
        rows, status = getattr(error, "rows", []), 1
        _print_skipped(error.skipped, f"{len(rows)} label map(s) written for the rest")
    volume_keys = list(dict.fromkeys(k for row in rows for k in row
                                     if k.endswith("_mm3") and k != "voxel_mm3"))
    for row in rows:
        print(
            f"{row['case']}: "
            + ", ".join(f"{k[:-4]} {row[k]:.0f} mm3" for k in volume_keys if row.get(k, "") != "")
            + ("" if row["located"] or "quality" in row else " (hippocampus not found by the coarse pass)")
        )
        if row.get("quality") == "flagged":  # full-head scans: never a silent wrong volume
            print(f"  WARNING {row['case']}: {row['quality_reasons']}", file=sys.stderr)
    if rows:
        print(f"{len(rows)} label map(s) and volumes.csv written under {args.out}")
    return status


def _add_model_commands(commands) -> None:
    p = commands.add_parser("models", help="parameter counts and multiply-adds of each model")
    p.add_argument("--slice", default="48x64", help="2D input HxW (default 48x64)")
    p.add_argument("--roi", default="48x64x48", help="3D input XxYxZ (default 48x64x48)")
    p.add_argument("--context", type=int, default=0, help="2.5D neighbours on each side")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_models)

    p = commands.add_parser("train", help="train a segmentation model on a store")
    p.add_argument("store", nargs="?",
                   help="store (path or URL) from `hipseg convert` (optional with --resume)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_train_options(p)
    _add_storage_options(p)
    p.set_defaults(run=_cmd_train)

    p = commands.add_parser("crossval", help="k-fold cross-validation by case of training settings")
    p.add_argument("source", help="local store from `hipseg convert`, or a NIfTI folder "
                   "(converted once); URLs are refused: crossval needs a local store")
    p.add_argument("--out", required=True, help="output folder (rerun the command to resume)")
    p.add_argument("--folds", type=int, help="number of folds (default 5; 2 with --quick)")
    p.add_argument("--seed", dest="cv_seed", type=int, default=0,
                   help="seeds the folds and training (default 0)")
    p.add_argument("--data", help="NIfTI folder to score on (default: the store's source)")
    p.add_argument("--config", help="JSON or TOML file of training settings (flags override it)")
    p.add_argument("--quick", action="store_true", help="few steps and folds: a smoke run")
    p.add_argument("--which", default="best", choices=["best", "last"])
    _add_flip_option(p, "; --no-flip or --which last on a finished folder re-scores the trained "
                        "folds without training")
    _add_train_options(p, seed=False)
    p.set_defaults(run=_cmd_crossval)

    p = commands.add_parser("evaluate", help="Dice and HD95 per case in the original grids")
    p.add_argument("run_dir")
    p.add_argument("data", help="Decathlon task folder or folder with images/ and labels/")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--report", help="folder for evaluation.md and overlays (default: by --json)")
    p.add_argument("--cases", help="'val' (the run's held-out cases) or comma-separated case ids")
    _add_flip_option(p)
    _add_inference_options(p)
    p.set_defaults(run=_cmd_evaluate)

    p = commands.add_parser("predict", help="label maps and hippocampal volumes for NIfTI files")
    p.add_argument("run_dir")
    p.add_argument("inputs", help="a NIfTI file or a folder of them")
    p.add_argument("out", help="output folder (or a .nii.gz path for a single input)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (never an input file)")
    _add_flip_option(p)
    _add_inference_options(p)
    p.set_defaults(run=_cmd_predict)


def _add_flip_option(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time augmentation: average the softmax with that of the left-right "
                        "mirror (default on, chosen by cross-validation: docs/training.md)" + extra)


def _add_train_options(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """TrainConfig flags shared by train and crossval."""
    p.add_argument("--model", help="unet (default), attention-unet, separable-unet or unet3d")
    p.add_argument("--axis", help="slice axis: axial (default), coronal or sagittal")
    p.add_argument("--context", type=int, help="2.5D: neighbouring slices on each side as channels")
    p.add_argument("--loss", help="dice_ce (default), dice or dice_focal")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="train this many steps")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop after this many minutes (default 10 when --steps is not given)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", help="onecycle (default), cosine or constant")
    p.add_argument("--warmup", type=float, help="warm-up fraction of the run (onecycle)")
    p.add_argument("--val-fraction", type=float,
                   help="share of cases held out (default 0.2; 0: train on all, keep the final weights)")
    p.add_argument("--val-every", type=int, help="validate every N steps")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int)
    p.add_argument("--foreground-fraction", type=float,
                   help="share of 2D/2.5D slices holding hippocampus (slice sampling only; "
                   "--model unet3d trains on whole crops)")
    p.add_argument("--edge-fraction", type=float,
                   help="share of the foreground slices drawn from edge slices (default 0.3)")
    p.add_argument("--ema-decay", type=float, help="EMA of the weights, e.g. 0.999 (default 0: off)")
    p.add_argument(
        "--workers",
        dest="num_workers",
        type=int,
        help="loader worker processes (default: 0 on <= 2 cores, else 2)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    if seed:
        p.add_argument("--seed", type=int)
    else:
        p.set_defaults(seed=None)
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False)
    p.add_argument(
        "--no-amp", dest="amp", action="store_const", const=False, help="no mixed precision on CUDA"
    )
    p.add_argument("--channels-last", action="store_const", const=True)
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--deterministic", action="store_const", const=True)
    p.add_argument("--channels", help="model widths per level, e.g. 16,32,64,128")
    p.add_argument("--strides", help="model strides between levels, e.g. 2,2,2")
    p.add_argument("--res-units", type=int, help="residual units per level")
    p.add_argument("--groups", type=int, help="GroupNorm groups")
    p.add_argument("--attention", action="store_true", help="attention gates")
    p.add_argument("--separable", action="store_true", help="depthwise-separable convolutions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    """Options shared by evaluate and predict: which weights, ensemble, device."""
    p.add_argument("--ensemble", nargs="*", default=[], help="more run folders to average with")
    p.add_argument("--which", default="best", choices=["best", "last"])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--skip-bad", action="store_true",
                   help="exit 0 even when bad inputs were skipped (they are always named)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="NIfTI folder -> one Zarr store")
    p.add_argument("src", help="Decathlon task folder (dataset.json) or folder with images/ and labels/")
    p.add_argument("dst", help="destination store, e.g. out.zarr or s3://bucket/out.zarr")
    p.add_argument("--roi", help="fixed ROI shape XxYxZ (default: derived from the labels)")
    p.add_argument("--margin", type=int, default=4, help="voxels around each label box (default 4)")
    p.add_argument(
        "--workers", type=int, default=None, help="local Dask workers (threads; default: cores, at most 4)"
    )
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when bad cases were skipped")
    p.add_argument("--strict", action="store_true", help="stop at the first bad case")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing hipseg store (never any other folder)")
    p.add_argument("--label-map", help="full-head labels: SOURCE:CLASS pairs, e.g. 17:1,53:1 "
                   "(FreeSurfer hippocampi); writes one crop per hemisphere")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_storage_options(p)
    p.set_defaults(run=_cmd_convert)

    p = commands.add_parser("synth", help="write a synthetic Decathlon-layout dataset")
    p.add_argument("out")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--preset", default="crop", help="crop (35x50x35-like) or head (182x218x182 int16)")
    p.add_argument("--shape", help="volume shape XxYxZ")
    p.add_argument("--orientation", help="axis codes, e.g. LPS")
    p.add_argument("--dtype", help="uint8, int16 or float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_synth)

    p = commands.add_parser("info", help="summarise a store")
    p.add_argument("store", help="a store path or URL")
    _add_storage_options(p)
    p.set_defaults(run=_cmd_info)

    p = commands.add_parser("demo", help="the whole pipeline on built-in synthetic data")
    p.add_argument("--out", default="demo-run")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(run=_cmd_demo)

    _add_model_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except HipsegError as error:
        print(f"hipseg: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hipseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
