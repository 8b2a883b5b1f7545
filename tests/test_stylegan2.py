import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import FIDELITY, read_listing, shapes_of
from models.face_parser import region_masks
from models.loaders import load_face_parser, load_generator, mean_latent
from models.spec import MeanLatent, WeightRef
from models.stylegan2 import Generator, ModulatedConv2d, compute_mean_latent
from models.tiny import tiny_generator


@pytest.mark.parametrize("listing,kwargs", [
    ("stylegan2_g_ema_1024_config-f.tsv", dict(size=1024, channel_multiplier=2)),
    ("stylegan2_g_ema_64_cm1.tsv", dict(size=64, channel_multiplier=1)),
])
def test_full_width_keys_and_shapes_match_the_original(listing, kwargs):
    g = Generator(**kwargs)
    assert shapes_of(g.state_dict()) == read_listing(listing)


def test_config_is_inferred_from_a_state_dict():
    g = Generator(size=64, channel_multiplier=1)
    cfg = Generator.config_from_state_dict(g.state_dict())
    assert cfg["size"] == 64 and cfg["style_dim"] == 512 and cfg["n_mlp"] == 8
    assert cfg["channels"] == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256}
    narrow = tiny_generator(32, style_dim=32)
    cfg = Generator.config_from_state_dict(narrow.state_dict())
    assert Generator(**cfg).state_dict().keys() == narrow.state_dict().keys()
    assert cfg["size"] == 32 and cfg["style_dim"] == 32


@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes_at_two_resolutions(size):
    torch.manual_seed(0)
    g = tiny_generator(size, style_dim=32).eval()
    assert g.n_latent == 2 * int(np.log2(size)) - 2
    latent = torch.randn(3, g.n_latent, 32)
    with torch.no_grad():
        img = g(latent, g.make_noise(3, "randn", torch.Generator().manual_seed(1)))
    assert img.shape == (3, 3, size, size)
    assert torch.isfinite(img).all()
    with pytest.raises(ValueError, match="latent must be"):
        g(latent[:, :-1], g.make_noise(3))


def grouped_modulated_conv(mc: ModulatedConv2d, x, style):
    """rosinality's fused form: per-sample weights and a grouped convolution."""
    b, in_c, h, w = x.shape
    s = mc.modulation(style).view(b, 1, in_c, 1, 1)
    weight = mc.scale * mc.weight * s
    if mc.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, -1, 1, 1, 1)
    k = mc.kernel_size
    if mc.upsample:
        weight = weight.transpose(1, 2).reshape(b * in_c, mc.out_channel, k, k)
        out = F.conv_transpose2d(x.reshape(1, b * in_c, h, w), weight, stride=2, groups=b)
        return mc.blur(out.view(b, mc.out_channel, *out.shape[-2:]))
    weight = weight.view(b * mc.out_channel, in_c, k, k)
    out = F.conv2d(x.reshape(1, b * in_c, h, w), weight, padding=mc.padding, groups=b)
    return out.view(b, mc.out_channel, h, w)


@pytest.mark.parametrize("upsample,demodulate,k", [(False, True, 3), (True, True, 3),
                                                   (False, False, 1)])
def test_modulated_conv_equals_the_grouped_form(upsample, demodulate, k):
    torch.manual_seed(0)
    mc = ModulatedConv2d(6, 5, k, 8, demodulate=demodulate, upsample=upsample)
    x, style = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    torch.testing.assert_close(mc(x, style), grouped_modulated_conv(mc, x, style),
                               rtol=1e-4, atol=1e-5)


def test_an_image_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    g = tiny_generator(32, style_dim=32).eval()
    latent = torch.randn(4, g.n_latent, 32)
    noise = g.make_noise(4, "randn", torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = g(latent, noise)
        alone = g(latent[2:3], [n[2:3] for n in noise])
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-5, atol=1e-5)


def test_mean_latent_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    g = tiny_generator(32, style_dim=32)
    a = compute_mean_latent(g, n=3000, seed=7)
    b = compute_mean_latent(g, n=3000, seed=7, chunk=1000)
    c = compute_mean_latent(g, n=3000, seed=8)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a, c)
    assert a.shape == (32,)


def test_mean_latent_cache_is_keyed_by_hash_samples_and_seed(tiny_dir, isolated_cache):
    gen = load_generator(WeightRef(str(tiny_dir / "stylegan2.pt")))
    w = mean_latent(gen, MeanLatent(samples=500, seed=3))
    cached = isolated_cache / "mean_latent" / f"{gen.sha256[:16]}-n500-s3.pt"
    assert cached.is_file()
    torch.testing.assert_close(torch.load(cached, weights_only=True), w)
    # a poisoned cache entry proves the second call reads the cache rather than recomputing
    torch.save(torch.full_like(w, 7.0), cached)
    assert (mean_latent(gen, MeanLatent(samples=500, seed=3)) == 7.0).all()
    assert not (mean_latent(gen, MeanLatent(samples=500, seed=4)) == 7.0).all()
    from_file = mean_latent(gen, MeanLatent(source="checkpoint"))
    torch.testing.assert_close(from_file, gen.extra["latent_avg"])


def test_generator_and_parser_reproduce_the_originals_first_step(reference_checkpoints):
    """Step 0 of the shared fidelity case: recon loss and mask means from the original code."""
    import json
    case = json.loads((FIDELITY / "smiling_add" / "case.json").read_text())
    g = load_generator(WeightRef(str(reference_checkpoints["generator"]))).module
    parser = load_face_parser(WeightRef(str(reference_checkpoints["face_parser"])), 512).module
    w = torch.from_numpy(np.load(FIDELITY / "latent_mean.npy")).float()
    x = torch.from_numpy(np.load(FIDELITY / "smiling_add" / "input_image.npy")).float()[None]
    with torch.no_grad():
        generated = g(w.view(1, 1, -1).repeat(1, g.n_latent, 1), g.make_noise(1))
        probs = parser(x)
        recon = region_masks(probs, [["skin"]])
        shape = region_masks(parser(x, out_size=512), [["mouth"]])
    expected = case["expected_initial_mask_means"]
    assert recon.mean().item() == pytest.approx(expected["recon"], rel=1e-4)
    assert shape.mean().item() == pytest.approx(expected["shape"], rel=1e-4)
    assert region_masks(probs, [["skin", "mouth"]]).mean().item() == pytest.approx(
        expected["blend"], rel=1e-4)
    loss = (recon * (x - generated) ** 2).mean().item()
    assert loss == pytest.approx(case["expected_per_step"][0]["recon"], rel=1e-4)
