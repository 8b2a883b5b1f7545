"""Image files in and out, through fsspec (local paths, s3://, ...)."""
from __future__ import annotations

import io
import logging
from typing import Mapping

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import RowError

log = logging.getLogger(__name__)


class ImageError(RowError):
    """An input image that cannot be read."""


def decode_image(data: bytes, resolution: int, name: str = "image") -> torch.Tensor:
    """Bytes of any PIL-readable file -> [3, resolution, resolution] float in [0, 1].

    Any mode is converted to RGB. The image is resized as the original does: area when
    shrinking, bilinear when enlarging; a non-square image is stretched to a square, as
    in the original (align faces first: `maskface align`).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e})") from None
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    h, w = x.shape[-2:]
    if h != w:
        log.warning("%s is %dx%d, not square: stretched to %d px", name, w, h, resolution)
    return resize(x, resolution)[0]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size] as the original resizes: area when shrinking,
    bilinear when enlarging (or when only one side shrinks)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def read_image(uri: str, resolution: int, storage_options: Mapping | None = None) -> torch.Tensor:
    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{uri}: is a directory") from None
    return decode_image(data, resolution, uri)


def read_pil(uri: str, storage_options: Mapping | None = None) -> Image.Image:
    """A photo as an RGB PIL image, at its own size."""
    with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
        data = f.read()
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{uri}: not a readable image ({e})") from None


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [1, H, W] float (any range) -> HxWx3 / HxW uint8, clamped to [0, 1]."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_png(image: torch.Tensor) -> bytes:
    """A [3, H, W] or [1, H, W] tensor as PNG bytes (clamped to [0, 1], 8-bit)."""
    return png_bytes(Image.fromarray(to_uint8(image)))


def write_bytes(uri: str, data: bytes, storage_options: Mapping | None = None) -> None:
    with fsspec.open(uri, "wb", **dict(storage_options or {})) as f:
        f.write(data)


# -- the alignment quad: crop <-> source photo (see manifests/align.py) --------------------
def crop_to_source(quad: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 affine map from crop pixels to source pixels of a size x size crop: the
    crop's x axis runs along the quad's top edge (corner 0 -> 3), its y axis down the
    left edge (corner 0 -> 1)."""
    q0 = quad[0]
    basis = np.stack([(quad[3] - q0) / size, (quad[1] - q0) / size], axis=1)
    return np.concatenate([basis, q0[:, None]], axis=1)


def quad_to_crop(quad: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 affine map from source pixels to crop pixels (the inverse of the above)."""
    forward = crop_to_source(quad, size)
    inv = np.linalg.inv(forward[:, :2])
    return np.concatenate([inv, (-inv @ forward[:, 2])[:, None]], axis=1)


def paste(source: Image.Image, edited: Image.Image, quad: np.ndarray,
          feather: float = 0.1) -> Image.Image:
    """Blend an edited crop back into the full photo it was cut from.

    The crop is warped back by the inverse of its quad's transform; a mask that is 1 in
    the middle and ramps to 0 over `feather` of the crop's width at its border keeps
    the seam invisible. Pixels outside the quad are the source's, unchanged.
    """
    src = source.convert("RGB")
    size = edited.size[0]
    m = quad_to_crop(np.asarray(quad, dtype=np.float64), size)
    data = (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2])
    warped = edited.convert("RGB").transform(src.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    ramp = np.minimum(np.arange(size) + 0.5, size - 0.5 - np.arange(size)) / max(feather * size, 1)
    ramp = np.clip(ramp, 0, 1)
    mask = Image.fromarray((np.outer(ramp, ramp) * 255).round().astype(np.uint8), "L")
    alpha = np.asarray(mask.transform(src.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR),
                       dtype=np.float32)[..., None] / 255
    out = alpha * np.asarray(warped, dtype=np.float32) + (1 - alpha) * np.asarray(src, np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
