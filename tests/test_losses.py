"""Each loss term alone, per image, against values worked out by hand."""
import math

import torch

from pipeline.engine.losses import (bernoulli_kl, masked_mse, noise_normalize_, noise_regularize,
                                    portion, shape_mse, size_kl)


def test_masked_mse_is_per_image_and_ignores_what_the_mask_hides():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0] = 2.0
    y[1, :, :2] = 1.0                       # differs only where the mask is 0
    mask = torch.ones(2, 1, 4, 4)
    mask[1, :, :2] = 0
    torch.testing.assert_close(masked_mse(x, y, mask), torch.tensor([4.0, 0.0]))


def test_bernoulli_kl_matches_the_formula_and_skips_padding():
    p = torch.tensor([[0.8, 0.3]])
    q = torch.tensor([[0.95, 0.5]])
    kl = lambda q, p: q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))  # noqa: E731
    want = (kl(0.95, 0.8) + kl(0.5, 0.3)) / 2
    assert abs(bernoulli_kl(p, q).item() - want) < 1e-6
    padded = bernoulli_kl(p, q, torch.tensor([[1.0, 0.0]]))
    assert abs(padded.item() - kl(0.95, 0.8)) < 1e-6
    assert bernoulli_kl(q, q).abs().max() < 1e-7


def test_portion_shape_mse_and_size_kl():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0
    torch.testing.assert_close(portion(mask), torch.tensor([[0.5], [0.0]]))
    torch.testing.assert_close(shape_mse(mask, torch.zeros_like(mask)), torch.tensor([0.5, 0.0]))
    now = torch.tensor([[0.2], [0.2]], requires_grad=True)
    target = torch.tensor([[0.4], [0.4]])
    loss = size_kl(now, target, sizes=torch.tensor([[2.0], [0.0]]))
    assert loss[0] > 0 and loss[1].abs() < 1e-7        # a size-0 row has no size loss
    loss.sum().backward()
    assert now.grad[0] < 0 and now.grad[1].abs() < 1e-6  # pushes row 0's share up, not row 1's


def test_noise_regulariser_sees_correlation_and_normalising_standardises():
    smooth = torch.ones(1, 1, 16, 16)
    white = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert noise_regularize([smooth]).item() > 10 * noise_regularize([white]).item()
    maps = [torch.randn(2, 1, 8, 8) * 3 + 1, torch.randn(2, 1, 16, 16) - 2]
    noise_normalize_(maps)
    for m in maps:
        torch.testing.assert_close(m.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(m.std(dim=(1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
