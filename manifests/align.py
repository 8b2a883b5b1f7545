"""FFHQ-style face alignment, and pasting an edited crop back into the full photo.

The StyleGAN2 FFHQ generator only understands faces aligned the way FFHQ was: 68 dlib
landmarks -> eye and mouth centres -> an oriented square quad around the face -> a
warp of that quad to a square image. The way back, `paste` (an edited crop blended into
its photo), lives with the image files in pipeline/output/images.py, where the job's
paste-back uses it too.

Needs the `align` extra (`pip install .[align]`): dlib (the `dlib-bin` wheel) and dlib's
68-point shape predictor from `face_recognition_models` (or Debian's libdlib-data).
That model was trained on iBUG's 300-W data, whose terms exclude commercial use.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from models.identity import LANDMARK_MODEL, dlib_model_file
from pipeline.engine.rows import unique_stems
from pipeline.errors import RowError
from pipeline.output.images import crop_to_source, png_bytes, read_pil
from pipeline.store.storage import write_bytes

log = logging.getLogger(__name__)

LANDMARK_LICENCE = ("dlib's 68-point shape predictor was trained on iBUG 300-W, whose "
                    "licence excludes commercial use.")


class AlignError(ValueError):
    """A photo that cannot be aligned (no face, several faces with on_multiple='skip')."""


def landmark_model_path() -> Path:
    """The 68-point model: $MASKFACE_LANDMARKS, face_recognition_models, or Debian's copy."""
    path = dlib_model_file(LANDMARK_MODEL, env="MASKFACE_LANDMARKS")
    if path is None:
        raise AlignError(f"no {LANDMARK_MODEL}: install the align extra (pip install '.[align]'), "
                         "or Debian's libdlib-data, or set MASKFACE_LANDMARKS")
    return path


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """FFHQ's crop quad [4, 2] (corners: top-left, bottom-left, bottom-right, top-right)
    from 68 landmarks [68, 2] in source pixels."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def warp_crop(image: Image.Image, quad: np.ndarray, size: int) -> Image.Image:
    """Cut the quad out of `image` as a size x size square (reflect-padded at the edges)."""
    rgb = np.asarray(image.convert("RGB"))
    quad = np.asarray(quad, dtype=np.float64)
    qsize = np.hypot(*(quad[3] - quad[0]))
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:      # shrink first so bilinear sampling does not alias
        small = (int(np.rint(rgb.shape[1] / shrink)), int(np.rint(rgb.shape[0] / shrink)))
        rgb = np.asarray(Image.fromarray(rgb).resize(small, Image.LANCZOS))
        quad = quad / shrink
    border = int(np.ceil(max(0, -quad.min(), (quad[:, 0] - rgb.shape[1]).max(),
                             (quad[:, 1] - rgb.shape[0]).max()))) + 2
    border = min(border, max(rgb.shape[:2]) - 1)
    padded = np.pad(rgb, ((border, border), (border, border), (0, 0)), mode="reflect")
    quad = quad + border
    m = crop_to_source(quad, size)
    data = (m[0, 0], m[0, 1], m[0, 2], m[1, 0], m[1, 1], m[1, 2])
    return Image.fromarray(padded).transform((size, size), Image.AFFINE, data, Image.BILINEAR)


@dataclass
class Aligner:
    """Detect, landmark and align faces.

    on_multiple: 'largest' takes the largest face, 'skip' refuses photos with several.
    Detections scoring below `min_score` are ignored (dlib finds weak false faces when
    it upsamples).
    """
    size: int = 1024
    on_multiple: str = "largest"
    upsample: int = 1
    min_score: float = 0.5

    def __post_init__(self):
        if self.on_multiple not in ("largest", "skip"):
            raise ValueError("on_multiple must be 'largest' or 'skip'")
        try:
            import dlib
        except ImportError:
            raise AlignError("face alignment needs dlib: pip install '.[align]'") from None
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(landmark_model_path()))

    def landmarks(self, image: Image.Image) -> np.ndarray:
        rgb = np.asarray(image.convert("RGB"))
        rects, scores, _ = self._detector.run(rgb, self.upsample, 0)
        faces = [r for r, s in zip(rects, scores) if s >= self.min_score]
        if not faces:
            raise AlignError("no face found")
        if len(faces) > 1 and self.on_multiple == "skip":
            raise AlignError(f"{len(faces)} faces found (on_multiple=skip)")
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._predictor(rgb, face)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)

    def align(self, image: Image.Image) -> tuple[Image.Image, np.ndarray]:
        """(the aligned size x size crop, its quad [4, 2] in source pixels)."""
        quad = ffhq_quad(self.landmarks(image))
        return warp_crop(image, quad, self.size), quad


@dataclass(frozen=True)
class AlignedPhoto:
    source_uri: str          # the photo
    crop_uri: str            # its aligned crop
    quad: list[float]        # the crop quad's 4 corners in source pixels, x0,y0,...,x3,y3


def align_photos(uris: Iterable[str], out_uri: str, aligner: Aligner,
                 storage_options: Mapping | None = None
                 ) -> tuple[list[AlignedPhoto], list[tuple[str, str]]]:
    """Align each photo once and write its crop as `<out_uri>/<name>.png`, the names
    being the photos' stems made safe and unique (x, x-1, ...). Returns the aligned
    photos and (uri, reason) for each photo that could not be aligned."""
    uris = list(dict.fromkeys(uris))
    out = out_uri.rstrip("/")
    aligned, failed = [], []
    for uri, name in zip(uris, unique_stems(uris)):
        try:
            crop, quad = aligner.align(read_pil(uri, storage_options))
        except (AlignError, RowError, OSError) as e:   # ImageError, StorageError are RowErrors
            log.warning("not aligned: %s: %s", uri, e)
            failed.append((uri, str(e)))
            continue
        target = f"{out}/{name}.png"
        write_bytes(target, png_bytes(crop), storage_options)
        aligned.append(AlignedPhoto(uri, target, [float(v) for v in quad.flatten()]))
    return aligned, failed
