"""Image files in and out: decoding any mode, the resize rule, the alignment quad, paste."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import BIG_LIMIT, PHOTO, bad_files, encoded, odd_images, photo, png_bomb
from PIL import Image

from pipeline.engine.resize import resize
from pipeline.errors import RowError
from pipeline.runner.access import InputPolicy
from pipeline.output.images import (ImageError, crop_to_source, decode_image, encode_png, paste,
                                 quad_to_crop, read_image, to_uint8)


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
    rgb = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    image = rgb.convert("L").convert(mode) if mode in ("1", "I;16") else rgb.convert(mode)
    x = decode_image(png(image), 8)
    assert x.shape == (3, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_unreadable_files_are_row_errors_naming_the_file(tmp_path):
    with pytest.raises(ImageError, match="x.png: not a readable image: an HTML page"):
        decode_image(b"<html>not an image</html>", 8, "x.png")
    with pytest.raises(RowError, match="absent.png: not found"):
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


# ---- odd but valid, and bad: the corpus the job tests run (tests/corpus.py) ------------
def decoded(path, size=32, **policy):
    return read_image(str(path), size, policy=InputPolicy(**policy))


def test_odd_but_valid_images_are_converted_as_the_readme_says(tmp_path):
    odd = odd_images(tmp_path)
    upright = decoded(PHOTO, 64)
    for name, path in odd.items():
        x = decoded(path, 64)
        assert x.shape == (3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1, name
    # EXIF orientation honoured: the stored image is sideways, the decoded one upright
    assert (decoded(odd["exif-rotated.jpg"], 64) - upright).abs().mean() < 0.03
    # 16-bit grey is scaled, not clipped: equal to the 8-bit grey it was made from
    torch.testing.assert_close(decoded(odd["grey16.png"], 64), decoded(odd["mode-L.png"], 64),
                               atol=1 / 255, rtol=0)
    # alpha composited on white: the transparent edges are white, the middle is the photo
    rgba = decoded(odd["mode-RGBA.png"], 64)
    assert torch.all(rgba[:, :, :12] == 1.0) and torch.all(rgba[:, :, -12:] == 1.0)
    torch.testing.assert_close(rgba[:, :, 20:44], upright[:, :, 20:44])
    assert (decoded(odd["mode-LA.png"], 64)[:, :, :12] == 1.0).all()
    assert (decoded(odd["cmyk.jpg"], 64) - upright).abs().mean() < 0.03
    # very non-square: the centred square is kept (the face), or the whole is stretched
    torch.testing.assert_close(decoded(odd["wide.png"], 64), upright)
    stretched = decoded(odd["wide.png"], 64, square="stretch")
    assert (stretched - upright).abs().mean() > 0.05
    whole = torch.from_numpy(np.asarray(Image.open(odd["wide.png"]), np.float32) / 255)
    torch.testing.assert_close(stretched, resize(whole.permute(2, 0, 1)[None], 64)[0])


def test_each_bad_file_is_refused_with_its_reason(tmp_path):
    bad = bad_files(tmp_path)
    for name, (path, words) in bad.items():
        with pytest.raises(RowError) as err:
            decoded(path, max_bytes=BIG_LIMIT)
        assert words in str(err.value) and name in str(err.value), (name, str(err.value))


def test_a_decompression_bomb_is_refused_with_memory_bounded(tmp_path):
    """Decoding this file would take 3.6 GB (10 GB as RGB); refusing it takes nothing."""
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    (tmp_path / "big.png").write_bytes(png_bomb(7000, 7000))   # 49 MP: over 40 MP, under PIL's limit
    script = f"""
import resource, sys
from pipeline.output.images import ImageError, read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name in ("bomb.png", "big.png"):
    try:
        read_image({str(tmp_path)!r} + "/" + name, 64)
        sys.exit(name + " was decoded")
    except ImageError as e:
        print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "bomb.png: declares more than 40,000,000 pixels: refused before decoding" in lines[0]
    assert "big.png: declares 7000x7000 = 49,000,000 pixels, over the limit" in lines[1]
    assert int(lines[-1]) < 20, f"peak memory grew by {lines[-1]} MB"


def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encoded(photo(), "PNG"))
    size = path.stat().st_size
    assert decoded(path, max_bytes=size).shape == (3, 32, 32)
    with pytest.raises(ImageError, match=f"{size:,} bytes, over the limit of {size - 1:,}"):
        decoded(path, max_bytes=size - 1)
