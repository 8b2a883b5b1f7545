"""GPU paths against their CPU reference. Skipped on machines without CUDA."""
import pytest
import torch

from models.ops import make_kernel, upfirdn2d
from models.tiny import tiny_generator

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytestmark = [pytest.mark.gpu, cuda]


def test_upfirdn2d_on_cuda_matches_cpu():
    x = torch.randn(2, 8, 16, 16)
    k = make_kernel([1, 3, 3, 1], gain=4)
    want = upfirdn2d(x, k, up=2, pad=(2, 1))
    got = upfirdn2d(x.cuda(), k.cuda(), up=2, pad=(2, 1)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def no_tf32():
    """TF32 convolutions would differ from the CPU by ~1e-3 for reasons not ours."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_generator_on_cuda_matches_cpu(no_tf32):
    torch.manual_seed(0)
    g = tiny_generator(64, style_dim=32).eval()
    latent = torch.randn(2, g.n_latent, 32)
    noise = g.make_noise(2, "randn", torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = g(latent, noise)
        g = g.cuda()
        got = g(latent.cuda(), [n.cuda() for n in noise]).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
