"""Segmentation networks from MONAI: the compact 2D/2.5D U-Net (default) and a 3D U-Net on crops.

Every model is a MONAI network with two hipseg-specific changes applied after
construction, so MONAI's own code paths stay untouched:

- group normalisation instead of batch/instance normalisation, because CPU
  training uses small batches of slices whose statistics vary a lot (many are
  background-only);
- optionally, depthwise-separable convolutions (a per-channel 3x3 followed by
  a 1x1 mixing convolution), which cut multiply-adds several-fold.

2.5D input (a slice and ``context`` neighbours on each side as channels) is the
same network with ``in_channels = 2 * context + 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.networks.nets import AttentionUnet, UNet
from torch import nn

from hipseg.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """A named model: spatial dimensions and the options it is built with by default."""

    name: str
    spatial_dims: int
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


# Channels (16, 32, 64, 128) with two residual units per level: measured on 2 CPU
# cores it trains at several steps/s on 32 slices of 48x64 while still reaching
# nnU-Net-like Dice on the real crops (docs/training.md has the numbers).
_UNET_2D = {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2, "groups": 8,
            "attention": False, "separable": False, "dropout": 0.0}

MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec("unet", 2, "compact 2D/2.5D U-Net, group norm, residual units (default)",
                      dict(_UNET_2D)),
    "attention-unet": ModelSpec("attention-unet", 2,
                                "2D U-Net with attention gates (MONAI AttentionUnet)",
                                {**_UNET_2D, "attention": True}),
    "separable-unet": ModelSpec("separable-unet", 2,
                                "2D U-Net with depthwise-separable convolutions",
                                {**_UNET_2D, "separable": True}),
    "unet3d": ModelSpec("unet3d", 3, "3D U-Net on whole ROI crops",
                        {**_UNET_2D, "channels": (8, 16, 32, 64)}),
}

OPTION_NAMES = ("channels", "strides", "num_res_units", "groups", "attention", "separable",
                "dropout")


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def resolve_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's defaults updated with ``options``; unknown option names are a ConfigError."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; known: {', '.join(OPTION_NAMES)}")
    resolved = {**model_spec(name).defaults, **options}
    resolved["channels"] = tuple(int(c) for c in resolved["channels"])
    resolved["strides"] = tuple(int(s) for s in resolved["strides"])
    if len(resolved["strides"]) != len(resolved["channels"]) - 1:
        raise ConfigError(f"model {name}: need one stride per level below the top: "
                          f"{len(resolved['channels'])} channels but "
                          f"{len(resolved['strides'])} strides")
    if int(resolved["groups"]) < 1 or min(resolved["channels"]) < 1:
        raise ConfigError(f"model {name}: groups and channels must be >= 1, got groups="
                          f"{resolved['groups']} and channels {resolved['channels']}")
    return resolved


def _group_count(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` not above ``groups`` (GroupNorm needs an exact division)."""
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _to_group_norm(module: nn.Module, groups: int) -> None:
    """Replace every batch/instance norm in ``module`` by a GroupNorm over the same channels."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    for name, child in module.named_children():
        if isinstance(child, norms):
            channels = child.num_features
            setattr(module, name, nn.GroupNorm(_group_count(channels, groups), channels))
        else:
            _to_group_norm(child, groups)


def _to_separable(module: nn.Module) -> None:
    """Replace every k>1 convolution by depthwise k x k followed by pointwise 1 x 1."""
    for name, child in module.named_children():
        if (isinstance(child, (nn.Conv2d, nn.Conv3d)) and child.groups == 1
                and max(child.kernel_size) > 1 and child.in_channels > 1):
            conv = type(child)
            depthwise = conv(child.in_channels, child.in_channels, child.kernel_size, child.stride,
                             child.padding, child.dilation, groups=child.in_channels, bias=False)
            pointwise = conv(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
            setattr(module, name, nn.Sequential(depthwise, pointwise))
        else:
            _to_separable(child)


def build_model(name: str, in_channels: int, out_channels: int, **options: Any) -> nn.Module:
    """Build model ``name`` (see :data:`MODELS`) for ``in_channels`` and ``out_channels`` classes.

    Parameters
    ----------
    name
        ``unet`` (default 2D), ``attention-unet``, ``separable-unet`` or ``unet3d``.
    in_channels
        1 for 2D and 3D; ``2 * context + 1`` for 2.5D.
    out_channels
        Number of classes including background (logits are returned).
    **options
        Overrides of the model's defaults: ``channels``, ``strides``, ``num_res_units``,
        ``groups`` (GroupNorm groups), ``attention``, ``separable``, ``dropout``.
    """
    if in_channels < 1 or out_channels < 2:
        raise ConfigError(f"model {name}: need in_channels >= 1 and out_channels >= 2, "
                          f"got {in_channels} and {out_channels}")
    spec = model_spec(name)
    o = resolve_options(name, options)
    if o["attention"]:
        model: nn.Module = AttentionUnet(spec.spatial_dims, in_channels, out_channels,
                                         channels=o["channels"], strides=o["strides"],
                                         dropout=float(o["dropout"]))
    else:
        model = UNet(spec.spatial_dims, in_channels, out_channels, channels=o["channels"],
                     strides=o["strides"], num_res_units=int(o["num_res_units"]),
                     norm="batch", dropout=float(o["dropout"]))
    # Built with batch norm, then swapped: MONAI's own "group" norm fails on layers whose
    # channel count (e.g. the 3 output classes) the group count does not divide.
    _to_group_norm(model, int(o["groups"]))
    if o["separable"]:
        _to_separable(model)
    return model


def spatial_dims(name: str) -> int:
    """2 for the slice models (``unet``, ``attention-unet``, ``separable-unet``), 3 for ``unet3d``.

    Raises
    ------
    ConfigError
        Unknown model name.
    """
    return model_spec(name).spatial_dims


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass on one sample of ``input_shape`` (C, *spatial).

    Counted with forward hooks on convolution and linear layers, which hold all but
    a negligible share of a U-Net's arithmetic (norms and activations are ignored).
    """
    total = 0

    def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            kernel = math.prod(layer.kernel_size)
            total += inputs[0][0].numel() * layer.out_channels // layer.groups * kernel
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kernel = math.prod(layer.kernel_size)
            total += output[0].numel() * layer.in_channels // layer.groups * kernel
        elif isinstance(layer, nn.Linear):
            total += output[0].numel() * layer.in_features

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return int(total)


def describe_models(
    slice_shape: Sequence[int] = (48, 64), roi_shape: Sequence[int] = (48, 64, 48),
    out_channels: int = 3, context: int = 0,
) -> list[dict[str, Any]]:
    """Parameter count and multiply-adds per sample of every model in :data:`MODELS`.

    2D models are measured on one slice of ``slice_shape`` with ``2 * context + 1``
    channels, the 3D model on one crop of ``roi_shape``.
    """
    rows = []
    for spec in MODELS.values():
        in_channels = 1 if spec.spatial_dims == 3 else 2 * context + 1
        model = build_model(spec.name, in_channels, out_channels)
        spatial = tuple(roi_shape) if spec.spatial_dims == 3 else tuple(slice_shape)
        rows.append({
            "model": spec.name, "dims": spec.spatial_dims, "input": [in_channels, *spatial],
            "parameters": count_parameters(model),
            "macs": count_macs(model, (in_channels, *spatial)),
            "description": spec.description,
        })
    return rows


def format_model_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':16s} {'input':>14s} {'parameters':>11s} {'MMACs/sample':>13s}  description"]
    for r in rows:
        shape = "x".join(str(s) for s in r["input"])
        lines.append(f"{r['model']:16s} {shape:>14s} {r['parameters']:>11,d} "
                     f"{r['macs'] / 1e6:>13.1f}  {r['description']}")
    return "\n".join(lines)
