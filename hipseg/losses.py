"""Segmentation losses: MONAI's Dice, Dice + cross-entropy (default) and Dice + focal.

All take logits (B, K, *spatial) and integer labels (B, 1, *spatial). The Dice
part ignores the background class and is computed over the whole batch
(``batch=True``) rather than per sample: a batch of 2D slices holds many
slices with no hippocampus, whose per-sample Dice is undefined and only adds
noise (nnU-Net's "batch Dice" for 2D training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.losses import DiceCELoss, DiceLoss, FocalLoss
from torch import nn

from hipseg.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_COMMON = {"to_onehot_y": True, "softmax": True, "include_background": False, "batch": True}



class DiceSoftmaxFocalLoss(nn.Module):
    """MONAI's DiceLoss plus MONAI's FocalLoss with softmax.

    Not ``monai.losses.DiceFocalLoss``: its focal term applies a sigmoid per class,
    which treats the classes as independent labels; here they are mutually
    exclusive, as for cross-entropy.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.dice = DiceLoss(**_COMMON)
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, label) + self.focal(logits, label)


LOSSES: dict[str, Callable[[], LossFn]] = {
    "dice": lambda: DiceLoss(**_COMMON),
    "dice_ce": lambda: DiceCELoss(**_COMMON),
    "dice_focal": lambda: DiceSoftmaxFocalLoss(),
}


def build_loss(name: str = "dice_ce") -> LossFn:
    """The loss called ``name``: ``dice``, ``dice_ce`` (default) or ``dice_focal``."""
    try:
        return LOSSES[name]()
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None
