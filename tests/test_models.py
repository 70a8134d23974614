"""Models and losses: shapes, options, parameter and multiply-add counts against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hipseg.errors import ConfigError
from hipseg.losses import LOSSES, build_loss
from hipseg.models import (
    MODELS,
    build_model,
    count_macs,
    count_parameters,
    describe_models,
    format_model_table,
)

TINY = {"channels": (8, 16), "strides": (2,)}


@pytest.mark.parametrize("name", [n for n, s in MODELS.items() if s.spatial_dims == 2])
@pytest.mark.parametrize("context", [0, 2])
def test_2d_models_map_slices_to_class_logits(name, context):
    model = build_model(name, 2 * context + 1, 3, **TINY)
    out = model(torch.randn(2, 2 * context + 1, 32, 48))
    assert out.shape == (2, 3, 32, 48)
    assert count_parameters(model) > 0


def test_3d_model_maps_crops_to_class_logits():
    model = build_model("unet3d", 1, 3, **TINY)
    assert model(torch.randn(1, 1, 16, 32, 16)).shape == (1, 3, 16, 32, 16)


def test_group_norm_replaces_every_batch_norm():
    for name in MODELS:
        model = build_model(name, 1, 3, **TINY)
        kinds = {type(m) for m in model.modules()}
        assert nn.GroupNorm in kinds
        assert not kinds & {nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d}


def test_separable_option_makes_every_spatial_convolution_depthwise():
    model = build_model("unet", 4, 3, **TINY, separable=True)
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    assert spatial and all(m.groups == m.in_channels for m in spatial)
    plain = build_model("unet", 4, 3, **TINY)
    assert count_parameters(model) < count_parameters(plain)


def test_macs_of_a_single_convolution_match_the_formula():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert count_macs(conv, (3, 10, 12)) == 10 * 12 * 5 * 3 * 9
    up = nn.ConvTranspose2d(4, 2, kernel_size=2, stride=2)
    assert count_macs(up, (4, 6, 6)) == 6 * 6 * 4 * 2 * 4
    grouped = nn.Conv3d(4, 4, kernel_size=3, padding=1, groups=4)
    assert count_macs(grouped, (4, 5, 5, 5)) == 125 * 4 * 27


def test_macs_scale_with_input_area():
    model = build_model("unet", 1, 3, **TINY)
    assert count_macs(model, (1, 32, 32)) * 4 == count_macs(model, (1, 64, 64))


def test_describe_models_lists_every_model_with_positive_counts():
    rows = describe_models(slice_shape=(32, 32), roi_shape=(16, 32, 16))
    assert [r["model"] for r in rows] == list(MODELS)
    assert all(r["parameters"] > 0 and r["macs"] > 0 for r in rows)
    by_name = {r["model"]: r for r in rows}
    assert by_name["separable-unet"]["macs"] < by_name["unet"]["macs"]
    table = format_model_table(rows)
    assert all(name in table for name in MODELS)


@pytest.mark.parametrize("options", [{"channels": (8, 16, 32), "strides": (2,)}, {"bogus": 1}])
def test_inconsistent_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        build_model("unet", 1, 3, **options)


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="unet3d"):
        build_model("resnet", 1, 3)


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_near_zero_for_a_perfect_prediction_and_large_for_the_opposite(name):
    label = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    label[:, :, 4:8, 4:12] = 1
    label[:, :, 8:12, 4:12] = 2
    perfect = 20.0 * nn.functional.one_hot(label[:, 0], 3).permute(0, 3, 1, 2).float()
    wrong = 20.0 * nn.functional.one_hot((label[:, 0] + 1) % 3, 3).permute(0, 3, 1, 2).float()
    loss = build_loss(name)
    assert float(loss(perfect, label)) < 0.01
    assert float(loss(wrong, label)) > 0.9


def test_unknown_loss_is_a_config_error():
    with pytest.raises(ConfigError, match="dice_ce"):
        build_loss("l2")
