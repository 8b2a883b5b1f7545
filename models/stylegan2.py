"""StyleGAN2 generator in rosinality's PyTorch layout (`stylegan2-ffhq-config-f.pt`).

The module tree reproduces rosinality's state-dict keys exactly (`style.N`, `input.input`,
`conv1`, `to_rgb1`, `convs.N`, `to_rgbs.N`, `noises.noise_N`), so its checkpoints load
with strict keys. The forward pass is the W+ synthesis the editing engine needs:

    images = generator(latent, noises)   # latent [N, n_latent, style_dim]

Modulated convolutions use the non-fused form (scale the input by the style, convolve
with the shared weight, demodulate the output). It is mathematically the same as the
per-sample grouped convolution and much cheaper per image when batched on CPU.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Mapping

import torch
from torch import nn
import torch.nn.functional as F

from .ops import fused_leaky_relu, make_kernel, upfirdn2d

BLUR_TAPS = (1, 3, 3, 1)


def standard_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """Feature maps per resolution of the official configs (config-f: multiplier 2)."""
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier,
            128: 128 * channel_multiplier, 256: 64 * channel_multiplier,
            512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored as randn / lr_mul."""

    def __init__(self, in_dim, out_dim, bias_init=0.0, lr_mul=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x):
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class Blur(nn.Module):
    def __init__(self, pad, upsample_factor=1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(BLUR_TAPS, gain=upsample_factor ** 2))
        self.pad = pad

    def forward(self, x):
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, factor=2):
        super().__init__()
        self.register_buffer("kernel", make_kernel(BLUR_TAPS, gain=factor ** 2))
        self.factor = factor
        p = len(BLUR_TAPS) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, demodulate=True,
                 upsample=False):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_channel, out_channel, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = len(BLUR_TAPS) - factor - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1.0)

    def forward(self, x, style):
        batch = x.shape[0]
        style = self.modulation(style)                              # [N, in]
        weight = self.scale * self.weight[0]                        # [out, in, k, k]
        x = x * style.view(batch, self.in_channel, 1, 1)
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
            out = self.blur(out)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            w2 = weight.square().sum(dim=(2, 3))                    # [out, in]
            demod = torch.rsqrt(style.square() @ w2.t() + 1e-8)     # [N, out]
            out = out * demod.view(batch, self.out_channel, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise):
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return fused_leaky_relu(x, self.bias)


class ConstantInput(nn.Module):
    def __init__(self, channels, size=4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch):
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, style_dim, upsample=False):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x, style, noise):
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    def __init__(self, in_channel, style_dim, upsample=True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x, style, skip=None):
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """StyleGAN2 synthesis + mapping networks (rosinality layout, `g_ema`).

    Args:
        size: output resolution (a power of two, >= 8).
        style_dim: width of z, w and every style vector (512 for the official models).
        n_mlp: depth of the mapping network (8).
        channel_multiplier: 2 for config-f; selects the standard channel table.
        channels: explicit {resolution: feature maps}, overriding the standard table
            (narrow test generators use it; `config_from_state_dict` infers it).
        lr_mlp: learning-rate multiplier of the mapping network (0.01).
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8,
                 channel_multiplier: int = 2, channels: Mapping[int, int] | None = None,
                 lr_mlp: float = 0.01):
        super().__init__()
        log_size = int(math.log2(size))
        if size < 8 or 2 ** log_size != size:
            raise ValueError(f"generator size must be a power of two >= 8, got {size}")
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.channels = dict(channels) if channels else standard_channels(channel_multiplier)
        missing = [2 ** i for i in range(2, log_size + 1) if 2 ** i not in self.channels]
        if missing:
            raise ValueError(f"channels has no entry for resolutions {missing}")

        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)])

        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.num_layers = (log_size - 2) * 2 + 1
        self.n_latent = log_size * 2 - 2

        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept so the module tree matches rosinality's
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        in_ch = ch[4]
        for i in range(3, log_size + 1):
            out_ch = ch[2 ** i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch

    @staticmethod
    def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Constructor arguments that reproduce the shapes of a `g_ema` state dict."""
        try:
            n_mlp = sum(1 for k in state_dict if re.fullmatch(r"style\.\d+\.weight", k))
            style_dim = state_dict["style.1.weight"].shape[1]
            n_rgbs = sum(1 for k in state_dict if re.fullmatch(r"to_rgbs\.\d+\.bias", k))
            size = 2 ** (n_rgbs + 2)
            channels = {4: state_dict["input.input"].shape[1]}
            for i in range(n_rgbs):
                channels[2 ** (i + 3)] = state_dict[f"convs.{2 * i}.conv.weight"].shape[1]
        except KeyError as e:
            raise ValueError(f"not a StyleGAN2 g_ema state dict: no key {e}") from None
        if n_mlp == 0 or n_rgbs == 0:
            raise ValueError("not a StyleGAN2 g_ema state dict: no mapping or synthesis layers")
        return {"size": size, "style_dim": style_dim, "n_mlp": n_mlp, "channels": channels}

    def noise_shapes(self) -> list[tuple[int, int, int]]:
        """Per-image shape [1, r, r] of each of the `num_layers` noise maps."""
        return [tuple(getattr(self.noises, f"noise_{i}").shape[1:]) for i in range(self.num_layers)]

    def make_noise(self, batch: int, kind: str = "zeros",
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Noise maps [batch, 1, r, r] on the model's device: zeros, or N(0,1) from `generator`."""
        device = self.input.input.device
        if kind == "zeros":
            return [torch.zeros(batch, *s, device=device) for s in self.noise_shapes()]
        if kind == "randn":
            return [torch.randn(batch, *s, generator=generator).to(device) for s in self.noise_shapes()]
        raise ValueError(f"noise kind must be 'zeros' or 'randn', got {kind!r}")

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, style_dim] -> w [N, style_dim]."""
        return self.style(z)

    def forward(self, latent: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
        """Synthesise images from a W+ latent.

        latent: [N, n_latent, style_dim]; noises: `num_layers` maps [N or 1, 1, r, r].
        Returns x * 0.5 + 0.5 unclamped ([N, 3, size, size], roughly in [0, 1]): clamping
        would change the gradients, so it happens only when an image is written.
        """
        if latent.ndim != 3 or latent.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(f"latent must be [N, {self.n_latent}, {self.style_dim}], "
                             f"got {list(latent.shape)}")
        if len(noises) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} noise maps, got {len(noises)}")
        out = self.input(latent.shape[0])
        out = self.conv1(out, latent[:, 0], noises[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for up_conv, conv, noise1, noise2, to_rgb in zip(
                self.convs[::2], self.convs[1::2], noises[1::2], noises[2::2], self.to_rgbs):
            out = up_conv(out, latent[:, i], noise1)
            out = conv(out, latent[:, i + 1], noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip * 0.5 + 0.5


@torch.no_grad()
def compute_mean_latent(generator: Generator, n: int = 50_000, seed: int = 0,
                        chunk: int = 10_000) -> torch.Tensor:
    """Average of the mapping network over `n` z ~ N(0, I) drawn on CPU from `seed`.

    Runs on CPU so the result is bit-identical on every node whatever its accelerator.
    Returns [style_dim].
    """
    z = torch.randn(n, generator.style_dim, generator=torch.Generator().manual_seed(seed))
    mapping = copy.deepcopy(generator.style).to("cpu", torch.float32)
    total = torch.zeros(generator.style_dim, dtype=torch.float64)
    for start in range(0, n, chunk):
        total += mapping(z[start:start + chunk]).double().sum(0)
    return (total / n).float()
