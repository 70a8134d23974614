"""hipseg: high-throughput hippocampus segmentation training on MRI."""

from __future__ import annotations

__version__ = "0.1.0"

from hipseg.errors import HipsegError
from hipseg.store import HippocampusStore, open_store

__all__ = ["HipsegError", "HippocampusStore", "open_store", "HippocampusSliceDataset",
           "HippocampusPatchDataset", "convert"]


def __getattr__(name: str):
    # Lazy so that `import hipseg` (e.g. in a spawned worker) stays cheap.
    if name == "HippocampusSliceDataset":
        from hipseg.dataset import HippocampusSliceDataset

        return HippocampusSliceDataset
    if name == "HippocampusPatchDataset":
        from hipseg.patches import HippocampusPatchDataset

        return HippocampusPatchDataset
    if name == "convert":
        from hipseg.convert import convert

        return convert
    raise AttributeError(f"module 'hipseg' has no attribute {name!r}")
