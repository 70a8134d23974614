"""Error hierarchy: every hipseg error is also the matching built-in, so callers can catch either."""

from __future__ import annotations


class HipsegError(Exception):
    """Base of all hipseg errors."""


class InputError(HipsegError, ValueError):
    """A source file or folder is unusable; the message names it and says what is wrong."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class MissingInputError(InputError, FileNotFoundError):
    """A file the input refers to does not exist (an image without a label, and the like)."""


class StoreError(HipsegError, ValueError):
    """A Zarr store is missing, incomplete, or of an unsupported format version."""


class StoreExistsError(StoreError, FileExistsError):
    """The destination store exists already and overwriting was not asked for."""


class ConfigError(HipsegError, ValueError):
    """A configuration value is out of range or inconsistent with the store."""


class SkippedCasesError(HipsegError, RuntimeError):
    """Conversion finished but skipped bad cases (raised unless skipping was allowed)."""

    def __init__(self, skipped: list[dict]) -> None:
        self.skipped = skipped
        super().__init__(
            f"{len(skipped)} case(s) skipped: " + "; ".join(f"{s['case']}: {s['reason']}" for s in skipped)
        )


class WorkerError(HipsegError, RuntimeError):
    """A loader worker failed; the original exception is chained as the cause."""
