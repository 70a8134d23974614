"""Where training runs: the torch device, and how many loader workers this machine affords."""

from __future__ import annotations

import os

import torch

from hipseg.errors import ConfigError


def default_workers() -> int:
    """Loader worker processes when none are asked for: none on a machine of 2 cores or fewer.

    There torch's two compute threads already fill the cores, and a worker process
    competing with them slowed training more than building each batch in-process costs
    (docs/training.md has the paired measurements); with more cores, two workers keep
    batch building off the training path.
    """
    return 0 if (os.cpu_count() or 1) <= 2 else 2


def resolve_device(name: str) -> torch.device:
    """The torch device named on the command line.

    Parameters
    ----------
    name
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (any name ``torch.device`` accepts), or ``"auto"``:
        CUDA when available, else CPU.

    Raises
    ------
    ConfigError
        An unknown name, or a CUDA device asked for where CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r} ({error}); "
                          "use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device

