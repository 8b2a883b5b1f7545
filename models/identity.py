"""Identity preservation: does the edited face still belong to the same person?

Per edit, the Euclidean distance between dlib's 128-d face descriptors
(`dlib_face_recognition_resnet_model_v1`, a ResNet trained for face verification) of
the input and of the result. Below 0.6, dlib's own threshold, the two count as the
same person (99.38% on LFW at that threshold).

    identity = load_identity()               # once per actor: dlib's models, or why not
    identity.compare_one(before, after)      # HxWx3 uint8 images -> the metrics columns
    face = identity.describe(before)         # the input's side once, for all its edits:
    identity.compare_one(before, after, face)    # each edit then costs the result's side

The face is found in each image with dlib's HOG detector. Input and result are
pixel-aligned, so the result's face must overlap the input's; a side without one is
"no face" (dlib finds none in images much under ~80 px of face, e.g. 64 px crops), and
then the distance is null rather than a number. Without dlib or its model files (the
`align` extra) every row is null, and `identity_status` says why.

The models come from `face_recognition_models` (found without importing it: its
__init__ needs pkg_resources) or Debian's libdlib-data; `MASKFACE_DLIB_MODELS` names
another folder.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

SAME_PERSON_THRESHOLD = 0.6
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
NO_FACE = "no face"
OK = "ok"


def dlib_model_file(name: str, env: str = "MASKFACE_DLIB_MODELS") -> Path | None:
    """A dlib model file: in the folder `$env` names (or the file itself), in
    face_recognition_models, or in Debian's /usr/share/dlib; None when absent."""
    candidates: list[str] = []
    override = os.environ.get(env)
    if override:
        candidates.append(override if override.endswith(".dat") else os.path.join(override, name))
    spec = importlib.util.find_spec("face_recognition_models")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "models", name))
    candidates.append(f"/usr/share/dlib/{name}")
    return next((Path(c) for c in candidates if Path(c).is_file()), None)


def _overlap(a, b) -> float:
    """Intersection over union of two dlib rectangles."""
    inter = a.intersect(b).area()        # 0 when they do not meet
    union = a.area() + b.area() - inter
    return inter / union if union else 0.0


def _columns(distance: float | None, status: str, seconds: float | None) -> dict[str, Any]:
    return {"identity_distance": distance,
            "same_person": None if distance is None else distance < SAME_PERSON_THRESHOLD,
            "identity_status": status, "identity_seconds": seconds}


class InputFace(NamedTuple):
    """The input's side of the identity metric: its face and descriptor, or None for
    both when it has no face. The same for every edit of one image: computed once."""
    face: Any
    descriptor: np.ndarray | None
    seconds: float


class FaceIdentity:
    """dlib's detector, 68-point landmarks and descriptor network (`load_identity`
    builds one), or only the reason they are missing (`unavailable`). `inputs_described`
    counts the inputs whose face was searched and described (`describe`)."""

    def __init__(self, detector=None, landmarks=None, encoder=None, unavailable: str | None = None):
        self.detector, self.landmarks, self.encoder = detector, landmarks, encoder
        self.unavailable = unavailable
        self.inputs_described = 0

    def _face(self, image: np.ndarray, near=None):
        """The largest face (or, given `near`, the one overlapping it most), or None.
        Small images are upsampled once so faces of ~40 px are found too."""
        upsample = 1 if min(image.shape[:2]) <= 512 else 0
        faces = list(self.detector(image, upsample))
        if near is not None:
            faces = [f for f in faces if _overlap(f, near) > 0.3]
            return max(faces, key=lambda f: _overlap(f, near)) if faces else None
        return max(faces, key=lambda f: f.area()) if faces else None

    def _descriptor(self, image: np.ndarray, face) -> np.ndarray:
        shape = self.landmarks(image, face)
        return np.asarray(self.encoder.compute_face_descriptor(image, shape), dtype=np.float64)

    def describe(self, before: np.ndarray) -> InputFace:
        """The input's face and descriptor (the half of the metric every edit of this
        image shares). Raises what dlib raises; `compare_one` turns it into a status."""
        started = time.perf_counter()
        self.inputs_described += 1
        before = np.ascontiguousarray(before)
        face = self._face(before)
        descriptor = None if face is None else self._descriptor(before, face)
        return InputFace(face, descriptor, time.perf_counter() - started)

    def _distance(self, after: np.ndarray, given: InputFace) -> tuple[float | None, str]:
        if given.face is None:
            return None, f"{NO_FACE} in the input"
        after = np.ascontiguousarray(after)
        face_out = self._face(after, near=given.face)
        if face_out is None:
            return None, f"{NO_FACE} in the result"
        return float(np.linalg.norm(given.descriptor - self._descriptor(after, face_out))), OK

    def compare_one(self, before: np.ndarray, after: np.ndarray,
                    given: InputFace | None = None) -> dict[str, Any]:
        """The identity columns of one pair of HxWx3 uint8 images; `given`: `describe`'s
        answer for `before`, when the caller has it (its time counts once, where it was
        computed)."""
        if self.unavailable:
            return _columns(None, f"unavailable: {self.unavailable}", None)
        started = time.perf_counter()
        try:
            if given is None:
                given = self.describe(before)
            distance, status = self._distance(after, given)
        except Exception as e:      # a metric never fails the edit it measures
            log.warning("identity metric failed: %s", e)
            distance, status = None, f"failed: {type(e).__name__}: {e}"
        return _columns(distance, status, time.perf_counter() - started)



def load_identity() -> FaceIdentity:
    """dlib's face models, loaded; without them a FaceIdentity that records why."""
    try:
        import dlib
    except ImportError:
        return FaceIdentity(unavailable="dlib is not installed (pip install '.[align]')")
    files = {name: dlib_model_file(name) for name in (LANDMARK_MODEL, DESCRIPTOR_MODEL)}
    missing = [name for name, path in files.items() if path is None]
    if missing:
        return FaceIdentity(unavailable=f"no {' or '.join(missing)} (pip install '.[align]', "
                                        "Debian's libdlib-data, or MASKFACE_DLIB_MODELS)")
    started = time.perf_counter()
    identity = FaceIdentity(dlib.get_frontal_face_detector(),
                            dlib.shape_predictor(str(files[LANDMARK_MODEL])),
                            dlib.face_recognition_model_v1(str(files[DESCRIPTOR_MODEL])))
    log.info("identity metric: dlib face descriptors loaded in %.1f s",
             time.perf_counter() - started)
    return identity
