"""The identity-preservation metric on real face photos and dlib's face descriptor network
from the align extra. The photos come with installed packages (tests/data/README.md):
scikit-image's 512 px astronaut (Eileen Collins, NASA, public domain) and matplotlib's
sample Grace Hopper (US Navy, public domain)."""
import io
import sys
from pathlib import Path

import matplotlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from models.identity import SAME_PERSON_THRESHOLD, load_identity

pytest.importorskip("dlib", reason="the identity metric needs the align extra (dlib)")
skimage_data = pytest.importorskip("skimage.data")

DEMO_PHOTO = Path(__file__).parent.parent / "jobs" / "demo" / "astronaut-64.png"


@pytest.fixture(scope="module")
def identity():
    loaded = load_identity()
    assert loaded.unavailable is None, loaded.unavailable
    return loaded


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_the_same_photo_is_at_distance_zero(identity, astronaut):
    out = identity.compare_one(astronaut, astronaut.copy())
    assert out["identity_status"] == "ok"
    assert out["identity_distance"] == pytest.approx(0.0, abs=1e-6)
    assert out["same_person"] is True and out["identity_seconds"] > 0


@pytest.mark.parametrize("alter", ["blur", "jpeg"])
def test_a_mildly_altered_copy_stays_the_same_person(identity, astronaut, alter):
    altered = (np.asarray(Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(1.5)))
               if alter == "blur" else jpeg(astronaut, 40))
    out = identity.compare_one(astronaut, altered)
    assert out["identity_status"] == "ok"
    assert 0.01 < out["identity_distance"] < SAME_PERSON_THRESHOLD    # changed, same person
    assert out["same_person"] is True


def test_two_different_people_are_told_apart(identity, astronaut):
    """The metric is not "same person" for any two faces: two people, each FFHQ-aligned
    into the same 512 px frame (as an input and its edit are pixel-aligned), measured
    0.687 apart (above dlib's 0.6), while one of them mirrored stays at 0.160."""
    from manifests.align import Aligner
    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    aligner = Aligner(size=512)
    collins = np.asarray(aligner.align(Image.fromarray(astronaut))[0])
    hopper = np.asarray(aligner.align(hopper.convert("RGB"))[0])
    two = identity.compare_one(collins, hopper)
    assert two["identity_status"] == "ok"
    assert two["identity_distance"] > SAME_PERSON_THRESHOLD and two["same_person"] is False
    mirrored = identity.compare_one(hopper, np.ascontiguousarray(hopper[:, ::-1]))
    assert mirrored["identity_distance"] < SAME_PERSON_THRESHOLD and mirrored["same_person"]
    # the margin, stated: two people further apart than one face and its mirror image
    assert two["identity_distance"] > 3 * mirrored["identity_distance"]


def test_no_face_is_reported_as_no_face_not_a_number(identity, astronaut):
    coffee = np.asarray(Image.fromarray(skimage_data.coffee()).resize((512, 512)))
    out = identity.compare_one(astronaut, coffee)
    assert out["identity_status"] == "no face in the result"
    assert out["identity_distance"] is None and out["same_person"] is None
    small = np.asarray(Image.open(DEMO_PHOTO).convert("RGB"))      # 64 px: too small for dlib
    out = identity.compare_one(small, small)
    assert out["identity_status"] == "no face in the input" and out["identity_distance"] is None


def test_without_dlib_the_columns_are_null_and_say_why(monkeypatch, astronaut):
    monkeypatch.setitem(sys.modules, "dlib", None)                   # import dlib fails
    missing = load_identity()
    out = missing.compare_one(astronaut, astronaut)
    assert out["identity_distance"] is None and out["same_person"] is None
    assert out["identity_status"].startswith("unavailable: dlib is not installed")


def test_the_inputs_side_is_described_once_and_gives_the_same_distance(identity, astronaut):
    """An image's edits share its face and descriptor: `describe` once, then each
    comparison searches and describes only the result, to the same figure."""
    altered = np.asarray(Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(2)))
    before = identity.inputs_described
    whole = identity.compare_one(astronaut, altered)
    assert identity.inputs_described == before + 1
    face = identity.describe(astronaut)
    shared = [identity.compare_one(astronaut, altered, face) for _ in range(3)]
    assert identity.inputs_described == before + 2          # three edits, one description
    assert all(s["identity_distance"] == pytest.approx(whole["identity_distance"])
               for s in shared)
    assert all(s["identity_seconds"] < whole["identity_seconds"] * 5 for s in shared)
