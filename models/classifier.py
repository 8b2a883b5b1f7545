"""BranchedTiny: the 40-attribute CelebA classifier MaskFaceGAN steers with.

A multi-task network (arXiv 1904.02920) whose trunk splits into branches stage by
stage. The original spells the wiring out in ~140 lines; here it is a table: each
stage lists, for every branch, the index of the branch it continues from in the
previous stage. State-dict keys match the original `state.pt`:
`conv_layers.<stage>.<branch>.<layer>` and `fc_layers.<stage>.<branch>.<layer>`.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

# the logits' order: the one table that maps attribute names to indices
from .celeba import ATTRIBUTE_INDEX, ATTRIBUTES  # noqa: F401

CELEBA_MEAN = (0.5061, 0.4254, 0.3828)
CELEBA_STD = (0.2661, 0.2453, 0.2413)
INPUT_SIZE = 224

# (stage name, layer plan, parent branch of each branch). "w" is a conv unit
# (3x3 conv, ReLU, BatchNorm), "M" a 2x2 max-pool.
CONV_STAGES = (
    ("01-06", "w w M w w M w w", (0,)),
    ("06-11", "w M w w w M w", (0, 0)),
    ("11-12", "w", (0, 0, 1)),
    ("12-13", "w M", (0, 0, 0, 0, 1, 1, 1, 1, 1, 2)),
)
# (stage name, output features or None for the 1-logit heads, parent of each branch)
FC_STAGES = (
    ("13-14", 128, (0, 1, 1, 1, 2, 2, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 8, 9)),
    ("14-15", 128, (0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 6, 7, 7, 7, 8, 8, 9, 9, 9, 10, 10, 11,
                    11, 11, 12, 13, 13, 14, 15, 16, 16, 17)),
    ("15-16", None, (0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7, 7, 8, 8, 8, 9, 10, 11, 12, 13, 14, 15,
                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 29, 30, 31, 32)),
)


def _conv_branch(plan: str, in_ch: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in plan.split():
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(width)]
            in_ch = width
    return nn.Sequential(*layers)


def _fc_branch(in_f: int, out_f: int | None) -> nn.Sequential:
    if out_f is None:
        return nn.Sequential(nn.Linear(in_f, 1))
    return nn.Sequential(nn.Linear(in_f, out_f), nn.ReLU(), nn.BatchNorm1d(out_f))


class BranchedTiny(nn.Module):
    """Input images [N, 3, H, W] in [0, 1]; output the 40 logits [N, 40] in ATTRIBUTES order.

    The input is area-resized to 224 whatever its size and normalised by the CelebA
    mean and std (buffers `celeba_mean`, `celeba_std`), as in the original.
    `width` is 64 for the real model; narrower widths serve tests.
    """

    def __init__(self, width: int = 64, fc_width: int = 128):
        super().__init__()
        self.register_buffer("celeba_mean", torch.tensor(CELEBA_MEAN).view(1, 3, 1, 1))
        self.register_buffer("celeba_std", torch.tensor(CELEBA_STD).view(1, 3, 1, 1))
        self.conv_layers = nn.ModuleDict()
        in_ch = 3
        for name, plan, parents in CONV_STAGES:
            self.conv_layers[name] = nn.ModuleList(_conv_branch(plan, in_ch, width) for _ in parents)
            in_ch = width
        self.fc_layers = nn.ModuleDict()
        in_f = width * 7 * 7
        for name, out_f, parents in FC_STAGES:
            self.fc_layers[name] = nn.ModuleList(_fc_branch(in_f, out_f) for _ in parents)
            in_f = out_f
        self.parents = {name: parents for name, _, parents in CONV_STAGES + FC_STAGES}

    @staticmethod
    def config_from_state_dict(state_dict) -> dict:
        try:
            return {"width": state_dict["conv_layers.01-06.0.0.weight"].shape[0],
                    "fc_width": state_dict["fc_layers.13-14.0.0.weight"].shape[0]}
        except KeyError as e:
            raise ValueError(f"not a BranchedTiny state dict: no key {e}") from None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        x = (x - self.celeba_mean) / self.celeba_std
        outs = [x]
        for name, branches in self.conv_layers.items():
            outs = [branch(outs[p]) for branch, p in zip(branches, self.parents[name])]
        outs = [o.flatten(1) for o in outs]
        for name, branches in self.fc_layers.items():
            outs = [branch(outs[p]) for branch, p in zip(branches, self.parents[name])]
        return torch.cat(outs, dim=1)
