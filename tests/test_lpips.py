import lpips
import pytest
import torch
import torch.nn.functional as F

from models.loaders import load_lpips
from models.spec import WeightRef


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return load_lpips(WeightRef(str(tiny_dir / "vgg16_features.pth"))).module


@pytest.fixture(scope="module")
def package_lpips(ours):
    """The lpips package's own LPIPS-VGG v0.1, given the same trunk weights as ours."""
    ref = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    slices = [(1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)),
              (5, range(23, 30))]
    trunk = ours.features.state_dict()
    mapped = {f"net.slice{s}.{k}": v for k, v in trunk.items()
              for s, idx in slices if int(k.split(".")[0]) in idx}
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert not unexpected and all(not m.startswith("net.") for m in missing)
    return ref


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


def test_unmasked_equals_the_lpips_package(ours, package_lpips):
    x, y = images()
    with torch.no_grad():
        want = package_lpips(x, y, normalize=True).flatten()
        got = ours(x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours(x, y, torch.ones(2, 1, 64, 64)), got)


def test_masked_equals_the_originals_layer_by_layer_recipe(ours, package_lpips):
    """MaskFaceGAN's variant: squared feature difference times the area-resized mask,
    1x1 linear layer, mean over the whole map, summed over layers."""
    x, y = images(seed=1)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 8:40, 16:48] = 1
    mask[1, :, 32:, :] = 0.5
    with torch.no_grad():
        fx = package_lpips.net.forward(package_lpips.scaling_layer(2 * x - 1))
        fy = package_lpips.net.forward(package_lpips.scaling_layer(2 * y - 1))
        want = 0
        m = mask
        for k in range(5):
            d = (lpips.normalize_tensor(fx[k]) - lpips.normalize_tensor(fy[k])) ** 2
            m = F.interpolate(m, size=d.shape[-2:], mode="area")
            want = want + package_lpips.lins[k](d * m).mean(dim=(1, 2, 3))
        got = ours(x, y, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert (ours(x, y, torch.zeros_like(mask)) == 0).all()


def test_per_image_values_do_not_depend_on_the_batch(ours):
    x, y = images(n=3, seed=2)
    mask = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        batch = ours(x, y, mask)
        alone = ours(x[1:2], y[1:2], mask[1:2])
        cached = ours(x, y, mask, y_features=ours.layer_features(y))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(cached, batch)
