"""The `hipseg` command: parses arguments, calls the library, prints results. Nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hipseg.errors import HipsegError, SkippedCasesError


def _cmd_convert(args: argparse.Namespace) -> int:
    from hipseg.convert import convert

    try:
        report = convert(args.src, args.dst, roi=args.roi, margin=args.margin, workers=args.workers,
                         scheduler=args.scheduler, skip_bad=args.skip_bad, strict=args.strict,
                         overwrite=args.overwrite, progress=not args.quiet)
    except SkippedCasesError as error:
        report = getattr(error, "report", None)
        if report is not None:
            print(report.summary())
        else:
            for s in error.skipped:
                print(f"skipped {s['case']}: {s['reason']}", file=sys.stderr)
        print(f"hipseg: {len(error.skipped)} case(s) skipped; the store holds the rest "
              "(pass --skip-bad to accept that with exit status 0)" if report else
              "hipseg: no usable case; nothing was written", file=sys.stderr)
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

    s = open_store(args.store)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="NIfTI folder -> one Zarr store")
    p.add_argument("src", help="Decathlon task folder (dataset.json) or folder with images/ and labels/")
    p.add_argument("dst", help="destination store, e.g. out.zarr")
    p.add_argument("--roi", help="fixed ROI shape XxYxZ (default: derived from the labels)")
    p.add_argument("--margin", type=int, default=4, help="voxels around each label box (default 4)")
    p.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
    p.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    p.add_argument("--skip-bad", action="store_true", help="exit 0 even when bad cases were skipped")
    p.add_argument("--strict", action="store_true", help="stop at the first bad case")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    p.add_argument("store")
    p.set_defaults(run=_cmd_info)

    p = commands.add_parser("demo", help="the whole pipeline on built-in synthetic data")
    p.add_argument("--out", default="demo-run")
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(run=_cmd_demo)
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
