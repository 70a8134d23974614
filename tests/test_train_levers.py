"""Training levers: explicit case lists, training on every case (final weights), EMA of weights."""

from __future__ import annotations

import json

import pytest
import torch

import hipseg.train as train_module
from hipseg.errors import ConfigError
from hipseg.store import open_store
from hipseg.train import BEST, TrainConfig, load_run, train

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "groups": 2}


def tiny_config(store, out, **changes) -> TrainConfig:
    settings = dict(store=str(store), out=str(out), model_options=TINY, batch_size=4, steps=8,
                    val_every=4, checkpoint_every=4, log_every=4, num_workers=0, seed=1)
    settings.update(changes)
    return TrainConfig(**settings)


def test_explicit_cases_replace_the_seeded_split(synth_store, tmp_path):
    ids = sorted(open_store(synth_store).case_ids)
    config = tiny_config(synth_store, tmp_path / "run", train_cases=ids[:6], val_cases=ids[6:8],
                         steps=2, val_every=2)
    train(config, progress=False)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["train"] == ids[:6] and split["val"] == ids[6:8]
    assert split["selection"] == "best" and (tmp_path / "run" / BEST).exists()
    assert TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text())) == config


@pytest.mark.parametrize("change, match", [
    ({"train_cases": ["a"]}, "both"),
    ({"train_cases": ["a", "b"], "val_cases": ["b"]}, "both train_cases and val_cases"),
    ({"train_cases": [], "val_cases": ["b"]}, "empty"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"edge_fraction": 1.5}, "edge_fraction"),
])
def test_bad_lever_settings_are_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(store="s", out="o", **change)


def test_unknown_explicit_cases_are_named(synth_store, tmp_path):
    config = tiny_config(synth_store, tmp_path / "run", train_cases=["nope_1"], val_cases=[])
    with pytest.raises(ConfigError, match="nope_1"):
        train(config, progress=False)


def test_val_fraction_0_trains_on_every_case_and_keeps_the_final_weights(synth_store, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(synth_store, out, val_fraction=0.0), progress=False)
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == sorted(open_store(synth_store).case_ids) and split["val"] == []
    assert split["selection"] == "final" and set(split["monitor"]) <= set(split["train"])
    assert result.selection == "final" and not (out / BEST).exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["held_out"] for r in rows if r["kind"] == "val"] == [False, False]
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in load_run(out).model.state_dict().items():
        assert torch.equal(tensor, final[name]), name


def test_ema_weights_are_saved_used_and_resumed_exactly(synth_store, tmp_path, monkeypatch):
    settings = dict(ema_decay=0.9, deterministic=True, steps=8)
    straight = train(tiny_config(synth_store, tmp_path / "straight", **settings), progress=False)

    original = train_module._slice_batches

    def crashing(*args, **kwargs):  # dies at step 6, after the checkpoint of step 4
        batches, loader = original(*args, **kwargs)

        def five_then_die():
            for _ in range(5):
                yield next(batches)
            raise RuntimeError("killed")

        return five_then_die(), loader

    monkeypatch.setattr(train_module, "_slice_batches", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(synth_store, tmp_path / "split", **settings), progress=False)
    monkeypatch.setattr(train_module, "_slice_batches", original)
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 4
    train(tiny_config(synth_store, tmp_path / "split", **settings), resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["ema_n_averaged"] == b["ema_n_averaged"] == 8
    for name in a["ema_model"]:
        assert torch.equal(a["ema_model"][name], b["ema_model"][name]), name
    # The average differs from the raw weights, and it is what the run's model is.
    assert any(not torch.equal(a["ema_model"][k], a["model"][k]) for k in a["model"])
    best = torch.load(tmp_path / "straight" / BEST, weights_only=True)
    assert best["step"] == straight.best_step
    for which, reference in (("last", a["ema_model"]), ("best", best["model"])):
        for name, tensor in load_run(tmp_path / "straight", which).model.state_dict().items():
            assert torch.equal(tensor, reference[name]), (which, name)


def test_edge_fraction_reaches_the_sampler(synth_store, tmp_path, monkeypatch):
    import hipseg.loader

    seen = {}
    original = hipseg.loader.SliceLoader.__init__

    def spy(self, *args, **kwargs):
        seen["sampler_config"] = kwargs["sampler_config"]
        original(self, *args, **kwargs)

    monkeypatch.setattr(hipseg.loader.SliceLoader, "__init__", spy)
    train(tiny_config(synth_store, tmp_path / "run", edge_fraction=0.7, steps=1), progress=False)
    assert seen["sampler_config"].edge_fraction == 0.7
