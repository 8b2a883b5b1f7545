import pytest
import torch
import torch.nn.functional as F

from models.classifier import ATTRIBUTE_INDEX, ATTRIBUTES
from models.face_parser import CLASSES, region_masks
from models.loaders import load_e4e, load_face_parser
from models.spec import WeightRef


@pytest.fixture(scope="module")
def parser(tiny_dir):
    return load_face_parser(WeightRef(str(tiny_dir / "face_parser.pt")), working_size=64).module


def test_parser_returns_probabilities_at_the_callers_resolution(parser):
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        probs = parser(x)
        working = parser(x, out_size=64)
    assert probs.shape == (2, 9, 48, 48) and working.shape == (2, 9, 64, 64)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 48, 48), rtol=1e-5, atol=1e-5)
    assert (probs >= 0).all()


def test_region_masks_are_per_image_sums_of_class_probabilities():
    probs = torch.softmax(torch.randn(3, 9, 8, 8), dim=1)
    masks = region_masks(probs, [["skin"], ["mouth", "nose"], []])
    torch.testing.assert_close(masks[0, 0], probs[0, CLASSES.index("skin")])
    torch.testing.assert_close(masks[1, 0], probs[1, 1] + probs[1, 5])
    assert (masks[2] == 0).all()
    with pytest.raises(ValueError, match="unknown face region 'beard'"):
        region_masks(probs[:1], [["beard"]])


def test_attribute_table():
    assert ATTRIBUTE_INDEX["smiling"] == 14 and ATTRIBUTES[11] == "wearing_lipstick"
    assert ATTRIBUTE_INDEX["eyeglasses"] == 39


def test_e4e_predicts_a_w_plus_latent_for_its_generator(tiny_dir):
    e4e = load_e4e(WeightRef(str(tiny_dir / "e4e.pt")))
    assert e4e.extra["stylegan_size"] == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        w = e4e.module(x)
        alone = e4e.module(x[1:])
        # the wrapper: [0,1] -> [-1,1], area-resize to 256, encode, add latent_avg
        offsets = e4e.module.encoder(F.interpolate(x * 2 - 1, size=(256, 256), mode="area"))
    assert w.shape == (2, 10, 64) and torch.isfinite(w).all()
    torch.testing.assert_close(w - e4e.module.latent_avg, offsets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w[1:], alone, rtol=1e-4, atol=1e-5)
