"""Stores at s3:// URLs against a real S3 server on 127.0.0.1 (moto's server mode), started per module."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hipseg.convert import convert
from hipseg.errors import StoreError
from hipseg.store import open_store

s3fs = pytest.importorskip("s3fs", reason="s3fs is in the dev extra: pip install -e '.[dev]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

TINY = ["--channels", "4,8", "--strides", "2", "--res-units", "1", "--groups", "2"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback with a bucket; the standard AWS_* environment points at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("hippo")
    try:
        yield {"endpoint": endpoint, "fs": fs, "options": {"endpoint_url": endpoint, "key": "testing",
                                                          "secret": "testing"}}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _assert_same_store(reference, url, options=None):
    a, b = open_store(reference), open_store(url, options)
    assert a.case_ids == b.case_ids
    np.testing.assert_array_equal(a.labels[...], b.labels[...])
    np.testing.assert_array_equal(a.images[...], b.images[...])
    for axis in ("sagittal", "coronal", "axial"):
        np.testing.assert_array_equal(a.slice_table(axis), b.slice_table(axis))


@pytest.fixture(scope="module")
def s3_store(s3, synth_dataset, tmp_path_factory):
    """`hipseg convert DATA s3://hippo/synth.zarr` run from an empty folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    result = subprocess.run([sys.executable, "-m", "hipseg", "convert", str(synth_dataset),
                             "s3://hippo/synth.zarr", "--workers", "2", "--quiet"],
                            capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # nothing local: no 's3:' folder
    return "s3://hippo/synth.zarr"


def test_convert_puts_every_voxel_in_the_bucket(s3, s3_store, synth_store):
    assert s3["fs"].exists("hippo/synth.zarr/zarr.json")
    assert not s3["fs"].exists("hippo/synth.zarr.partial")
    _assert_same_store(synth_store, s3_store)


@pytest.mark.parametrize("cache", ["ram", "stream"])
def test_dataset_reads_the_bucket_like_the_local_store(s3_store, synth_store, cache):
    from hipseg.dataset import HippocampusSliceDataset

    remote = HippocampusSliceDataset(s3_store, augment=False, cache=cache, context=1)
    local = HippocampusSliceDataset(synth_store, augment=False, context=1)
    assert len(remote) == len(local)
    for i in range(len(local)):
        got, expected = remote[i], local[i]
        np.testing.assert_array_equal(got["label"].numpy(), expected["label"].numpy())
        np.testing.assert_array_equal(got["image"].numpy(), expected["image"].numpy())


def test_train_and_evaluate_from_the_bucket(s3, s3_store, synth_dataset, tmp_path):
    run = tmp_path / "run"
    options = json.dumps({"endpoint_url": s3["endpoint"]})
    result = subprocess.run([sys.executable, "-m", "hipseg", "train", s3_store, "--out", str(run),
                             "--steps", "4", "--batch-size", "4", "--threads", "1", "--workers", "2",
                             "--val-every", "4", "--quiet", "--storage-options", options, *TINY],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["store"] == s3_store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    result = subprocess.run([sys.executable, "-m", "hipseg", "evaluate", str(run), str(synth_dataset),
                             "--cases", "val", "--json", str(tmp_path / "eval.json"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_info_reads_the_bucket(s3, s3_store):
    result = subprocess.run([sys.executable, "-m", "hipseg", "info", s3_store], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "volumes=12" in result.stdout, result.stderr[-2000:]


def test_convert_on_a_cluster_of_worker_processes(s3, synth_dataset, synth_store):
    from distributed import LocalCluster

    url = "s3://hippo/cluster.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        report = convert(synth_dataset, url, scheduler=cluster.scheduler_address, progress=False,
                         storage_options=s3["options"], shard_volumes=2)
    assert report.path == url
    _assert_same_store(synth_store, url, s3["options"])


def test_kill_9_then_resume_in_the_bucket(s3, synth_dataset, synth_store):
    """A conversion to S3 is killed with SIGKILL mid-way: the store is not valid; rerunning finishes it."""
    url = "s3://hippo/killed.zarr"
    command = [
        sys.executable, "-c",
        "import time, hipseg.convert as c\n"
        "original = c.convert_block\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return original(*a, **k)\n"
        "c.convert_block = slow\n"
        f"c.convert({str(synth_dataset)!r}, {url!r}, workers=1, progress=False, shard_volumes=1)\n",
    ]
    process = subprocess.Popen(command)
    fs = s3["fs"]
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        fs.invalidate_cache()
        done = len(fs.glob("hippo/killed.zarr.partial/blocks/*.json"))
        if done >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 3 <= done < 12, "the conversion was not caught mid-way"
    with pytest.raises(StoreError, match="not a complete hipseg store"):
        open_store(url)
    report = convert(synth_dataset, url, workers=1, progress=False, shard_volumes=1)
    assert report.resumed_blocks >= 3 and report.n_volumes == 12
    _assert_same_store(synth_store, url)
    assert not fs.exists("hippo/killed.zarr.partial")


def test_existing_prefix_is_not_overwritten(s3, synth_dataset):
    s3["fs"].pipe_file("hippo/notes/readme.txt", b"keep me")
    with pytest.raises(StoreError, match="already exists"):
        convert(synth_dataset, "s3://hippo/notes", workers=1, progress=False)
    assert s3["fs"].cat_file("hippo/notes/readme.txt") == b"keep me"


@pytest.mark.parametrize(("url", "hint"), [("s3://bucket/x.zarr", "pip install 'hipseg[cloud]'"),
                                            ("gs://bucket/x.zarr", "pip install gcsfs")])
def test_missing_filesystem_package_is_one_line(tmp_path, url, hint):
    """Without the protocol's package: one line naming what to install, nothing created locally."""
    code = ("import sys\n"
            "sys.modules['s3fs'] = sys.modules['gcsfs'] = None  # as if not installed\n"
            "from hipseg.cli import main\n"
            f"sys.exit(main(['info', {url!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and hint in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []
