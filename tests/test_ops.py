import numpy as np
import pytest
import torch

from models.ops import fused_leaky_relu, make_kernel, upfirdn2d


def upfirdn_by_definition(x, k, up, down, pad):
    """Zero-insertion upsampling, padding, true 2-D convolution, subsampling, in NumPy."""
    x, k = x.numpy().astype(np.float64), k.numpy().astype(np.float64)
    n, c, h, w = x.shape
    z = np.zeros((n, c, h * up, w * up))
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, [(0, 0), (0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))])
    z = z[:, :, max(-p0, 0):z.shape[2] - max(-p1, 0), max(-p0, 0):z.shape[3] - max(-p1, 0)]
    kh, kw = k.shape
    oh, ow = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(kh):
        for j in range(kw):   # out[y, x] = sum k[i, j] * z[y + kh-1-i, x + kw-1-j]
            out += k[i, j] * z[:, :, kh - 1 - i:kh - 1 - i + oh, kw - 1 - j:kw - 1 - j + ow]
    return torch.from_numpy(out[:, :, ::down, ::down]).float()


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 2, (1, 2)), (1, 1, (-1, 2))])
def test_upfirdn2d_matches_the_definition(up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=g)
    k = torch.randn(4, 4, generator=g)          # asymmetric, so a missing flip shows
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = upfirdn_by_definition(x, k, up, down, pad)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_upfirdn2d_gradient():
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    k = make_kernel([1, 3, 3, 1], gain=4).double()
    assert torch.autograd.gradcheck(lambda t: upfirdn2d(t, k, up=2, pad=(2, 1)), (x,))


def test_make_kernel_is_normalised_outer_product():
    k = make_kernel([1, 3, 3, 1], gain=4)
    assert k.shape == (4, 4)
    assert k.sum().item() == pytest.approx(4.0)
    assert k[0, 0].item() == pytest.approx(4 / 64)


def test_fused_leaky_relu():
    x = torch.tensor([[[-1.0], [2.0]]]).view(1, 2, 1, 1)
    b = torch.tensor([0.5, -3.0])
    out = fused_leaky_relu(x, b).flatten()
    s = 2 ** 0.5
    torch.testing.assert_close(out, torch.tensor([-0.5 * 0.2 * s, -1.0 * 0.2 * s]))
    # 2-D input (the mapping network's linear layers)
    out2 = fused_leaky_relu(torch.tensor([[1.0, 1.0]]), b)
    torch.testing.assert_close(out2, torch.tensor([[1.5 * s, -2.0 * 0.2 * s]]))
