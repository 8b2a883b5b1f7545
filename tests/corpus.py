"""Input files for the reliability tests: odd-but-valid images, made from the photo the
repo ships, and bad ones (generated), each with the words its error must contain."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO = Path(__file__).resolve().parent.parent / "jobs" / "demo" / "astronaut-64.png"
EXIF_ORIENTATION = 0x0112


def photo() -> Image.Image:
    return Image.open(PHOTO).convert("RGB")


def _alpha(size: tuple[int, int]) -> Image.Image:
    """Opaque in the middle, transparent at the left and right edges."""
    w, h = size
    a = np.zeros((h, w), np.uint8)
    a[:, w // 4: 3 * w // 4] = 255
    return Image.fromarray(a, "L")


def odd_images(folder: Path) -> dict[str, Path]:
    """Valid images in every odd form docs/reliability.md's inputs section names."""
    folder.mkdir(parents=True, exist_ok=True)
    p = photo()
    out: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        out[name] = folder / name
        image.save(out[name], **kw)

    save("mode-1.png", p.convert("1"))
    save("mode-L.png", p.convert("L"))
    save("mode-P.png", p.convert("P"))
    pal = p.convert("P")
    save("mode-P-transparent.png", pal, transparency=int(np.asarray(pal)[0, 0]))
    rgba = p.copy()
    rgba.putalpha(_alpha(p.size))
    save("mode-RGBA.png", rgba)
    la = p.convert("L")
    la.putalpha(_alpha(p.size))
    save("mode-LA.png", la)
    save("cmyk.jpg", p.convert("CMYK"), quality=95)
    grey16 = (np.asarray(p.convert("L"), np.uint16) * 257).astype(np.uint16)
    save("grey16.png", Image.fromarray(grey16))                      # I;16: 16-bit PNG
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6          # "rotate 90 CW to view": stored turned 90 CCW
    save("exif-rotated.jpg", p.transpose(Image.Transpose.ROTATE_90), exif=exif, quality=95)
    wide = Image.new("RGB", (320, 64), (20, 60, 20))
    wide.paste(p, (128, 0))
    save("wide.png", wide)                                            # 5:1, the face centred
    tall = Image.new("RGB", (48, 200), (60, 20, 20))
    tall.paste(p.resize((48, 48)), (0, 76))
    save("tall.webp", tall, lossless=True)
    save("photo.bmp", p)
    save("photo.tif", p)
    save("photo.jpg", p, quality=90)
    return out


def png_bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A real 1-bit PNG of width x height zero pixels (3.6 gigapixels: ~440 KB on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


BIG_LIMIT = 600_000         # the jobs' inputs.max_bytes in these tests


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words of the row's error). Each is a file (or the lack of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    p = photo()
    noise = Image.fromarray((np.random.default_rng(0).random((480, 480, 3)) * 255)
                            .astype(np.uint8))
    files = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "truncated.png": (encoded(p, "PNG")[:3000], "truncated or corrupt PNG"),
        "truncated.jpg": (encoded(p, "JPEG", quality=90)[:700], "truncated or corrupt JPEG"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
                     "an HTML page, not an image"),
        "notes.png": (b"just some text that someone saved as .png\n", "text, not an image"),
        "anim.gif": (encoded(p, "GIF"), "a GIF image: unsupported format"),
        "icon.ico": (encoded(p, "ICO"), "an ICO icon: unsupported format"),
        "tiny.png": (encoded(p.resize((8, 8)), "PNG"), "8x8 pixels, below the minimum of 32"),
        "bomb.png": (png_bomb(), "refused before decoding"),
        "big.png": (encoded(noise, "PNG"), f"over the limit of {BIG_LIMIT:,}: refused before "
                                           "reading"),
    }
    out = {}
    for name, (data, words) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, words)
    assert (folder / "big.png").stat().st_size > BIG_LIMIT
    (folder / "folder.png").mkdir(exist_ok=True)
    out["folder.png"] = (folder / "folder.png", "is a directory")
    out["absent.png"] = (folder / "absent.png", "not found")
    return out
