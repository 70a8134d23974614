"""torchrun data-parallel training: two gloo processes on loopback, one writer, ranks in sync."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hipseg.distributed import weights_digest
from hipseg.runs import load_run

TINY = ["--channels", "4,8", "--strides", "2", "--res-units", "1", "--groups", "2"]
# A constant learning rate: a run of 3 steps resumed to 6 then sees the same rates as a run of 6.
FLAGS = ["--threads", "1", "--batch-size", "4", "--val-every", "3", "--log-every", "2",
         "--checkpoint-every", "3", "--schedule", "constant", "--quiet", *TINY]


def _torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hipseg", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(synth_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _torchrun("train", str(synth_store), "--out", str(out), "--steps", "6", *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_ranks_train_with_one_writer(ddp_run):
    out, result = ddp_run
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Two writers would log every step twice.
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 2), ("val", 3), ("train", 4), ("train", 6), ("val", 6)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "checkpoint.pt", "config.json", "curve.png", "metrics.jsonl", "run.json", "split.json"])
    assert result.stdout.count("steps in") == 1  # rank 0 alone reports


def test_both_ranks_end_with_identical_weights(ddp_run):
    out, _ = ddp_run
    summary = json.loads((out / "run.json").read_text())
    rank0, rank1 = summary["weights_sha256"]
    assert rank0 == rank1
    # The digest is of the weights actually saved, not of something else.
    assert weights_digest(load_run(out, "last").model) == rank0


def test_resume_with_another_world_size_stops_clearly(ddp_run, tmp_path):
    import shutil

    from hipseg.errors import ConfigError
    from hipseg.train import build_config, train

    out = tmp_path / "copy"
    shutil.copytree(ddp_run[0], out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "out": str(out)}))
    before = (out / "config.json").read_text()
    with pytest.raises(ConfigError, match="trained with world_size 2, resumed with 1"):
        train(build_config(None, out, resume=True, steps=8), resume=True, progress=False)
    assert (out / "config.json").read_text() == before  # refused before anything was written


def test_ddp_run_evaluates(ddp_run, synth_dataset, tmp_path):
    from hipseg.evaluate import evaluate

    doc = evaluate(ddp_run[0], synth_dataset, cases="val", json_out=tmp_path / "eval.json",
                   progress=False)
    assert doc["n_cases"] >= 1 and (tmp_path / "eval.json").exists()


def test_resume_with_the_same_world_size_is_exact(ddp_run, synth_store, tmp_path):
    """3 steps, then --resume to 6: both ranks end with the uninterrupted run's weights."""
    out = tmp_path / "resumed"
    first = _torchrun("train", str(synth_store), "--out", str(out), "--steps", "3", *FLAGS)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun("train", "--out", str(out), "--resume", "--steps", "6", "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads((out / "run.json").read_text())
    reference = json.loads((ddp_run[0] / "run.json").read_text())
    assert resumed["steps"] == 6 and resumed["world_size"] == 2
    assert resumed["weights_sha256"] == reference["weights_sha256"]
