"""Destination checks: no command writes over, into or around the user's inputs, or replaces a folder
that hipseg did not make.

Rules (docs/reliability.md): a destination that is an input, lies inside one or
contains one is refused whatever the flags; ``--overwrite`` replaces only what
hipseg recognises as its own (a store by its ``zarr.json`` attributes, a run folder by
its ``config.json`` / ``checkpoint.pt``); an existing non-empty folder of anything else
is never replaced. URLs (``s3://...``) are left to the store layer: the local-folder
checks are skipped for them, and no URL ever becomes a ``pathlib.Path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from hipseg.errors import InputError
from hipseg.storage import is_url

DestinationCheck = Callable[[Path], bool]


def is_hipseg_store(path: Path) -> bool:
    """A Zarr group written by ``hipseg convert`` (its root attributes hold "hipseg")."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "hipseg" in (meta.get("attributes") or {})


def is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_not_input(destination: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                    what: str = "destination") -> None:
    """Refuse a destination that is an input, lies inside one, or contains one (local paths only)."""
    if is_url(destination):
        return
    target = Path(destination).resolve()
    for source in inputs:
        if is_url(source):
            continue
        origin = Path(source).resolve()
        if target == origin:
            problem = "is the input itself"
        elif target.is_relative_to(origin):
            problem = f"lies inside the input {origin}"
        elif origin.is_relative_to(target):
            problem = f"contains the input {origin}"
        else:
            continue
        raise InputError(destination, f"the {what} {problem}; writing there could destroy the "
                         "input: choose a destination outside it")


def owned_by_hipseg(destination: str | os.PathLike, recognise: DestinationCheck, kind: str) -> bool:
    """Whether ``destination`` holds hipseg's own ``kind`` (then --overwrite may replace it).

    False when it is missing or an empty folder (nothing to replace). Anything else that
    ``recognise`` does not accept (a file, a folder of other things) is an InputError,
    whatever the flags: hipseg never replaces what it did not make.
    """
    if is_url(destination):
        return False
    path = Path(destination)
    if not os.path.lexists(path) or is_empty_folder(path):
        return False
    if path.is_dir() and not path.is_symlink() and recognise(path):
        return True
    raise InputError(path, f"exists and is not a {kind} made by hipseg; refusing to replace it "
                     "(--overwrite replaces only hipseg's own output): choose another destination")
