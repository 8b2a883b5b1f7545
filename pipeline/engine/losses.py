"""The loss terms of MaskFaceGAN. Each returns one value per image ([N])."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over C, H, W of mask * (x - y)^2."""
    return (mask * (x - y) ** 2).mean(dim=(1, 2, 3))


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor, weights: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """KL(q || p) of Bernoulli pairs [q, 1-q] vs [p, 1-p], averaged over the last dim.

    p, q: [N, A]. `weights` [N, A] (1 for a real entry, 0 for padding) averages each
    image over its own attributes only.
    """
    pd = torch.stack((p, 1 - p), dim=-1)
    qd = torch.stack((q, 1 - q), dim=-1)
    kl = F.kl_div(pd.log(), qd, reduction="none").sum(dim=-1)
    if weights is None:
        return kl.mean(dim=-1)
    return (kl * weights).sum(dim=-1) / weights.sum(dim=-1)


def portion(mask: torch.Tensor) -> torch.Tensor:
    """Share of the image a soft mask covers: [N, 1, H, W] -> [N, 1]."""
    return mask.sum(dim=(2, 3)) / (mask.shape[2] * mask.shape[3])


def shape_mse(region: torch.Tensor, shape_mask: torch.Tensor) -> torch.Tensor:
    """The seg loss: mean squared difference between the edit region the parser sees on
    the generated image and the shape mask, both [N, 1, P, P]."""
    return ((region - shape_mask) ** 2).mean(dim=(1, 2, 3))


def size_kl(now: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The size loss: KL between the edit region's share of the image now and its target
    share, [N, 1] each. A row with size 0 compares its share with itself, so its KL is
    0; the original also zeroes it by its weight, and so does the engine."""
    return bernoulli_kl(now, torch.where(sizes > 0, target, now.detach()))


def noise_regularize(noises: list[torch.Tensor]) -> torch.Tensor:
    """StyleGAN2 projector's noise autocorrelation penalty over a pyramid down to 8 px."""
    loss = noises[0].new_zeros(noises[0].shape[0])     # adding to 0.0 is exact
    for noise in noises:
        size = noise.shape[2]
        while True:
            loss = (loss
                    + (noise * torch.roll(noise, shifts=1, dims=3)).mean(dim=(1, 2, 3)).pow(2)
                    + (noise * torch.roll(noise, shifts=1, dims=2)).mean(dim=(1, 2, 3)).pow(2))
            if size <= 8:
                break
            noise = noise.reshape(-1, 1, size // 2, 2, size // 2, 2).mean(dim=(3, 5))
            size //= 2
    return loss


def noise_normalize_(noises: list[torch.Tensor]) -> None:
    """Zero mean, unit std per map, in place through .data (as the original, which lets
    the pending backward of the regulariser see the normalised values)."""
    with torch.no_grad():
        for noise in noises:
            mean = noise.mean(dim=(1, 2, 3), keepdim=True)
            std = noise.std(dim=(1, 2, 3), keepdim=True)
            noise.data.add_(-mean).div_(std)
