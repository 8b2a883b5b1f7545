"""LPIPS's channel normalisation (models/lpips_masked.py); the distance itself against the
`lpips` package is tests/test_lpips.py's."""
import torch

from models.lpips_masked import normalize_channels


def test_channels_are_normalised_per_pixel_and_zeros_stay_finite():
    x = torch.randn(2, 8, 5, 5)
    x[0, :, 0, 0] = 0
    y = normalize_channels(x)
    norms = y.pow(2).sum(dim=1).sqrt()
    assert torch.isfinite(y).all() and norms[0, 0, 0] == 0
    torch.testing.assert_close(norms.flatten()[1:], torch.ones(49), rtol=0,
                               atol=1e-5)
