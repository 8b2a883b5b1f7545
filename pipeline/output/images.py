"""Image files in and out, through the storage layer (local paths, s3://, ...): the
formats a job decodes, the limits every read obeys, conversions, the alignment quad and
paste-back. Which URIs a job may read at all is the job's own rule
(pipeline/runner/access.py), checked before any of these reads."""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.engine.resize import resize
from pipeline.errors import RowError
from pipeline.store.storage import ReadRefused, read_bytes
from pipeline.store.uris import redact

log = logging.getLogger(__name__)

SQUARE = ("crop", "stretch")


class ImageError(RowError):
    """An input image that cannot be used: unreadable, unsupported, too small or too large."""


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """The limits on each image a job reads (the job spec's `inputs.*` keys, beside
    `inputs.allow`: pipeline/runner/access.py's InputPolicy holds both)."""
    max_bytes: int = field(default=64 * 2**20, metadata={"help": (
        "an image file over this many bytes is refused before it is read")})
    max_pixels: int = field(default=40_000_000, metadata={"help": (
        "an image declaring more pixels (width x height) is refused before it is decoded")})
    min_side: int = field(default=32, metadata={"help": (
        "an image smaller than this on its shorter side, in pixels, is refused")})
    square: str = field(default="crop", metadata={"help": (
        "how a non-square image is made square: `crop` its centre, or `stretch` it (the "
        "original's way)")})


# Decoders this job runs on untrusted bytes; others (GIF, PSD, ICO, ...) are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
BACKGROUND = (255, 255, 255)            # what transparent pixels are composited on: white
_SIGNATURES = (                          # what a refused file most likely is, for the message
    (b"\x89PNG", "a truncated or corrupt PNG file"),
    (b"\xff\xd8\xff", "a truncated or corrupt JPEG file"),
    (b"GIF8", "a GIF image: unsupported format"),
    (b"%PDF", "a PDF document, not an image"),
    (b"8BPS", "a Photoshop (PSD) file: unsupported format"),
    (b"\x00\x00\x01\x00", "an ICO icon: unsupported format"),
    (b"RIFF", "a truncated or corrupt WebP file"),
    (b"BM", "a truncated or corrupt BMP file"),
    (b"II*\x00", "a truncated or corrupt TIFF file"),
    (b"MM\x00*", "a truncated or corrupt TIFF file"),
)


def _what_it_is(data: bytes) -> str:
    """Why bytes that no accepted decoder took are not an image, as far as one can tell."""
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return what
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "a HEIF/AVIF image: unsupported format"
    head = data[:1024]
    try:
        text = head.decode("utf-8").lower()
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        if "<html" in text or "<!doctype html" in text:
            return "an HTML page, not an image"
        if "<svg" in text or text.lstrip().startswith("<?xml"):
            return "SVG/XML: unsupported format"
        return "text, not an image"
    return "not an image in an accepted format"


def open_image(data: bytes, name: str, policy: ImageLimits) -> Image.Image:
    """The image's header, checked: an accepted format, declared size within the policy's
    limits. No pixel is decoded here, so a decompression bomb costs nothing."""
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: declares more than {policy.max_pixels:,} pixels: refused "
                         "before decoding (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image: {_what_it_is(data)} (accepted: "
                         f"{', '.join(ACCEPTED_FORMATS)})") from None
    except Exception as e:   # decoders raise many types on crafted files; each is this row's
        raise ImageError(f"{name}: not a readable image: {_what_it_is(data)} "
                         f"({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > policy.max_pixels:
        raise ImageError(f"{name}: declares {w}x{h} = {w * h:,} pixels, over the limit of "
                         f"{policy.max_pixels:,}: refused before decoding (a decompression "
                         "bomb, or a photo to downscale first)")
    if min(w, h) < policy.min_side:
        raise ImageError(f"{name}: {w}x{h} pixels, below the minimum of {policy.min_side} "
                         "on the shorter side")
    return im


def to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Decode and convert to 8-bit RGB: EXIF orientation applied; alpha composited on
    BACKGROUND; 16-bit grey scaled (not clipped) to 8 bits; CMYK, palette, 1-bit and
    grey converted by PIL."""
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            grey = np.asarray(im, dtype=np.float64) / 257.0      # 0..65535 -> 0..255
            im = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8), "L")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            ground = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
            return Image.alpha_composite(ground, rgba).convert("RGB")
        return im.convert("RGB")
    except MemoryError:
        raise ImageError(f"{name}: out of memory decoding {im.size[0]}x{im.size[1]} "
                         "pixels (lower inputs.max_pixels)") from None
    except Exception as e:   # as in open_image: a crafted file may raise any type
        raise ImageError(f"{name}: not a readable image: a truncated or corrupt {im.format} "
                         f"file ({type(e).__name__}: {e})") from None


def square(im: Image.Image, how: str) -> Image.Image:
    """`crop`: the largest centred square; `stretch`: unchanged (resize stretches it)."""
    w, h = im.size
    if how == "stretch" or w == h:
        return im
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def decode_image(data: bytes, resolution: int, name: str = "image",
                 policy: ImageLimits | None = None) -> torch.Tensor:
    """Bytes of an accepted image file -> [3, resolution, resolution] float in [0, 1].

    Checked against the policy's limits before decoding, converted to RGB (`to_rgb`),
    made square (`square`), then resized as the original does: area when shrinking,
    bilinear when enlarging.
    """
    policy = policy or ImageLimits()
    rgb = square(to_rgb(open_image(data, name, policy), name), policy.square)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    return resize(x, resolution)[0]


def _read_bytes(uri: str, max_bytes: int, storage_options: Mapping | None = None) -> bytes:
    """An image file's bytes, refused (ImageError) when it is a folder or over
    `max_bytes` (pipeline/store/storage.py's capped read)."""
    try:
        return read_bytes(uri, max_bytes, storage_options)
    except ReadRefused as e:
        raise ImageError(str(e)) from None


def read_image(uri: str, resolution: int, storage_options: Mapping | None = None,
               policy: ImageLimits | None = None) -> torch.Tensor:
    """An input image, as `decode_image` gives it."""
    policy = policy or ImageLimits()
    return decode_image(_read_bytes(uri, policy.max_bytes, storage_options), resolution,
                        redact(uri), policy)


def read_pil(uri: str, storage_options: Mapping | None = None,
             policy: ImageLimits | None = None) -> Image.Image:
    """A photo as an RGB PIL image, at its own size (converted as `to_rgb` does)."""
    policy = policy or ImageLimits()
    data = _read_bytes(uri, policy.max_bytes, storage_options)
    return to_rgb(open_image(data, redact(uri), policy), redact(uri))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [1, H, W] float (any range) -> HxWx3 / HxW uint8, clamped to [0, 1]."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


# zlib's level for PNGs: 6 is Pillow's default; a job writes at its `png_compress_level`
# (1: at 1024 px, 83 ms and 1.33 MB against 370 ms and 1.18 MB at 6; the pixels the same)
PNG_LEVEL = 6


def png_bytes(image: Image.Image, compress_level: int = PNG_LEVEL) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_png(image: torch.Tensor, compress_level: int = PNG_LEVEL) -> bytes:
    """A [3, H, W] or [1, H, W] tensor as PNG bytes (clamped to [0, 1], 8-bit)."""
    return png_bytes(Image.fromarray(to_uint8(image)), compress_level)


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
