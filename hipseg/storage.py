"""Where stores live: local paths and fsspec URLs (``s3://``, ``gs://``, ``az://``, ``file://``, ...).

One code path for both, as in xarray's ``open_zarr``: a location stays a string from the
command line to Zarr, which opens URLs through its own ``FsspecStore``
(``zarr.open_group(url, storage_options=...)``). A URL never passes through
``pathlib.Path``: ``Path("s3://b/x")`` is the local folder ``s3:/b/x``.

Credentials and endpoints come from the standard environment of each filesystem
(for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or
from ``storage_options`` (the command line's ``--storage-options JSON``), which fsspec
passes to the filesystem (for S3, ``s3fs.S3FileSystem``'s arguments).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from hipseg.errors import ConfigError

# Packages fsspec needs per protocol, and the extra that installs them.
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs"}
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")

Location = str | Path


def is_url(location: Location) -> bool:
    """True for ``scheme://...`` strings (a Path is always local)."""
    return isinstance(location, str) and _URL.match(location) is not None


def protocol(location: Location) -> str:
    """The URL scheme (``"s3"``), or ``"file"`` for a local path."""
    match = _URL.match(location) if isinstance(location, str) else None
    return match.group(1).lower() if match else "file"


def normalise(location: Location) -> str:
    """A URL unchanged (trailing ``/`` dropped), a local path as a path string."""
    if is_url(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a URL or a local path, as a string (never through Path for URLs)."""
    if is_url(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def sibling(location: str, suffix: str) -> str:
    """The location with ``suffix`` appended to its last component (``x.zarr`` -> ``x.zarr.partial``)."""
    return normalise(location) + suffix


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` JSON to a dict; ConfigError naming the problem."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--storage-options is not valid JSON ({error}); "
                          """e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'""") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object of filesystem arguments")
    return value


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; a one-line error naming the missing package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(location, **(storage_options or {}))
    except ImportError as error:
        raise ConfigError(missing_package_message(location, error)) from None
    except ValueError as error:  # fsspec: unknown protocol
        raise ConfigError(f"{location}: {error}") from None


def missing_package_message(location: str, error: BaseException | None = None) -> str:
    scheme = protocol(location)
    package = _PACKAGES.get(scheme)
    if package == "s3fs":
        return f"{location}: {scheme}:// stores need s3fs: pip install 'hipseg[cloud]'"
    if package:
        return f"{location}: {scheme}:// stores need {package}: pip install {package}"
    return f"{location}: no filesystem for {scheme}:// ({error})"


def open_group(location: Location, mode: str, storage_options: dict[str, Any] | None = None,
               **kwargs: Any):
    """``zarr.open_group`` on a local path or a URL (through Zarr's FsspecStore)."""
    import zarr

    if not is_url(location):
        return zarr.open_group(str(location), mode=mode, **kwargs)
    try:
        return zarr.open_group(str(location), mode=mode, storage_options=storage_options or None,
                               **kwargs)
    except ImportError as error:
        raise ConfigError(missing_package_message(str(location), error)) from None


def exists(location: Location, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether anything is at ``location`` (a file, a folder, or an object prefix)."""
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location), storage_options)
    fs.invalidate_cache(path)  # another process (a Dask worker, a killed run) may have written since
    return bool(fs.exists(path))


def remove_tree(location: Location, storage_options: dict[str, Any] | None = None) -> None:
    """Delete ``location`` and everything under it; nothing if it does not exist."""
    if not is_url(location):
        import shutil

        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(str(location), storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_json(location: str, storage_options: dict[str, Any] | None = None) -> Any:
    if not is_url(location):
        return json.loads(Path(location).read_text())
    fs, path = filesystem(location, storage_options)
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path))


def write_json(location: str, data: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write JSON so that a reader sees the old object or the new one, never half of one.

    Locally: a temporary file, fsync, rename. At a URL: one PUT of the whole object,
    which object stores apply atomically.
    """
    payload = json.dumps(data).encode()
    if is_url(location):
        fs, path = filesystem(location, storage_options)
        fs.pipe_file(path, payload)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
