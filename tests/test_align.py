"""FFHQ alignment on the real astronaut photo (needs the align extra, which CI installs)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib", reason="the align extra (pip install '.[align]') is not installed")
skimage_data = pytest.importorskip("skimage.data")

from manifests.align import Aligner, AlignError  # noqa: E402
from manifests.schema import read_manifest  # noqa: E402
from pipeline.output.images import paste, quad_to_crop  # noqa: E402

MASKFACE = str(Path(sys.executable).parent / "maskface")


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def aligner():
    return Aligner(size=256)


def test_alignment_puts_the_eyes_where_the_ffhq_recipe_says(astronaut, aligner):
    crop, quad = aligner.align(astronaut)
    assert crop.size == (256, 256)
    to_crop = quad_to_crop(quad, 256)
    source = aligner.landmarks(astronaut)
    found = aligner.landmarks(crop)                        # one face, found again
    for sl in (slice(36, 42), slice(42, 48)):
        expected = to_crop[:, :2] @ source[sl].mean(0) + to_crop[:, 2]
        assert np.hypot(*(found[sl].mean(0) - expected)) < 3.0
    # FFHQ's layout: the eyes level, at about 3/8 and 5/8 of the width
    eyes = [found[36:42].mean(0), found[42:48].mean(0)]
    assert abs(eyes[0][1] - eyes[1][1]) < 3
    assert abs(eyes[0][0] - 0.375 * 256) < 6 and abs(eyes[1][0] - 0.625 * 256) < 6


def test_align_identity_edit_paste_round_trip(astronaut, aligner):
    crop, quad = aligner.align(astronaut)
    back = np.asarray(paste(astronaut, crop, quad), dtype=np.float64) / 255
    src = np.asarray(astronaut, dtype=np.float64) / 255
    diff = np.abs(back - src)
    assert diff.mean() < 0.005
    # outside the quad's bounding box the photo is untouched
    x0, y0 = np.floor(quad.min(0)).astype(int)
    x1, y1 = np.ceil(quad.max(0)).astype(int)
    outside = np.ones(src.shape[:2], bool)
    outside[max(y0, 0):y1, max(x0, 0):x1] = False
    assert diff[outside].max() == 0


def test_no_face_and_two_faces_take_the_documented_paths(astronaut, aligner):
    with pytest.raises(AlignError, match="no face found"):
        aligner.align(Image.fromarray(np.full((200, 200, 3), 128, np.uint8)))
    strict = Aligner(size=64, on_multiple="skip")
    strict.align(astronaut)                                # exactly one face in the astronaut
    two = Image.fromarray(np.concatenate([np.asarray(astronaut)] * 2, axis=1))
    with pytest.raises(AlignError, match="2 faces found"):
        strict.align(two)
    crop, quad = Aligner(size=64, on_multiple="largest").align(two)
    assert crop.size == (64, 64)


def test_folder_manifest_with_align(tmp_path, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut.save(photos / "astronaut.png")
    Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(photos / "wall.png")
    result = subprocess.run([MASKFACE, "manifest", "folder", "--images", str(photos),
                             "--edit", "smiling=1", "--align", "--aligned-out",
                             str(tmp_path / "aligned"), "--size", "128",
                             "--out", str(tmp_path / "m.parquet")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wall.png: not aligned: no face found" in result.stderr
    rows = read_manifest(str(tmp_path / "m.parquet")).rows
    assert rows["id"].tolist() == ["astronaut.smiling-1"]
    assert Image.open(rows["image_uri"].iloc[0]).size == (128, 128)
    assert rows["source_uri"].iloc[0].endswith("astronaut.png")
    assert len(rows["align_quad"].iloc[0]) == 8
    # and the CLI round trip: paste the (unedited) crop back
    quad = ",".join(str(v) for v in rows["align_quad"].iloc[0])
    out = tmp_path / "pasted.png"
    pasted = subprocess.run([MASKFACE, "paste", "--edited", rows["image_uri"].iloc[0],
                             "--source", str(photos / "astronaut.png"), "--quad", quad,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, pasted.stderr
    assert Image.open(out).size == astronaut.size
    aligned = subprocess.run([MASKFACE, "align", str(photos), str(tmp_path / "a2"), "--size", "64"],
                             capture_output=True, text=True, timeout=300)
    assert aligned.returncode == 1 and "skipped" in aligned.stderr   # the wall has no face
    quads = json.loads((tmp_path / "a2" / "quads.json").read_text())
    assert list(quads) == ["astronaut.png"] and "300-W" in aligned.stdout
