"""e4e encoder (Encoder4Editing, IR-SE-50): an image -> an initial W+ latent.

MaskFaceGAN starts global edits from e4e's prediction. The module tree reproduces the
original `encoder_state_dict` keys (`input_layer`, `body.N`, `styles.N`, `latlayer1/2`).
Widths are arguments so tests can build narrow variants with the same key names.

The original checkpoint is a dict: `options` (an object read by attribute, e.g.
`options.stylegan_size`), `encoder_state_dict` and `latent_avg` [n_latent, 512].
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn
import torch.nn.functional as F

from .stylegan2 import EqualLinear

# The one Python type an e4e checkpoint stores besides tensors: the training options.
E4E_OPTIONS_TYPE = argparse.Namespace
INPUT_SIZE = 256
# units per stage for each depth of the IR-SE backbone
UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
COARSE_IND, MIDDLE_IND = 3, 7


class SEModule(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_channel, depth, stride):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """Stride-2 convs down to 1x1, then an equalised linear layer -> one style vector."""

    def __init__(self, in_c, out_c, spatial):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, 3, stride=2, padding=1),
                       nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)
        self.out_c = out_c

    def forward(self, x):
        return self.linear(self.convs(x).view(-1, self.out_c))


class Encoder4Editing(nn.Module):
    """[N, 3, 256, 256] in [-1, 1] -> W+ offsets [N, n_latent, style_dim] (add latent_avg).

    Args:
        stylegan_size: resolution of the generator it serves (1024 -> 18 styles).
        num_layers: backbone depth, 50 (the original), 100 or 152.
        widths: channels of the four backbone stages (64, 128, 256, 512).
        style_dim: width of a style vector (512).
    """

    def __init__(self, stylegan_size: int = 1024, num_layers: int = 50,
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512), style_dim: int = 512):
        super().__init__()
        if num_layers not in UNITS:
            raise ValueError(f"num_layers must be one of {sorted(UNITS)}, got {num_layers}")
        self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                         nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        blocks, in_ch = [], widths[0]
        for depth, units in zip(widths, UNITS[num_layers]):
            for u in range(units):
                blocks.append(BottleneckIRSE(in_ch, depth, 2 if u == 0 else 1))
                in_ch = depth
        self.body = nn.Sequential(*blocks)
        ends = [sum(UNITS[num_layers][:k + 1]) - 1 for k in range(4)]
        self.c1_index, self.c2_index = ends[1], ends[2]   # taps for the FPN features

        self.style_count = 2 * int(math.log2(stylegan_size)) - 2
        self.styles = nn.ModuleList(
            GradualStyleBlock(widths[3], style_dim,
                              16 if i < COARSE_IND else 32 if i < MIDDLE_IND else 64)
            for i in range(self.style_count))
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], 1)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], 1)

    @staticmethod
    def config_from_state_dict(state_dict, stylegan_size: int) -> dict:
        try:
            n_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("body.")})
            depth = {sum(u): d for d, u in UNITS.items()}.get(n_blocks)
            if depth is None:
                raise ValueError(f"not an IR-SE 50/100/152 backbone: {n_blocks} body blocks")
            units = UNITS[depth]
            firsts = [sum(units[:k]) for k in range(4)]
            widths = tuple(state_dict[f"body.{i}.res_layer.1.weight"].shape[0] for i in firsts)
            style_dim = state_dict["styles.0.linear.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"not an Encoder4Editing state dict: no key {e}") from None
        return {"stylegan_size": stylegan_size, "num_layers": depth, "widths": widths,
                "style_dim": style_dim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        for i, block in enumerate(self.body):
            x = block(x)
            if i == self.c1_index:
                c1 = x
            elif i == self.c2_index:
                c2 = x
        c3 = x
        w = self.styles[0](c3).unsqueeze(1).repeat(1, self.style_count, 1)
        features = c3
        deltas = [torch.zeros_like(w[:, 0])]
        for i in range(1, self.style_count):
            if i == COARSE_IND:
                features = p2 = _upsample_add(c3, self.latlayer1(c2))
            elif i == MIDDLE_IND:
                features = _upsample_add(p2, self.latlayer2(c1))
            deltas.append(self.styles[i](features))
        return w + torch.stack(deltas, dim=1)


def _upsample_add(x, y):
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class E4EInitializer(nn.Module):
    """Images [N, 3, H, W] in [0, 1] -> W+ latents [N, n_latent, style_dim].

    Normalises to [-1, 1], area-resizes to 256 when needed, encodes and adds
    `latent_avg` (a buffer, from the checkpoint), as the original's wrapper does.
    """

    def __init__(self, encoder: Encoder4Editing):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("latent_avg", torch.zeros(encoder.style_count,
                                                       encoder.styles[0].out_c))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        return self.encoder(x) + self.latent_avg
