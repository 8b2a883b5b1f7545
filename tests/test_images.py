"""Image files in and out: decoding any mode, the resize rule, the alignment quad, paste."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import (ImageError, crop_to_source, decode_image, encode_png, paste,
                             quad_to_crop, read_image, resize, to_uint8)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_resize_averages_blocks_when_shrinking_and_interpolates_when_enlarging():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    small = resize(x, 2)
    torch.testing.assert_close(small, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))  # block means
    big = resize(torch.tensor([[[[0.0, 1.0]]]]).expand(1, 1, 2, 2), 4)
    torch.testing.assert_close(big[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))   # bilinear
    assert resize(x, 4) is x


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16"])
def test_any_mode_decodes_to_rgb_in_0_1(mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype("uint8"))
    image = rgb.convert("L").convert(mode) if mode in ("1", "I;16") else rgb.convert(mode)
    x = decode_image(png(image), 8)
    assert x.shape == (3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_unreadable_files_are_row_errors_naming_the_file(tmp_path):
    with pytest.raises(ImageError, match="x.png: not a readable image"):
        decode_image(b"<html>not an image</html>", 8, "x.png")
    with pytest.raises(ImageError, match="file not found"):
        read_image(str(tmp_path / "absent.png"), 8)
    assert issubclass(ImageError, ValueError)


def test_png_round_trip_is_8_bit_and_clamped():
    x = torch.tensor([[[-0.5, 0.5], [1.0, 2.0]]]).expand(3, 2, 2)
    back = np.asarray(Image.open(io.BytesIO(encode_png(x))))
    assert back[..., 0].tolist() == [[0, 128], [255, 255]]
    assert to_uint8(x[:1]).shape == (2, 2)


def test_the_quad_maps_invert_each_other_and_paste_keeps_the_outside():
    quad = np.array([[10.0, 12.0], [8.0, 40.0], [36.0, 42.0], [38.0, 14.0]])
    forward, back = crop_to_source(quad, 16), quad_to_crop(quad, 16)
    for corner, crop_xy in zip(quad, [(0, 0), (0, 16), (16, 16), (16, 0)]):
        np.testing.assert_allclose(forward @ [*crop_xy, 1], corner, atol=1e-9)
        np.testing.assert_allclose(back @ [*corner, 1], crop_xy, atol=1e-9)
    photo = Image.fromarray(np.full((50, 50, 3), 40, np.uint8))
    out = np.asarray(paste(photo, Image.new("RGB", (16, 16), (250, 0, 0)), quad))
    assert (out[:5] == 40).all() and (out[45:] == 40).all()     # outside the quad: untouched
    assert out[27, 23, 0] > 200                                   # its middle: the crop
